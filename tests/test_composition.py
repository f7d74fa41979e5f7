"""Composing parts: reductions and combinations against independent references."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import directions, perturbations, policies
from tests import oracles, problems, reference
from tests.reference import flat, grad_at, unflatten


def _update(tx, params, loss_fn):
  grads = jax.grad(loss_fn)(params)
  return jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))(
      grads, tx.init(params), params
  )


def test_default_composition_is_sam():
  """No parts given: the paper's SAM gradient (float64 reference)."""
  params, loss_fn = problems.mlp_problem(seed=51)
  got, _ = _update(sam_optax.sharpness_aware(0.1), params, loss_fn)
  want = reference.sam_gradient(loss_fn, params, 0.1)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_gsam_alpha_zero_is_sam():
  params, loss_fn = problems.mlp_problem(seed=52)
  a, _ = _update(sam_optax.gsam(0.1, alpha=0.0), params, loss_fn)
  b, _ = _update(sam_optax.sam(0.1), params, loss_fn)
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


def test_asam_with_large_eta_approaches_sam():
  params, loss_fn = problems.mlp_problem(seed=53)
  b, _ = _update(sam_optax.sam(0.1), params, loss_fn)
  errors = []
  for eta in (1e1, 1e3, 1e5):
    # with T ≈ η the direction is η²g/(η‖g‖) = η g/‖g‖: rescale ρ by 1/η
    a, _ = _update(sam_optax.asam(0.1 / eta, eta=eta), params, loss_fn)
    errors.append(max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
        jax.tree.leaves(a), jax.tree.leaves(b))))
  assert errors[0] > errors[1] > errors[2] or errors[2] < 1e-5
  assert errors[2] < 1e-4


def test_all_true_mask_is_the_unmasked_variant():
  params, loss_fn = problems.mlp_problem(seed=54)
  everything = jax.tree.map(lambda _: True, params)
  for make in (
      lambda **kw: sam_optax.sharpness_aware(0.1, **kw),
      lambda **kw: sam_optax.sharpness_aware(
          0.1, direction=directions.gsam(0.3), **kw),
  ):
    a, _ = _update(make(mask=everything), params, loss_fn)
    b, _ = _update(make(), params, loss_fn)
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


def test_mask_never_perturbs_unselected_leaves_and_normalizes_over_selected():
  params, loss_fn = problems.mlp_problem(seed=55)
  mask = {"layer1": {"w": False, "b": True}, "layer2": (False, True), "temperature": False}
  seen = []

  def grad_fn(p):
    seen.append(p)
    return jax.grad(loss_fn)(p)

  tx = sam_optax.sharpness_aware(0.2, mask=mask)
  tx.update(jax.grad(loss_fn)(params), tx.init(params), params, grad_fn=grad_fn)
  eps = flat(seen[0]) - flat(params)
  selected = flat(jax.tree.map(lambda m, x: jnp.full(jnp.shape(x), float(m)), mask, params)) > 0
  assert np.all(eps[~selected] == 0)
  g = flat(jax.grad(loss_fn)(params))
  np.testing.assert_allclose(eps[selected], 0.2 * g[selected] / np.linalg.norm(g[selected]), rtol=1e-4, atol=1e-7)


def test_adaptive_geometry_with_looksam_schedule_matches_reference():
  params, loss_fn = problems.mlp_problem(seed=56)
  rho, eta, k, alpha, lr, steps = 0.5, 0.01, 2, 0.5, 0.1, 5
  tx = optax.chain(
      sam_optax.sharpness_aware(
          rho,
          perturbation=perturbations.adaptive(eta),
          direction=directions.looksam(alpha),
          policy=policies.every(k),
      ),
      optax.sgd(lr),
  )
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn))
  p, s = params, tx.init(params)
  w = flat(params)
  g_v = np.zeros_like(w)
  for t in range(steps):
    u_lib, s = step(p, s)
    p = optax.apply_updates(p, u_lib)
    g = grad_at(loss_fn, params, w)
    if t % k == 0:
      tw = np.abs(w) + eta
      g_s = grad_at(loss_fn, params, w + rho * tw * tw * g / np.linalg.norm(tw * g))
      g_v = g_s - (g_s @ g) / (g @ g) * g
      u = g_s
    else:
      u = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
    w = w - lr * u
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: np.asarray(x, np.float64), p), unflatten(params, w),
        rtol=1e-4, atol=1e-5)


def test_every_one_policy_is_sam():
  params, loss_fn = problems.mlp_problem(seed=57)
  a, _ = _update(sam_optax.sharpness_aware(0.1, policy=policies.every(1)), params, loss_fn)
  b, _ = _update(sam_optax.sam(0.1), params, loss_fn)
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


def test_wrong_part_types_are_rejected():
  with pytest.raises(TypeError, match=r"`perturbation` must be a Perturbation"):
    sam_optax.sharpness_aware(0.1, perturbation=directions.gsam(0.1))
  with pytest.raises(TypeError, match=r"`policy` must be a Policy"):
    sam_optax.sharpness_aware(0.1, policy=3)


# ------------------------------------------------------------- random parts


def _recording_grad(loss_fn, points):
  """``∇L`` that also appends the point it is evaluated at to ``points``."""

  def grad_fn(p):
    jax.debug.callback(lambda q: points.append(q), p)
    return jax.grad(loss_fn)(p)

  return grad_fn


def _f64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def test_random_mask_with_gsam_direction_and_every_k_matches_reference():
  # ESAM's random leaf mask as the geometry, GSAM's output, LookSAM's schedule.
  params, loss_fn = problems.mlp_problem(seed=58)
  rho, beta, alpha, k, lr, steps = 0.3, 0.5, 0.4, 2, 0.1, 12
  tx = sam_optax.sharpness_aware(
      rho,
      perturbation=perturbations.random_mask(beta, key=3),
      direction=directions.gsam(alpha),
      policy=policies.every(k),
  )
  points = []
  grad_fn = _recording_grad(loss_fn, points)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
  p, s = params, tx.init(params)
  masks = []
  for t in range(steps):
    points.clear()
    g_tree = jax.grad(loss_fn)(p)
    u, s = step(g_tree, s, p)
    jax.effects_barrier()
    g = flat(g_tree)
    if t % k:  # skipped: no second pass, the clean gradient
      assert not points
      want = g
    else:
      (point,) = points
      eps = [np.asarray(a, np.float64) - np.asarray(b, np.float64)
             for a, b in zip(jax.tree.leaves(point), jax.tree.leaves(p))]
      kept = np.array([np.any(e != 0) for e in eps])
      masks.append(kept)
      # ε = ρ/β · M ⊙ g / ‖M ⊙ g‖ with M the kept leaves.
      m = np.concatenate([np.full(e.size, float(c)) for e, c in zip(eps, kept)])
      want_eps = rho / beta * m * g / np.linalg.norm(m * g)
      np.testing.assert_allclose(
          np.concatenate([e.ravel() for e in eps]), want_eps, rtol=1e-4, atol=1e-6)
      # u = g_p − α (g − (g·ĝ_p) ĝ_p), the gradient taken at that point.
      g_p = grad_at(loss_fn, params, flat(point))
      unit = g_p / np.linalg.norm(g_p)
      want = g_p - alpha * (g - (g @ unit) * unit)
    chex.assert_trees_all_close(_f64(u), unflatten(params, want), rtol=1e-4, atol=1e-6)
    p = optax.apply_updates(p, jax.tree.map(lambda x: -lr * x, u))
  masks = np.asarray(masks)
  assert len(masks) == steps // k
  # Fresh masks at random: some leaves kept and some dropped, varying over steps.
  assert 0 < masks.mean() < 1 and len({tuple(m) for m in masks}) > 1


def _run(tx, params, loss_fn, steps=3):
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn))
  p, s, outs = params, tx.init(params), []
  for _ in range(steps):
    u, s = step(p, s)
    outs.append(u)
    p = optax.apply_updates(p, jax.tree.map(lambda x: -0.1 * x, u))
  return outs


@pytest.mark.parametrize(
    "inner, direction, policy",
    [
        (None, None, None),
        (perturbations.adaptive(0.01), directions.gsam(0.3), policies.every(2)),
        (perturbations.vasso(0.5), directions.looksam(0.5), policies.every(2)),
        (perturbations.fisher_mask(0.5, refresh_every=2), None, None),
    ],
    ids=["l2", "adaptive-gsam-every2", "vasso-looksam-every2", "fisher_mask"],
)
def test_random_mask_with_beta_one_is_the_unmasked_variant(inner, direction, policy):
  params, loss_fn = problems.mlp_problem(seed=59)
  plain = perturbations.l2() if inner is None else inner
  a = _run(sam_optax.sharpness_aware(
      0.2, perturbation=perturbations.random_mask(1.0, key=4, inner=inner),
      direction=direction, policy=policy), params, loss_fn)
  b = _run(sam_optax.sharpness_aware(
      0.2, perturbation=plain, direction=direction, policy=policy), params, loss_fn)
  for x, y in zip(a, b):
    chex.assert_trees_all_close(x, y, rtol=1e-6, atol=1e-7)


def test_random_mask_is_shared_by_the_ascent_steps():
  params, loss_fn = problems.mlp_problem(seed=60)
  tx = sam_optax.sharpness_aware(
      0.2, perturbation=perturbations.random_mask(0.5, key=2), num_ascent_steps=3)
  points = []
  step = jax.jit(lambda s: tx.update(
      jax.grad(loss_fn)(params), s, params, grad_fn=_recording_grad(loss_fn, points)))
  s, patterns = tx.init(params), set()
  for _ in range(6):
    points.clear()
    _, s = step(s)
    jax.effects_barrier()
    assert len(points) == 3
    kept = [tuple(bool(np.any(np.asarray(a) != np.asarray(b)))
                  for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(params)))
            for q in points]
    assert kept[0] == kept[1] == kept[2]
    patterns.add(kept[0])
  assert len(patterns) > 1  # but a fresh one at every step


def test_esam_without_selection_is_the_random_mask_composition():
  """ESAM with a gradient closure (no data selection) against its equations:
  a fresh leaf mask kept with probability β, ε = ρ/β · M⊙g/‖M⊙g‖."""
  params, loss_fn = problems.mlp_problem(seed=61)
  grad_fn = jax.grad(loss_fn)
  points = []

  def recording(p):
    jax.debug.callback(lambda q: points.append(flat(q)), p)
    return grad_fn(p)

  tx = sam_optax.esam(0.2, beta=0.5, key=7)
  layout = oracles.Layout.of(params)
  state, patterns = tx.init(params), set()
  for _ in range(4):
    g = flat(grad_fn(params))
    u, state = tx.update(grad_fn(params), state, params, grad_fn=recording)
    jax.effects_barrier()
    w = flat(params)
    offset = points[-1] - w
    kept = tuple(bool(np.any(offset[s] != 0)) for s in layout.slices)
    m = layout.leaf_mask(list(kept))
    np.testing.assert_allclose(
        offset, 0.2 / 0.5 * oracles.unit(m * g), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        flat(u), grad_at(loss_fn, params, w + offset), rtol=1e-5, atol=1e-6
    )
    patterns.add(kept)
    params = jax.tree.map(lambda p, x: p - 0.1 * x, params, u)
  assert len(points) == 4
  assert len(patterns) > 1  # a fresh mask at every step
  assert isinstance(state.variant.perturbation, perturbations.RandomMaskState)


def test_random_noise_with_mix_direction_and_every_k_matches_reference():
  params, loss_fn = problems.mlp_problem(seed=62)
  rho, alpha, k = 0.1, 0.3, 3
  tx = sam_optax.sharpness_aware(
      rho, perturbation=perturbations.random(key=5),
      direction=directions.mix(alpha), policy=policies.every(k))
  points = []
  grad_fn = _recording_grad(loss_fn, points)
  step = jax.jit(lambda s: tx.update(jax.grad(loss_fn)(params), s, params, grad_fn=grad_fn))
  s, g, draws = tx.init(params), flat(jax.grad(loss_fn)(params)), []
  for t in range(7):
    points.clear()
    u, s = step(s)
    jax.effects_barrier()
    if t % k:
      assert not points
      want = g
    else:
      (point,) = points
      draws.append(flat(point) - flat(params))
      # u = α ∇L(w + ε) + (1 − α) g at the point where the gradient was taken.
      want = alpha * grad_at(loss_fn, params, flat(point)) + (1 - alpha) * g
    chex.assert_trees_all_close(_f64(u), unflatten(params, want), rtol=1e-4, atol=1e-6)
  assert len(draws) == 3 and not np.allclose(draws[0], draws[1])


def test_mix_with_alpha_one_is_sam_and_zero_is_the_clean_gradient():
  params, loss_fn = problems.mlp_problem(seed=63)
  a, _ = _update(sam_optax.sharpness_aware(0.1, direction=directions.mix(1.0)), params, loss_fn)
  b, _ = _update(sam_optax.sam(0.1), params, loss_fn)
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)
  c, _ = _update(sam_optax.sharpness_aware(0.1, direction=directions.mix(0.0)), params, loss_fn)
  chex.assert_trees_all_close(c, jax.grad(loss_fn)(params), rtol=1e-6, atol=1e-7)


def test_random_noise_not_relative_is_standard_gaussian():
  # With L = ½‖w‖² and mix(1) (g_p), the output is w + ε, ε ~ N(0, ρ² I).
  rng = np.random.RandomState(8)
  params = {"w": jnp.asarray(10 * rng.randn(32, 16), jnp.float32),
            "b": jnp.asarray(rng.randn(40), jnp.float32)}
  loss_fn = lambda p: 0.5 * sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))
  rho = 0.2
  tx = sam_optax.sharpness_aware(
      rho, perturbation=perturbations.random(key=6, relative=False))
  step = jax.jit(lambda s: tx.update(params, s, params, loss_fn=loss_fn))
  s, z = tx.init(params), []
  for _ in range(5):
    u, s = step(s)
    z.append((flat(u) - flat(params)) / rho)
  z = np.concatenate(z)
  np.testing.assert_allclose([z.mean(), z.std()], [0.0, 1.0], atol=0.05)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: perturbations.random_mask(0.0), r"`random_mask`: `beta` must lie in \(0, 1\]"),
        (lambda: perturbations.random_mask(0.5, key=-1), r"`random_mask`: `key`"),
        (lambda: perturbations.random(key=0.5), r"`random`: `key`"),
        (lambda: perturbations.random(filter_axis=1), r"`random`: `filter_axis`"),
        (lambda: perturbations.random(relative=1), r"`random`: `relative`"),
        (lambda: directions.mix(1.5), r"`mix`: `alpha` must lie in \[0, 1\]"),
    ],
)
def test_random_parts_reject_bad_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()
