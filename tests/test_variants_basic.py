"""ASAM, USAM, GSAM and LookSAM against their papers' update rules (float64 NumPy)."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems
from tests.reference import flat, grad_at, unflatten


def _update(tx, params, loss_fn, state=None):
  grads = jax.grad(loss_fn)(params)
  state = tx.init(params) if state is None else state
  return jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))(grads, state, params)


def _close(got, params, want_vector, rtol=1e-4, atol=1e-6):
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: np.asarray(x, np.float64), got),
      unflatten(params, want_vector), rtol=rtol, atol=atol,
  )


# ----------------------------------------------------------------------- ASAM

@pytest.mark.parametrize("masked", [False, True])
def test_asam_matches_paper(masked):
  params, loss_fn = problems.mlp_problem(seed=41)
  rho, eta = 0.5, 0.01
  mask = None
  if masked:  # biases and the temperature are not adaptive
    mask = {"layer1": {"w": True, "b": False}, "layer2": (True, False), "temperature": False}
  got, _ = _update(sam_optax.asam(rho, eta, mask=mask), params, loss_fn)
  w, g = flat(params), flat(jax.grad(loss_fn)(params))
  adaptive = flat(jax.tree.map(lambda x: jnp.ones_like(x), params)) if mask is None else flat(
      jax.tree.map(lambda m, x: jnp.full(x.shape, float(m)), mask, params))
  t = np.where(adaptive > 0, np.abs(w) + eta, 1.0)
  eps = rho * t * t * g / np.linalg.norm(t * g)
  _close(got, params, grad_at(loss_fn, params, w + eps))


def test_asam_mask_as_callable_equals_tree():
  params, loss_fn = problems.mlp_problem(seed=42)
  tree_mask = jax.tree.map(lambda x: x.ndim == 2, params)
  a, _ = _update(sam_optax.asam(0.5, mask=tree_mask), params, loss_fn)
  b, _ = _update(
      sam_optax.asam(0.5, mask=lambda p: jax.tree.map(lambda x: x.ndim == 2, p)),
      params, loss_fn,
  )
  chex.assert_trees_all_equal(a, b)


def test_asam_is_scale_invariant_where_sam_is_not():
  # ASAM's perturbation of a rescaled two-layer linear net is the rescaled
  # perturbation; SAM's is not. Scale layer 1 by c and layer 2 by 1/c.
  x = jnp.asarray(np.random.RandomState(0).randn(16, 3), jnp.float32)
  y = jnp.asarray(np.random.RandomState(1).randn(16, 2), jnp.float32)
  loss_fn = lambda p: jnp.mean((x @ p["a"] @ p["b"] - y) ** 2)
  rng = np.random.RandomState(2)
  p = {"a": jnp.asarray(rng.randn(3, 4), jnp.float32), "b": jnp.asarray(rng.randn(4, 2), jnp.float32)}
  c = 4.0
  q = {"a": p["a"] * c, "b": p["b"] / c}

  def perturbed_loss(tx, params):
    _, state = _update(tx, params, loss_fn)
    return float(sam_optax.sam_stats(state).perturbed_loss)

  # η = 0 (exact invariance) is ASAM's geometry composed by hand: `asam`
  # itself requires η > 0.
  asam = sam_optax.sharpness_aware(
      0.5, perturbation=sam_optax.perturbations.adaptive(eta=0.0)
  )
  np.testing.assert_allclose(perturbed_loss(asam, p), perturbed_loss(asam, q), rtol=1e-4)
  sam = sam_optax.sam(0.5)
  assert abs(perturbed_loss(sam, p) - perturbed_loss(sam, q)) > 1e-2


def test_asam_bad_mask():
  params, loss_fn = problems.mlp_problem()
  with pytest.raises(ValueError, match=r"`mask` must have the tree structure"):
    sam_optax.asam(0.5, mask={"layer1": True}).init(params)
  with pytest.raises(ValueError, match=r"`eta` must lie in \(0, inf\); got eta=-1"):
    sam_optax.asam(0.5, eta=-1)


@pytest.mark.parametrize("eta", [0, 0.0, -0.0, np.float32(0.0)])
def test_asam_rejects_a_zero_eta_at_construction(eta):
  # The docstring promises η > 0: η = 0 leaves zero weights unperturbable.
  match = r"^`asam`: `eta` must lie in \(0, inf\); got eta=" + re.escape(repr(eta))
  with pytest.raises(ValueError, match=match):
    sam_optax.asam(0.5, eta=eta)
  sam_optax.asam(0.5, eta=1e-8)  # any positive offset is accepted


# ----------------------------------------------------------------------- USAM

def test_usam_matches_paper():
  params, loss_fn = problems.mlp_problem(seed=43)
  got, _ = _update(sam_optax.usam(0.3), params, loss_fn)
  w, g = flat(params), flat(jax.grad(loss_fn)(params))
  _close(got, params, grad_at(loss_fn, params, w + 0.3 * g))


# ----------------------------------------------------------------------- GSAM

@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_gsam_matches_paper(alpha):
  params, loss_fn = problems.mlp_problem(seed=44)
  rho = 0.2
  got, _ = _update(sam_optax.gsam(rho, alpha), params, loss_fn)
  w, g = flat(params), flat(jax.grad(loss_fn)(params))
  g_p = grad_at(loss_fn, params, w + rho * g / np.linalg.norm(g))
  unit = g_p / np.linalg.norm(g_p)
  g_perp = g - (g @ unit) * unit
  _close(got, params, g_p - alpha * g_perp)


def test_gsam_orthogonal_part_is_orthogonal():
  params, loss_fn = problems.mlp_problem(seed=45)
  rho, alpha = 0.2, 1.0
  got_a, _ = _update(sam_optax.gsam(rho, alpha), params, loss_fn)
  got_0, _ = _update(sam_optax.gsam(rho, 0.0), params, loss_fn)
  diff = flat(got_0) - flat(got_a)  # = alpha * g_perp
  np.testing.assert_allclose(diff @ flat(got_0) / np.linalg.norm(flat(got_0)), 0.0, atol=1e-5)


def test_gsam_rho_schedule_follows_learning_rate():
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.4, 10, 100, end_value=0.0)
  rho = sam_optax.gsam_rho_schedule(lr, rho_max=0.6, rho_min=0.1, lr_max=0.4, lr_min=0.0)
  for t in [0, 5, 10, 50, 100]:
    want = 0.1 + 0.5 * float(lr(t)) / 0.4
    np.testing.assert_allclose(float(rho(t)), want, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match=r"`learning_rate` must be a schedule"):
    sam_optax.gsam_rho_schedule(0.1, rho_max=0.1, rho_min=0.0, lr_max=0.1)
  with pytest.raises(ValueError, match=r"`lr_max`"):
    sam_optax.gsam_rho_schedule(lr, rho_max=0.1, rho_min=0.0, lr_max=0.0)


# -------------------------------------------------------------------- LookSAM

def test_looksam_matches_paper_over_steps():
  params, loss_fn = problems.mlp_problem(seed=46)
  rho, k, alpha, lr, steps = 0.2, 3, 0.7, 0.2, 8
  tx = optax.chain(sam_optax.looksam(rho, k, alpha), optax.sgd(lr))
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn))
  p, s = params, tx.init(params)
  w = flat(params)
  g_v = np.zeros_like(w)
  took = []
  for t in range(steps):
    updates, s = step(p, s)
    p = optax.apply_updates(p, updates)
    took.append(float(sam_optax.sam_stats(s).pass_taken))
    g = grad_at(loss_fn, params, w)
    if t % k == 0:
      g_s = grad_at(loss_fn, params, w + rho * g / np.linalg.norm(g))
      cos = g_s @ g / (np.linalg.norm(g_s) * np.linalg.norm(g))
      g_v = g_s - np.linalg.norm(g_s) * cos * g / np.linalg.norm(g)
      u = g_s
    else:
      u = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
    w = w - lr * u
    np.testing.assert_allclose(flat(p), w, rtol=1e-4, atol=1e-5)
  assert took == [1.0 if t % k == 0 else 0.0 for t in range(steps)]


def test_looksam_really_skips_the_second_pass():
  params, loss_fn = problems.mlp_problem(seed=47)
  calls = []

  def grad_fn(p):
    jax.debug.callback(lambda: calls.append(1))  # runs only if executed
    return jax.grad(loss_fn)(p)

  tx = sam_optax.looksam(0.1, k=4)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, grad_fn=grad_fn))
  s = tx.init(params)
  for _ in range(10):
    _, s = step(params, s)
    jax.effects_barrier()
  assert len(calls) == 3  # steps 0, 4, 8


def test_looksam_k1_is_sam():
  params, loss_fn = problems.mlp_problem(seed=48)
  a, _ = _update(sam_optax.looksam(0.1, k=1), params, loss_fn)
  b, _ = _update(sam_optax.sam(0.1), params, loss_fn)
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [0, 2.5, True])
def test_looksam_bad_k(k):
  with pytest.raises(ValueError, match=r"`k` must be an integer >= 1"):
    sam_optax.looksam(0.1, k=k)
