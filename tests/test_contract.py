"""Contract checks run over every registered sharpness-aware transform."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import numpy as np

import sam_optax
from tests import oracles, problems
from tests.contract import CASES
from tests.reference import flat

cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)


def _step_fn(case, tx, loss_fn):
  def step(params, state):
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, **case.closure(loss_fn))
    return optax.apply_updates(params, updates), state

  return step


def _sam_states(tree):
  """Every :class:`sam_optax.SAMState` inside an optimizer state."""
  return [
      x
      for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, sam_optax.SAMState))
      if isinstance(x, sam_optax.SAMState)
  ]


def _nonfinite_count(state) -> int:
  (found,) = _sam_states(state)
  return int(found.nonfinite_count)


def _dtypes(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


@cases
def test_unknown_extra_args_are_ignored(case):
  params, loss_fn = problems.mlp_problem()
  tx = case.make()
  grads = jax.grad(loss_fn)(params)
  state = tx.init(params)
  a, _ = tx.update(grads, state, params, **case.closure(loss_fn))
  b, _ = tx.update(grads, state, params, **case.closure(loss_fn), value=1.0, batch=None)
  chex.assert_trees_all_equal(a, b)
  chained = optax.chain(tx, optax.sgd(0.1))
  chained.update(grads, chained.init(params), params, **case.closure(loss_fn), key=None)


@cases
@pytest.mark.parametrize("schedule", [False, True], ids=["const", "schedule"])
def test_no_recompilation_on_second_call(case, schedule):
  params, loss_fn = problems.mlp_problem()
  sam_tx = case.with_rho_schedule(0.05) if schedule else case.make()
  tx = optax.chain(sam_tx, optax.sgd(0.1, momentum=0.9))
  step = jax.jit(_step_fn(case, tx, loss_fn))
  p, s = step(params, tx.init(params))
  p, s = step(p, s)
  p, s = step(p, s)
  assert step._cache_size() == 1


@cases
def test_converges_under_scan(case):
  params, loss_fn = problems.quadratic_problem()
  tx = optax.chain(case.make(rho=0.01), optax.sgd(0.1, momentum=0.5))
  step = _step_fn(case, tx, loss_fn)

  def body(carry, _):
    return step(*carry), None

  (final, _), _ = jax.lax.scan(body, (params, tx.init(params)), length=300)
  assert float(loss_fn(final)) < 1e-2 * float(loss_fn(params))


@cases
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_dtypes_are_preserved(case, dtype):
  params, loss_fn = problems.mlp_problem(dtype=dtype)
  tx = optax.chain(case.make(), optax.adam(1e-3))
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params)
  updates, new_state = jax.jit(
      lambda g, s, p: tx.update(g, s, p, **case.closure(loss_fn))
  )(grads, state, params)
  assert _dtypes(updates) == _dtypes(params)
  assert _dtypes(new_state) == _dtypes(state)


@cases
def test_float64_is_preserved_with_x64(case):
  with jax.enable_x64(True):
    params, loss_fn = problems.mlp_problem(dtype=jnp.float64)
    tx = optax.chain(case.make(), optax.sgd(0.1))
    state = tx.init(params)
    grads = jax.grad(loss_fn)(params)
    updates, new_state = tx.update(grads, state, params, **case.closure(loss_fn))
    assert _dtypes(updates) == _dtypes(params)
    assert _dtypes(new_state) == _dtypes(state)


@cases
def test_inject_hyperparams(case):
  params, loss_fn = problems.mlp_problem()
  injected = optax.inject_hyperparams(case.factory)(**case.kwargs)
  plain = case.make()
  grads = jax.grad(loss_fn)(params)
  a, sa = jax.jit(lambda g, s, p: injected.update(g, s, p, **case.closure(loss_fn)))(
      grads, injected.init(params), params
  )
  b, _ = jax.jit(lambda g, s, p: plain.update(g, s, p, **case.closure(loss_fn)))(
      grads, plain.init(params), params
  )
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)
  assert "rho" in sa.hyperparams


@cases
def test_state_is_stable_through_cond(case):
  params, loss_fn = problems.mlp_problem()
  tx = optax.chain(case.make(), optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params)

  def update(s):
    return tx.update(grads, s, params, **case.closure(loss_fn))[1]

  for pred in (True, False):
    out = jax.jit(lambda s, pred=pred: jax.lax.cond(pred, update, lambda s: s, s))(state)
    assert _dtypes(out) == _dtypes(state)
    assert jax.tree.structure(out) == jax.tree.structure(state)


@cases
@pytest.mark.parametrize("schedule", [False, True], ids=["const", "schedule"])
def test_zero_gradient_gives_zero_update_not_nan(case, schedule):
  """At a stationary point: an exact zero (finite for a random perturbation),
  no step counted as non-finite, and the closure sees finite weights only."""
  params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
  loss_fn = lambda p: sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(p))
  tx = case.with_rho_schedule(0.1) if schedule else case.make(rho=0.1)
  seen = []
  closure = oracles.recording(loss_fn, seen)

  @jax.jit
  def step(state):
    return tx.update(jax.grad(loss_fn)(params), state, params, **case.closure(closure))

  state = tx.init(params)
  for t in range(3):
    updates, state = step(state)
    for leaf in jax.tree.leaves(updates):
      assert bool(jnp.all(jnp.isfinite(leaf))), f"step {t}"
    if case.zero_gradient_is_stationary:
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    assert _nonfinite_count(state) == 0, f"step {t}: a non-finite step was counted"
    stats = sam_optax.sam_stats(state)
    assert all(bool(jnp.isfinite(x)) for x in stats), stats
  jax.effects_barrier()
  assert seen, "the perturbed pass never ran"
  for _, point in seen:
    assert np.all(np.isfinite(point)), "the closure was called at non-finite weights"
    if case.zero_gradient_is_stationary:  # nothing to perturb along
      np.testing.assert_array_equal(point, flat(params))


@cases
def test_ordinary_steps_count_nothing_nonfinite(case):
  """Several steps on the MLP: no step counted as non-finite, finite stats."""
  params, loss_fn = problems.mlp_problem(seed=4)
  seen = []
  tx = optax.chain(case.make(), optax.sgd(0.1, momentum=0.9))
  step = jax.jit(_step_fn(case, tx, oracles.recording(loss_fn, seen)))
  p, s = params, tx.init(params)
  for _ in range(5):
    p, s = step(p, s)
  assert _nonfinite_count(s) == 0
  assert all(bool(jnp.isfinite(x)) for x in sam_optax.sam_stats(s))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))
  jax.effects_barrier()
  assert seen and all(np.all(np.isfinite(q)) for _, q in seen)


@cases
@pytest.mark.parametrize("how", ["float", "schedule", "inject"])
def test_rho_zero_is_the_base_optimizer_exactly(case, how):
  params, loss_fn = problems.mlp_problem(seed=21)
  extra = case.rho_zero_kwargs
  if how == "float":
    sam_tx = case.make(rho=0.0, **extra)
  elif how == "schedule":
    sam_tx = case.with_rho_schedule(0.0, **extra)
  else:
    sam_tx = optax.inject_hyperparams(case.factory)(
        **{**case.kwargs, "rho": 0.0, **extra}
    )

  def run(tx, steps=5):
    step = jax.jit(_step_fn(case, tx, loss_fn))
    p, s = params, tx.init(params)
    for _ in range(steps):
      p, s = step(p, s)
    return p

  base = lambda: optax.sgd(0.1, momentum=0.9)
  got = run(optax.chain(sam_tx, base()))
  want_tx = base()

  def plain_step(p, s):
    u, s = want_tx.update(jax.grad(loss_fn)(p), s, p)
    return optax.apply_updates(p, u), s

  plain_step = jax.jit(plain_step)
  p, s = params, want_tx.init(params)
  for _ in range(5):
    p, s = plain_step(p, s)
  if case.rho_zero_rtol:
    chex.assert_trees_all_close(got, p, rtol=case.rho_zero_rtol, atol=1e-7)
  else:
    chex.assert_trees_all_equal(got, p)


@cases
def test_missing_closure_names_the_argument(case):
  params, loss_fn = problems.mlp_problem()
  tx = optax.chain(case.make(), optax.sgd(0.1))
  name = case.closure_name
  with pytest.raises(TypeError, match=rf"{name}={name}"):
    tx.update(jax.grad(loss_fn)(params), tx.init(params), params)


@cases
def test_negative_rho_is_rejected_at_construction(case):
  name = case.radius
  with pytest.raises(ValueError, match=rf"`{name}`.*{name}=-0.1"):
    case.make(rho=-0.1)


@cases
def test_grad_fn_under_jit(case):
  if not case.grad_fn:
    pytest.skip(f"{case.name} takes every gradient from its closure")
  params, loss_fn = problems.mlp_problem()
  tx = case.make()
  grads = jax.grad(loss_fn)(params)
  a, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=jax.grad(loss_fn)))(
      grads, tx.init(params), params
  )
  b, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, **case.closure(loss_fn)))(
      grads, tx.init(params), params
  )
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------- numeric oracles

ORACLE_STEPS = 4
ORACLE_LR = 0.1


def test_every_case_has_an_oracle():
  assert {c.name for c in CASES} == set(oracles.ORACLES)


def _growing(rho):
  """A schedule that changes ρ at every step: ρ (1 + t/4)."""
  return lambda count: rho * (1.0 + 0.25 * count)


def _library_run(case, how, params, loss_fn, steps):
  """The case's first ``steps`` with ``w ← w − lr u``: weights, outputs, points."""
  rho = case.kwargs["rho"]
  if how == "inject":
    tx = optax.inject_hyperparams(case.factory)(**case.kwargs)
  elif how == "schedule":
    tx = case.make(rho=_growing(rho))
  else:
    tx = case.make()
  seen = []

  def step(carry, t):
    p, s = carry
    g = jax.grad(loss_fn)(p)
    u, s = tx.update(g, s, p, **case.closure(oracles.recording(loss_fn, seen, t)))
    new = jax.tree.map(lambda w, x: w - ORACLE_LR * x, p, u)
    return (new, s), (p, u)

  carry = (params, tx.init(params))
  if how == "scan":
    carry, (ws, us) = jax.jit(
        lambda c: jax.lax.scan(step, c, jnp.arange(steps))
    )(carry)
    ws = [jax.tree.map(lambda x, t=t: x[t], ws) for t in range(steps)]
    us = [jax.tree.map(lambda x, t=t: x[t], us) for t in range(steps)]
  else:
    jitted, ws, us = jax.jit(step), [], []
    for t in range(steps):
      carry, (w, u) = jitted(carry, jnp.asarray(t, jnp.int32))
      ws.append(w)
      us.append(u)
  jax.effects_barrier()
  points = [[q for tag, q in seen if tag == t] for t in range(steps)]
  return [flat(w) for w in ws], [flat(u) for u in us], points, carry[1]


@cases
@pytest.mark.parametrize("how", ["jit", "scan", "schedule", "inject"])
def test_first_steps_match_the_oracle(case, how):
  """Each case's first steps against its float64 reference (tests/oracles.py):
  the points the closure is evaluated at, and the outputs."""
  params, loss_fn = problems.mlp_problem(seed=8)
  rho = case.kwargs["rho"]
  rho_at = _growing(rho) if how == "schedule" else (lambda t: rho)
  ws, us, points, state = _library_run(case, how, params, loss_fn, ORACLE_STEPS)
  want = oracles.run(
      case.name, loss_fn, params, rho_at, ORACLE_STEPS, ORACLE_LR,
      seen=list(zip(ws, points)),
  )
  for t, ref in enumerate(want):
    msg = f"{case.name}/{how}, step {t}"
    assert len(points[t]) == len(ref.points), (msg, len(points[t]), len(ref.points))
    for got_point, ref_point in zip(points[t], ref.points):
      assert np.all(np.isfinite(got_point)), msg
      np.testing.assert_allclose(
          got_point - ws[t], ref_point - ref.w, rtol=1e-5, atol=1e-6, err_msg=msg
      )
    np.testing.assert_allclose(us[t], ref.update, rtol=1e-5, atol=1e-6, err_msg=msg)
  assert _nonfinite_count(state) == 0
