"""`sam_optax.sam` against the independent two-pass reference."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems, reference

BASES = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
    "lion": lambda: optax.lion(1e-3),
}


def run_sam(loss_fn, params, tx, steps, *, jit=True):
  state = tx.init(params)

  def step(params, state):
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize("base", sorted(BASES))
def test_one_step_matches_reference(base):
  params, loss_fn = problems.mlp_problem()
  got, _ = run_sam(
      loss_fn, params, optax.chain(sam_optax.sam(0.1), BASES[base]()), 1
  )
  want = reference.train(loss_fn, params, BASES[base](), lambda t: 0.1, 1)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("base", sorted(BASES))
def test_many_steps_match_reference(base):
  params, loss_fn = problems.mlp_problem(seed=3)
  got, _ = run_sam(
      loss_fn, params, optax.chain(sam_optax.sam(0.05), BASES[base]()), 20
  )
  want = reference.train(loss_fn, params, BASES[base](), lambda t: 0.05, 20)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
  # The test must be able to fail: SAM differs from the base optimizer here.
  plain = reference.train(loss_fn, params, BASES[base](), lambda t: 0.0, 20)
  diff = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), got, plain))
  assert max(float(d) for d in diff) > 1e-4


def test_sam_gradient_equals_reference_directly():
  params, loss_fn = problems.mlp_problem(seed=5)
  grads = jax.grad(loss_fn)(params)
  tx = sam_optax.sam(rho=0.3)
  updates, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
  chex.assert_trees_all_close(
      updates, reference.sam_gradient(loss_fn, params, 0.3), rtol=1e-5, atol=1e-6
  )


def test_perturbation_has_norm_rho_and_direction_of_gradient():
  params, loss_fn = problems.mlp_problem(seed=2)
  grads = jax.grad(loss_fn)(params)
  seen = []

  def grad_fn(p):
    seen.append(p)
    return jax.grad(loss_fn)(p)

  tx = sam_optax.sam(rho=0.25)
  tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
  (w_adv,) = seen
  eps = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), w_adv, params)
  flat_eps = np.concatenate([np.ravel(e) for e in jax.tree.leaves(eps)])
  flat_g = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]).astype(np.float64)
  np.testing.assert_allclose(np.linalg.norm(flat_eps), 0.25, rtol=1e-5)
  cos = flat_eps @ flat_g / (np.linalg.norm(flat_eps) * np.linalg.norm(flat_g))
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


def test_grad_fn_equals_loss_fn():
  params, loss_fn = problems.mlp_problem(seed=4)
  grads = jax.grad(loss_fn)(params)
  tx = sam_optax.sam(rho=0.1)
  state = tx.init(params)
  a, _ = tx.update(grads, state, params, loss_fn=loss_fn)
  b, _ = tx.update(grads, state, params, grad_fn=jax.grad(loss_fn))
  chex.assert_trees_all_equal(a, b)


def test_aux_is_discarded():
  params, loss_fn = problems.mlp_problem(seed=4)
  grads = jax.grad(loss_fn)(params)
  tx = sam_optax.sam(rho=0.1)
  state = tx.init(params)
  a, _ = tx.update(grads, state, params, loss_fn=loss_fn)
  b, _ = tx.update(
      grads, state, params, loss_fn=lambda p: (loss_fn(p), {"stats": jnp.ones(3)})
  )
  chex.assert_trees_all_equal(a, b)


def test_stats_report_clean_norm_and_perturbed_loss():
  params, loss_fn = problems.mlp_problem(seed=6)
  grads = jax.grad(loss_fn)(params)
  rho = 0.2
  tx = optax.chain(sam_optax.sam(rho), optax.sgd(0.1))
  _, state = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))(
      grads, tx.init(params), params
  )
  stats = sam_optax.sam_stats(state)
  flat_g = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]).astype(np.float64)
  norm = np.linalg.norm(flat_g)
  w_adv = jax.tree.map(
      lambda p, g: np.asarray(p, np.float64) + rho * np.asarray(g, np.float64) / norm,
      params, grads,
  )
  want_loss = float(loss_fn(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), w_adv)))
  want_adv = reference.sam_gradient(loss_fn, params, rho)
  np.testing.assert_allclose(stats.grad_norm, norm, rtol=1e-5)
  np.testing.assert_allclose(stats.perturbed_loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(
      stats.perturbed_grad_norm,
      np.linalg.norm(np.concatenate([np.ravel(g) for g in jax.tree.leaves(want_adv)])),
      rtol=1e-5,
  )
  np.testing.assert_allclose(stats.rho, rho)
  assert int(state[0].count) == 1


def test_rho_schedule_counts_sam_steps_from_zero():
  params, loss_fn = problems.mlp_problem(seed=7)
  schedule = optax.linear_schedule(0.0, 0.4, transition_steps=4)
  got, state = run_sam(
      loss_fn, params, optax.chain(sam_optax.sam(schedule), optax.sgd(0.1)), 6
  )
  want = reference.train(loss_fn, params, optax.sgd(0.1), lambda t: float(schedule(t)), 6)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
  assert int(state[0].count) == 6
  np.testing.assert_allclose(sam_optax.sam_stats(state).rho, float(schedule(5)))


def test_schedule_at_zero_is_the_gradient_at_w_and_no_sam_step():
  params, loss_fn = problems.mlp_problem()
  grads = jax.grad(loss_fn)(params)
  tx = sam_optax.sam(lambda count: 0.0 * count)
  updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))(
      grads, tx.init(params), params
  )
  chex.assert_trees_all_close(updates, grads, rtol=1e-6, atol=1e-8)
  assert float(state.stats.perturbed_loss) == 0.0
  assert float(state.stats.pass_taken) == 0.0


def test_with_sam_matches_reference():
  """``with_sam(adam, rho)``: five SAM steps feeding Adam, against the reference."""
  params, loss_fn = problems.mlp_problem(seed=8)
  got, state = run_sam(loss_fn, params, sam_optax.with_sam(optax.adam(1e-2), rho=0.1), 5)
  want = reference.train(loss_fn, params, optax.adam(1e-2), lambda t: 0.1, 5)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)
  assert float(sam_optax.sam_stats(state).rho) == pytest.approx(0.1)


def test_inject_hyperparams_changes_rho_between_steps():
  params, loss_fn = problems.mlp_problem(seed=9)
  tx = optax.chain(optax.inject_hyperparams(sam_optax.sam)(rho=0.1), optax.sgd(0.1))
  state = tx.init(params)
  step = jax.jit(
      lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
  )
  u1, state = step(params, state)
  state[0].hyperparams["rho"] = jnp.asarray(0.4, jnp.float32)
  p1 = optax.apply_updates(params, u1)
  u2, state = step(p1, state)
  want = reference.train(loss_fn, params, optax.sgd(0.1), lambda t: [0.1, 0.4][t], 2)
  chex.assert_trees_all_close(optax.apply_updates(p1, u2), want, rtol=1e-4, atol=1e-5)
  assert step._cache_size() == 1


def test_weight_decay_after_sam_acts_at_unperturbed_params():
  params, loss_fn = problems.mlp_problem(seed=10)
  wd, lr, rho = 0.1, 0.05, 0.2
  tx = optax.chain(sam_optax.sam(rho), optax.add_decayed_weights(wd), optax.sgd(lr))
  got, _ = run_sam(loss_fn, params, tx, 1)
  u = reference.sam_gradient(loss_fn, params, rho)
  want = jax.tree.map(lambda w, g: w - lr * (g + wd * w), params, u)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_l2_in_loss_enters_perturbation_and_descent():
  params, loss_fn = problems.mlp_problem(seed=11)
  wd, rho = 0.1, 0.2

  def l2_loss(p):
    return loss_fn(p) + 0.5 * wd * sum(jnp.sum(x**2) for x in jax.tree.leaves(p))

  tx = sam_optax.sam(rho)
  grads = jax.grad(l2_loss)(params)
  got, _ = tx.update(grads, tx.init(params), params, loss_fn=l2_loss)
  chex.assert_trees_all_close(
      got, reference.sam_gradient(l2_loss, params, rho), rtol=1e-5, atol=1e-6
  )


def test_clipping_after_sam_clips_the_sam_gradient():
  params, loss_fn = problems.mlp_problem(seed=12)
  tx = optax.chain(sam_optax.sam(0.1), optax.clip_by_global_norm(1e-3))
  grads = jax.grad(loss_fn)(params)
  got, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
  u = reference.sam_gradient(loss_fn, params, 0.1)
  norm = np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(u)))
  chex.assert_trees_all_close(
      got, jax.tree.map(lambda x: x * 1e-3 / norm, u), rtol=1e-5, atol=1e-8
  )


def test_bf16_params_give_bf16_updates_close_to_f32():
  params32, _ = problems.mlp_problem(seed=13)
  batch = problems.mlp_batch(14)
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
  loss_fn = lambda p: problems.mlp_loss(p, batch)
  tx = optax.chain(sam_optax.sam(0.1), optax.sgd(0.1, momentum=0.9))
  grads = jax.grad(loss_fn)(params16)
  updates, state = tx.update(grads, tx.init(params16), params16, loss_fn=loss_fn)
  for u in jax.tree.leaves(updates):
    assert u.dtype == jnp.bfloat16
  assert sam_optax.sam_stats(state).grad_norm.dtype == jnp.float32
  want = reference.sam_gradient(
      loss_fn, jax.tree.map(lambda x: x.astype(jnp.float32), params16), 0.1
  )
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x.astype(jnp.float32), updates),
      jax.tree.map(lambda x: -0.1 * x, want),
      rtol=5e-2, atol=5e-3,
  )


def test_norm_is_accumulated_in_float32_for_bf16():
  # 4096 entries of 1/64 in bf16: the sum of squares is 1.0 exactly in f32.
  g = {"w": jnp.full((4096,), 1.0 / 64, jnp.bfloat16)}
  tx = sam_optax.sam(rho=1.0)
  _, state = tx.update(g, tx.init(g), g, grad_fn=lambda p: p)
  np.testing.assert_allclose(state.stats.grad_norm, 1.0, rtol=1e-6)


def test_matches_optax_contrib_sam_opaque_mode():
  params, loss_fn = problems.mlp_problem(seed=15)
  rho, steps = 0.1, 10
  base = lambda: optax.sgd(0.05, momentum=0.9)
  contrib = optax.contrib.sam(
      base(),
      optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
      opaque_mode=True,
  )
  ours = optax.chain(sam_optax.sam(rho), base())

  def run(tx, **kw):
    p, s = params, tx.init(params)
    for _ in range(steps):
      g = jax.grad(loss_fn)(p)
      u, s = tx.update(g, s, p, **kw)
      p = optax.apply_updates(p, u)
    return p

  a = run(contrib, grad_fn=lambda p, _: jax.grad(loss_fn)(p))
  b = run(ours, grad_fn=jax.grad(loss_fn))
  chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


def test_contrib_sam_nans_on_zero_gradient_where_ours_does_not():
  params = {"w": jnp.ones(3)}
  loss_fn = lambda p: jnp.sum((p["w"] - 1.0) ** 2)  # a minimum: g = 0
  grads = jax.grad(loss_fn)(params)
  ours = optax.chain(sam_optax.sam(0.1), optax.sgd(0.1))
  u, _ = ours.update(grads, ours.init(params), params, loss_fn=loss_fn)
  assert bool(jnp.all(u["w"] == 0.0))
  contrib = optax.contrib.sam(
      optax.sgd(0.1), optax.chain(optax.contrib.normalize(), optax.sgd(0.1)),
      opaque_mode=True,
  )
  u2, _ = contrib.update(
      grads, contrib.init(params), params, grad_fn=lambda p, _: jax.grad(loss_fn)(p)
  )
  assert bool(jnp.any(jnp.isnan(u2["w"])))
