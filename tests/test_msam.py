"""Momentum-SAM: the paper's update rule, one gradient per step, and the contract.

MSAM wraps an optimizer instead of preceding one in a chain and needs no loss
closure, so it gets its own version of the contract checks
(``tests/test_contract.py``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems
from tests.reference import flat, grad_at


def _step_fn(tx, loss_fn, **extra):
  def step(params, state):
    grads = jax.grad(loss_fn)(params)  # at the params held: the perturbed weights
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return step


def _dtypes(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def _norm(x):
  return float(np.linalg.norm(x))


# ------------------------------------------------------------------ the paper


# With rho = 3 the small MLP's trajectory is chaotic: float32 and float64
# runs separate by about 10x every 3 steps after step 10, hence fewer steps.
# The perturbed point's direction v/‖v‖ amplifies the error by about rho/0.1.
@pytest.mark.parametrize("rho, steps", [(0.3, 30), (3.0, 12)])
def test_matches_paper_with_sgd_momentum(rho, steps):
  params, loss_fn = problems.mlp_problem(seed=71)
  lr, mu, atol = 0.05, 0.9, 2e-5
  tx = sam_optax.msam(optax.sgd(lr, momentum=mu), rho=rho)
  step = jax.jit(_step_fn(tx, loss_fn))
  p, s = params, tx.init(params)
  w, v = flat(params), np.zeros_like(flat(params))
  for _ in range(steps):
    p, s = step(p, s)
    # w̃ = w − ρ v/‖v‖ (v = 0 at the first step), v ← μ v + ∇L(w̃), w ← w − η v
    w_tilde = w - rho * v / _norm(v) if _norm(v) > 0 else w
    v = mu * v + grad_at(loss_fn, params, w_tilde)
    w = w - lr * v
    np.testing.assert_allclose(flat(sam_optax.msam_unperturbed(p, s)), w, rtol=2e-4, atol=atol)
    # The parameters held are the next perturbed point, w − ρ v/‖v‖.
    np.testing.assert_allclose(flat(p), w - rho * v / _norm(v), rtol=2e-4, atol=rho * 3e-5)


def test_one_gradient_evaluation_per_step():
  params, loss_fn = problems.mlp_problem(seed=72)
  calls = []

  def counted(p):
    jax.debug.callback(lambda: calls.append(1))
    return loss_fn(p)

  tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=3.0)

  @jax.jit
  def step(p, s):
    grads = jax.grad(counted)(p)
    # loss_fn is accepted (MSAM can replace SAM in a loop) and never called.
    updates, s = tx.update(grads, s, p, loss_fn=counted)
    return optax.apply_updates(p, updates), s

  p, s = params, tx.init(params)
  for _ in range(7):
    p, s = step(p, s)
    jax.effects_barrier()
  assert len(calls) == 7
  stats = sam_optax.sam_stats(s)
  assert float(stats.pass_taken) == 0.0 and float(stats.rho) == 3.0


@pytest.mark.parametrize("base", ["adam", "sgd_nesterov"])
def test_perturbation_follows_the_base_update(base):
  # offset_{t+1} = ρ u_t/‖u_t‖ with u_t = w_{t+1} − w_t, the base update.
  params, loss_fn = problems.mlp_problem(seed=73)
  opt = optax.adam(1e-2) if base == "adam" else optax.sgd(0.05, momentum=0.9, nesterov=True)
  rho = 0.2
  tx = sam_optax.msam(opt, rho=rho)
  step = jax.jit(_step_fn(tx, loss_fn))
  p, s = params, tx.init(params)
  w = flat(params)
  for _ in range(5):
    p, s = step(p, s)
    w_next = flat(sam_optax.msam_unperturbed(p, s))
    u = w_next - w
    np.testing.assert_allclose(flat(p) - w_next, rho * u / _norm(u), rtol=1e-3, atol=1e-6)
    w = w_next


@pytest.mark.parametrize("base", ["momentum", "adamw"])
def test_unperturbed_weights_follow_the_base_optimizer_with_a_rho_schedule(base):
  # The stored offset is removed exactly, even when ρ changes at every step:
  # the unperturbed weights are the base optimizer's iterates for the
  # gradients MSAM received.
  params, loss_fn = problems.mlp_problem(seed=74)
  make = {
      "momentum": lambda: optax.sgd(0.05, momentum=0.9),
      "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
  }[base]
  rho = lambda t: 0.1 * (t + 1)
  tx = sam_optax.msam(make(), rho=rho)
  base_tx = make()
  p, s = params, tx.init(params)
  w, bs = params, base_tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  base_update = jax.jit(lambda g, s, p: base_tx.update(g, s, p))
  for t in range(6):
    g = jax.grad(loss_fn)(p)
    u, s = update(g, s, p)
    p = optax.apply_updates(p, u)
    bu, bs = base_update(g, bs, w)
    w = optax.apply_updates(w, bu)
    chex.assert_trees_all_close(sam_optax.msam_unperturbed(p, s), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_norm(flat(p) - flat(w)), rho(t), rtol=1e-4)
    np.testing.assert_allclose(float(sam_optax.sam_stats(s).rho), rho(t), rtol=1e-6)


@pytest.mark.parametrize("order", ["msam_outside", "multisteps_outside"])
def test_gradient_accumulation_keeps_the_perturbation_over_micro_batches(order):
  # The paper's rule over k micro-batches: one perturbed point
  # w̃ = w − ρ v/‖v‖ per macro step, the mean of the micro-batch gradients
  # at w̃ drives the momentum step.
  params, loss_fn = problems.mlp_problem(seed=75)
  lr, mu, rho, k = 0.05, 0.9, 0.3, 3
  micro = [lambda p, i=i: (1.0 + 0.5 * i) * loss_fn(p) for i in range(k)]
  if order == "msam_outside":
    tx = sam_optax.msam(optax.MultiSteps(optax.sgd(lr, momentum=mu), k), rho=rho)
  else:
    tx = optax.MultiSteps(sam_optax.msam(optax.sgd(lr, momentum=mu), rho=rho), k)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  p, s = params, tx.init(params)
  w, v = flat(params), np.zeros_like(flat(params))
  for _ in range(4):
    w_tilde = w - rho * v / _norm(v) if _norm(v) > 0 else w
    grads = []
    for i in range(k):
      np.testing.assert_allclose(flat(p), w_tilde, rtol=1e-5, atol=1e-6)
      u, s = update(jax.grad(micro[i])(p), s, p)
      p = optax.apply_updates(p, u)
      grads.append(grad_at(micro[i], params, w_tilde))
    v = mu * v + np.mean(grads, axis=0)
    w = w - lr * v
    np.testing.assert_allclose(flat(sam_optax.msam_unperturbed(p, s)), w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(flat(p), w - rho * v / _norm(v), rtol=1e-4, atol=1e-6)


def test_zero_update_keeps_the_direction_of_the_perturbation():
  # A learning rate of 0 gives a zero update: w stays, and the offset keeps
  # its direction, rescaled to the new ρ (here ρ_t = 0.2 (t + 1)).
  params, loss_fn = problems.mlp_problem(seed=76)
  lrs = [0.05, 0.05, 0.0, 0.0, 0.05]
  tx = sam_optax.msam(
      optax.sgd(lambda t: jnp.asarray(lrs)[t], momentum=0.9),
      rho=lambda t: 0.2 * (t + 1),
  )
  step = jax.jit(_step_fn(tx, loss_fn))
  p, s = params, tx.init(params)
  for t, lr in enumerate(lrs):
    before = flat(sam_optax.msam_unperturbed(p, s)), flat(p)
    p, s = step(p, s)
    w, offset = flat(sam_optax.msam_unperturbed(p, s)), flat(p) - flat(
        sam_optax.msam_unperturbed(p, s)
    )
    np.testing.assert_allclose(_norm(offset), 0.2 * (t + 1), rtol=1e-5)
    if lr == 0.0:
      # (w + offset) − offset rounds in float32: equal to an ulp or so
      np.testing.assert_allclose(w, before[0], rtol=0, atol=2e-7)
      old = before[1] - before[0]
      np.testing.assert_allclose(
          offset, 0.2 * (t + 1) * old / _norm(old), rtol=1e-4, atol=1e-7
      )


def test_momentum_direction_matches_the_authors_adamw_msam():
  # AdamW_MSAM: w̃ = w − ρ m/‖m‖ with m Adam's first moment (not
  # bias-corrected; no perturbation while m = 0); the gradient at w̃ drives
  # Adam at w.
  params, loss_fn = problems.mlp_problem(seed=77)
  lr, b1, b2, adam_eps, rho = 1e-2, 0.9, 0.999, 1e-8, 0.5
  tx = sam_optax.msam(optax.adam(lr, b1, b2, adam_eps), rho=rho, direction="momentum")
  step = jax.jit(_step_fn(tx, loss_fn))
  p, s = params, tx.init(params)
  w = flat(params)
  m, v = np.zeros_like(w), np.zeros_like(w)
  for t in range(1, 7):
    p, s = step(p, s)
    w_tilde = w - rho * m / _norm(m) if _norm(m) > 0 else w
    g = grad_at(loss_fn, params, w_tilde)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + adam_eps)
    np.testing.assert_allclose(flat(sam_optax.msam_unperturbed(p, s)), w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(flat(p), w - rho * m / _norm(m), rtol=1e-4, atol=1e-6)


def test_momentum_direction_follows_sgd_momentum_at_zero_learning_rate():
  # The official SGD rule perturbs along v whatever the learning rate.
  params, loss_fn = problems.mlp_problem(seed=78)
  lrs, mu, rho = [0.05, 0.0, 0.05, 0.0], 0.9, 0.3
  tx = sam_optax.msam(optax.sgd(lambda t: jnp.asarray(lrs)[t], momentum=mu), rho=rho,
                      direction="momentum")
  step = jax.jit(_step_fn(tx, loss_fn))
  p, s = params, tx.init(params)
  w, v = flat(params), np.zeros_like(flat(params))
  for lr in lrs:
    p, s = step(p, s)
    w_tilde = w - rho * v / _norm(v) if _norm(v) > 0 else w
    v = mu * v + grad_at(loss_fn, params, w_tilde)
    w = w - lr * v
    np.testing.assert_allclose(flat(sam_optax.msam_unperturbed(p, s)), w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(flat(p), w - rho * v / _norm(v), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("opt", [optax.sgd(0.1), optax.chain(optax.adam(1e-3), optax.adam(1e-3))])
def test_momentum_direction_needs_exactly_one_first_moment(opt):
  params, _ = problems.mlp_problem()
  tx = sam_optax.msam(opt, direction="momentum")
  with pytest.raises(ValueError, match=r"`msam`: `direction='momentum'`.*exactly one"):
    tx.init(params)


# ------------------------------------------------------------- the contract


def test_unknown_extra_args_are_ignored_and_forwarded():
  params, loss_fn = problems.mlp_problem()
  grads = jax.grad(loss_fn)(params)
  tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  a, _ = tx.update(grads, state, params)
  b, _ = tx.update(grads, state, params, loss_fn=loss_fn, grad_fn=None, key=None, batch=3)
  chex.assert_trees_all_equal(a, b)
  # Extra arguments reach the wrapped optimizer.
  tx = sam_optax.msam(optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau()))
  state = tx.init(params)
  tx.update(grads, state, params, value=jnp.asarray(1.0))
  with pytest.raises(TypeError, match="value"):
    tx.update(grads, state, params)


@pytest.mark.parametrize("schedule", [False, True], ids=["const", "schedule"])
def test_no_recompilation_on_second_call(schedule):
  params, loss_fn = problems.mlp_problem()
  rho = (lambda t: 0.5 + 0.0 * t) if schedule else 0.5
  tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=rho)
  step = jax.jit(_step_fn(tx, loss_fn))
  p, s = step(params, tx.init(params))
  p, s = step(p, s)
  p, s = step(p, s)
  assert step._cache_size() == 1


def test_converges_under_scan():
  params, loss_fn = problems.quadratic_problem()
  tx = sam_optax.msam(optax.sgd(0.1, momentum=0.5), rho=0.01)
  step = _step_fn(tx, loss_fn)

  def body(carry, _):
    return step(*carry), None

  (final, state), _ = jax.lax.scan(body, (params, tx.init(params)), length=300)
  w = sam_optax.msam_unperturbed(final, state)
  assert float(loss_fn(w)) < 1e-2 * float(loss_fn(params))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("base", ["momentum", "adam"])
def test_dtypes_are_preserved(dtype, base):
  params, loss_fn = problems.mlp_problem(dtype=dtype)
  opt = optax.adam(1e-3) if base == "adam" else optax.sgd(0.1, momentum=0.9)
  tx = sam_optax.msam(opt, rho=3.0)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
  updates, new_state = step(params, state)
  assert _dtypes(updates) == _dtypes(params)
  assert _dtypes(new_state) == _dtypes(state)
  p = optax.apply_updates(params, updates)
  updates, newer = step(p, new_state)
  assert _dtypes(newer) == _dtypes(state)
  assert _dtypes(sam_optax.msam_unperturbed(p, new_state)) == _dtypes(params)


def test_float64_is_preserved_with_x64():
  with jax.enable_x64(True):
    params, loss_fn = problems.mlp_problem(dtype=jnp.float64)
    tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9))
    state = tx.init(params)
    updates, new_state = tx.update(jax.grad(loss_fn)(params), state, params)
    assert _dtypes(updates) == _dtypes(params)
    assert _dtypes(new_state) == _dtypes(state)


def test_inject_hyperparams():
  params, loss_fn = problems.mlp_problem()
  injected = optax.inject_hyperparams(sam_optax.msam)(optax.sgd(0.1, momentum=0.9), rho=0.5)
  plain = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.5)
  run_i = jax.jit(_step_fn(injected, loss_fn))
  run_p = jax.jit(_step_fn(plain, loss_fn))
  pi, si = params, injected.init(params)
  pp, sp = params, plain.init(params)
  for _ in range(3):
    pi, si = run_i(pi, si)
    pp, sp = run_p(pp, sp)
  chex.assert_trees_all_close(pi, pp, rtol=1e-6, atol=1e-7)
  assert "rho" in si.hyperparams
  chex.assert_trees_all_close(
      sam_optax.msam_unperturbed(pi, si), sam_optax.msam_unperturbed(pp, sp), rtol=1e-6, atol=1e-7
  )
  # The radius can be changed between steps through the injected state.
  si.hyperparams["rho"] = jnp.asarray(0.25)
  pi, si = run_i(pi, si)
  np.testing.assert_allclose(_norm(flat(pi) - flat(sam_optax.msam_unperturbed(pi, si))), 0.25, rtol=1e-4)


def test_state_is_stable_through_cond():
  params, loss_fn = problems.mlp_problem()
  tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params)

  def update(s):
    return tx.update(grads, s, params)[1]

  for pred in (True, False):
    out = jax.jit(lambda s, pred=pred: jax.lax.cond(pred, update, lambda s: s, s))(state)
    assert _dtypes(out) == _dtypes(state)
    assert jax.tree.structure(out) == jax.tree.structure(state)


@pytest.mark.parametrize("schedule", [False, True], ids=["const", "schedule"])
def test_zero_gradient_gives_zero_update_not_nan(schedule):
  params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
  loss_fn = lambda p: sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(p))
  rho = (lambda t: 3.0 + 0.0 * t) if schedule else 3.0
  tx = sam_optax.msam(optax.adam(1e-2), rho=rho)
  p, state = jax.jit(_step_fn(tx, loss_fn))(params, tx.init(params))
  chex.assert_trees_all_equal(p, params)
  assert all(bool(jnp.isfinite(x)) for x in sam_optax.sam_stats(state))


@pytest.mark.parametrize("how", ["float", "schedule", "inject"])
@pytest.mark.parametrize("base", ["momentum", "adam"])
def test_rho_zero_is_the_base_optimizer_exactly(how, base):
  params, loss_fn = problems.mlp_problem(seed=21)
  make = (lambda: optax.adam(1e-2)) if base == "adam" else (lambda: optax.sgd(0.1, momentum=0.9))
  if how == "float":
    tx = sam_optax.msam(make(), rho=0.0)
  elif how == "schedule":
    tx = sam_optax.msam(make(), rho=lambda t: 0.0 * t)
  else:
    tx = optax.inject_hyperparams(sam_optax.msam)(make(), rho=0.0)

  def run(tx):
    step = jax.jit(_step_fn(tx, loss_fn))
    p, s = params, tx.init(params)
    for _ in range(5):
      p, s = step(p, s)
    return p

  if how == "float":  # skipped at trace time: bit for bit
    chex.assert_trees_all_equal(run(tx), run(make()))
  else:  # the same arithmetic, fused differently by XLA: a few ulps
    chex.assert_trees_all_close(run(tx), run(make()), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": -1.0}, r"`msam`: `rho` must lie in \[0, inf\); got rho=-1.0"),
        ({"rho": "3"}, r"`msam`: `rho` must be a real number or a schedule"),
        ({"eps": 0.0}, r"`msam`: `eps` must lie in \(0, inf\); got eps=0.0"),
        ({"direction": "adam"}, r"`msam`: `direction` must be one of 'update', 'momentum'"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sam_optax.msam(optax.sgd(0.1), **kwargs)


def test_optimizer_must_be_a_gradient_transformation():
  with pytest.raises(TypeError, match=r"`msam`: `optimizer` must be an optax.GradientTransformation"):
    sam_optax.msam(0.1)


def test_unperturbed_needs_an_msam_state():
  params, _ = problems.mlp_problem()
  with pytest.raises(ValueError, match=r"exactly one `MSAMState`.*contains no"):
    sam_optax.msam_unperturbed(params, optax.sgd(0.1).init(params))
  tx = sam_optax.msam(optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"the MSAM offset does not have the tree structure"):
    sam_optax.msam_unperturbed({"w": jnp.ones(2)}, tx.init(params))
  chained = optax.chain(tx, tx)
  with pytest.raises(ValueError, match=r"contains 2"):
    sam_optax.msam_unperturbed(params, chained.init(params))


def test_nonfinite_gradient_is_skipped_by_apply_if_finite():
  """MSAM has one gradient: a non-finite one is skipped by apply_if_finite.

  Reference: the same run without the bad step.
  """
  loss_fn = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * w ** 2)  # noqa: E731
  tx = optax.apply_if_finite(
      sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.3),
      max_consecutive_errors=3,
  )

  def run(bad_at):
    params, state = jnp.array([1.0, -2.0]), tx.init(jnp.array([1.0, -2.0]))
    for t in range(4):
      g = jax.grad(loss_fn)(params)
      if t == bad_at:
        g = g.at[0].set(jnp.nan)
      updates, state = tx.update(g, state, params, loss_fn=loss_fn)
      params = optax.apply_updates(params, updates)
      if t == bad_at:
        assert int(state.notfinite_count) == 1
    return params

  with_bad = run(bad_at=1)
  assert bool(jnp.all(jnp.isfinite(with_bad)))
  # Skipping step 1 leaves the same state as never seeing it: 3 good steps.
  params, state = jnp.array([1.0, -2.0]), tx.init(jnp.array([1.0, -2.0]))
  for _ in range(3):
    g = jax.grad(loss_fn)(params)
    updates, state = tx.update(g, state, params, loss_fn=loss_fn)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(with_bad, params, rtol=1e-6)
