"""Contract checks run over every registered sharpness-aware transform."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import sam_optax
from tests import problems
from tests.contract import CASES

cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)


def _step_fn(tx, loss_fn, **extra):
  def step(params, state):
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, **extra)
    return optax.apply_updates(params, updates), state

  return step


def _dtypes(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


@cases
def test_unknown_extra_args_are_ignored(case):
  params, loss_fn = problems.mlp_problem()
  tx = case.make()
  grads = jax.grad(loss_fn)(params)
  state = tx.init(params)
  a, _ = tx.update(grads, state, params, loss_fn=loss_fn)
  b, _ = tx.update(grads, state, params, loss_fn=loss_fn, value=1.0, batch=None)
  chex.assert_trees_all_equal(a, b)
  chained = optax.chain(tx, optax.sgd(0.1))
  chained.update(grads, chained.init(params), params, loss_fn=loss_fn, key=None)


@cases
@pytest.mark.parametrize("schedule", [False, True], ids=["const", "schedule"])
def test_no_recompilation_on_second_call(case, schedule):
  params, loss_fn = problems.mlp_problem()
  sam_tx = case.with_rho_schedule(0.05) if schedule else case.make()
  tx = optax.chain(sam_tx, optax.sgd(0.1, momentum=0.9))
  step = jax.jit(_step_fn(tx, loss_fn))
  p, s = step(params, tx.init(params))
  p, s = step(p, s)
  p, s = step(p, s)
  assert step._cache_size() == 1


@cases
def test_converges_under_scan(case):
  params, loss_fn = problems.quadratic_problem()
  tx = optax.chain(case.make(rho=0.01), optax.sgd(0.1, momentum=0.5))
  step = _step_fn(tx, loss_fn)

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
      lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn)
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
    updates, new_state = tx.update(grads, state, params, loss_fn=loss_fn)
    assert _dtypes(updates) == _dtypes(params)
    assert _dtypes(new_state) == _dtypes(state)


@cases
def test_inject_hyperparams(case):
  params, loss_fn = problems.mlp_problem()
  injected = optax.inject_hyperparams(case.factory)(**case.kwargs)
  plain = case.make()
  grads = jax.grad(loss_fn)(params)
  a, sa = jax.jit(lambda g, s, p: injected.update(g, s, p, loss_fn=loss_fn))(
      grads, injected.init(params), params
  )
  b, _ = jax.jit(lambda g, s, p: plain.update(g, s, p, loss_fn=loss_fn))(
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
    return tx.update(grads, s, params, loss_fn=loss_fn)[1]

  for pred in (True, False):
    out = jax.jit(lambda s, pred=pred: jax.lax.cond(pred, update, lambda s: s, s))(state)
    assert _dtypes(out) == _dtypes(state)
    assert jax.tree.structure(out) == jax.tree.structure(state)


@cases
@pytest.mark.parametrize("schedule", [False, True], ids=["const", "schedule"])
def test_zero_gradient_gives_zero_update_not_nan(case, schedule):
  params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
  loss_fn = lambda p: sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(p))
  sam_tx = case.with_rho_schedule(0.1) if schedule else case.make(rho=0.1)
  tx = optax.chain(sam_tx, optax.adam(1e-2))
  updates, state = jax.jit(_step_fn(tx, loss_fn))(params, tx.init(params))
  for leaf in jax.tree.leaves(updates):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  if case.zero_gradient_is_stationary:
    chex.assert_trees_all_equal(updates, params)  # params unchanged
  stats = sam_optax.sam_stats(state)
  assert all(bool(jnp.isfinite(x)) for x in stats)


@cases
@pytest.mark.parametrize("how", ["float", "schedule", "inject"])
def test_rho_zero_is_the_base_optimizer_exactly(case, how):
  params, loss_fn = problems.mlp_problem(seed=21)
  if how == "float":
    sam_tx = case.make(rho=0.0)
  elif how == "schedule":
    sam_tx = case.with_rho_schedule(0.0)
  else:
    sam_tx = optax.inject_hyperparams(case.factory)(**{**case.kwargs, "rho": 0.0})

  def run(tx, steps=5):
    step = jax.jit(_step_fn(tx, loss_fn))
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
  chex.assert_trees_all_equal(got, p)


@cases
def test_missing_closure_names_the_argument(case):
  params, loss_fn = problems.mlp_problem()
  tx = optax.chain(case.make(), optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"loss_fn=loss_fn"):
    tx.update(jax.grad(loss_fn)(params), tx.init(params), params)


@cases
def test_negative_rho_is_rejected_at_construction(case):
  name = case.radius
  with pytest.raises(ValueError, match=rf"`{name}`.*{name}=-0.1"):
    case.make(rho=-0.1)


@cases
def test_grad_fn_under_jit(case):
  params, loss_fn = problems.mlp_problem()
  tx = case.make()
  grads = jax.grad(loss_fn)(params)
  a, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=jax.grad(loss_fn)))(
      grads, tx.init(params), params
  )
  b, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))(
      grads, tx.init(params), params
  )
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)
