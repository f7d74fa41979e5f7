"""Worst-case, adaptive, average-case and m-sharpness against exact answers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sam_optax import sharpness
from tests import sharpness_problems as sp

KEY = jax.random.key(0)
SPECTRUM = [8.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05]
QUAD = sp.quadratic(SPECTRUM, seed=5)
QUAD_LINEAR = sp.quadratic(SPECTRUM, seed=6, linear_scale=1.0)


def _trust_region_max(h, g, rho):
  """max_{‖ε‖≤ρ} gᵀε + ½ εᵀHε for symmetric H, by the secular equation.

  The maximizer is ε(μ) = (μI − H)⁻¹ g with μ > λ_max and ‖ε(μ)‖ = ρ
  (the generic case: g not orthogonal to the top eigenvector); μ by
  bisection.
  """
  lam, q = np.linalg.eigh(h)
  gq = q.T @ g

  def norm(mu):
    return np.sqrt(np.sum((gq / (mu - lam)) ** 2))

  lo, hi = lam[-1] + 1e-12, lam[-1] + np.linalg.norm(g) / rho + 1.0
  assert norm(lo) > rho > norm(hi)
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if norm(mid) > rho else (lo, mid)
  eps = q @ (gq / (0.5 * (lo + hi) - lam))
  return float(g @ eps + 0.5 * eps @ h @ eps)


@pytest.mark.parametrize("rho", [0.05, 0.3])
def test_at_the_minimum_of_a_quadratic_it_is_rho_squared_lambda_max_over_two(rho):
  res = sharpness.worst_case_sharpness(QUAD.loss_fn, QUAD.at(QUAD.center), rho)
  want = 0.5 * rho ** 2 * np.linalg.eigvalsh(QUAD.hessian)[-1]
  np.testing.assert_allclose(res.sharpness, want, rtol=2e-3)
  eps = QUAD.flatten(res.perturbation)
  assert np.linalg.norm(eps) <= rho * (1 + 1e-5)
  np.testing.assert_allclose(
      res.perturbed_loss, QUAD.value(QUAD.center + eps), rtol=1e-4, atol=1e-7
  )
  np.testing.assert_allclose(res.loss, 0.0, atol=1e-6)


def test_away_from_the_minimum_it_solves_the_trust_region_problem():
  x = QUAD_LINEAR.center + 0.2
  g = QUAD_LINEAR.linear + QUAD_LINEAR.hessian @ (x - QUAD_LINEAR.center)
  rho = 0.5
  res = sharpness.worst_case_sharpness(QUAD_LINEAR.loss_fn, QUAD_LINEAR.at(x), rho)
  want = _trust_region_max(QUAD_LINEAR.hessian, g, rho)
  np.testing.assert_allclose(res.sharpness, want, rtol=2e-3)
  # num_steps=0 is the one-step SAM perturbation ρ g / ‖g‖, a lower bound.
  one = sharpness.worst_case_sharpness(
      QUAD_LINEAR.loss_fn, QUAD_LINEAR.at(x), rho, num_steps=0
  )
  e = rho * g / np.linalg.norm(g)
  want_one = g @ e + 0.5 * e @ QUAD_LINEAR.hessian @ e
  np.testing.assert_allclose(one.sharpness, want_one, rtol=1e-3)
  assert float(one.sharpness) < want * (1 - 1e-2)


def test_adaptive_sharpness_at_the_minimum_uses_the_rescaled_hessian():
  rho, eta = 0.2, 0.01
  res = sharpness.worst_case_sharpness(
      QUAD.loss_fn, QUAD.at(QUAD.center), rho, adaptive=True, eta=eta
  )
  t = np.diag(np.abs(QUAD.center.astype(np.float32)) + eta)
  want = 0.5 * rho ** 2 * np.linalg.eigvalsh(t @ QUAD.hessian @ t)[-1]
  np.testing.assert_allclose(res.sharpness, want, rtol=2e-3)
  eps = QUAD.flatten(res.perturbation)
  assert np.linalg.norm(eps / np.diag(t)) <= rho * (1 + 1e-5)
  plain = 0.5 * rho ** 2 * SPECTRUM[0]
  assert abs(want - plain) > 0.1 * plain  # the two balls really differ here


def test_zero_radius_gives_zero_and_sweep_follows_the_quadratic_law():
  res = sharpness.worst_case_sharpness(QUAD.loss_fn, QUAD.at(QUAD.center), 0.0)
  assert float(res.sharpness) == 0.0
  rhos = np.array([0.0, 0.02, 0.1, 0.4])
  got = sharpness.sharpness_vs_rho(QUAD.loss_fn, QUAD.at(QUAD.center), rhos)
  assert got.shape == (4,)
  np.testing.assert_allclose(got, 0.5 * rhos ** 2 * SPECTRUM[0], rtol=2e-3, atol=1e-8)


def test_on_an_mlp_it_beats_random_directions_within_the_ball():
  params, loss_fn, _ = sp.mlp()
  rho = 0.3
  res = sharpness.worst_case_sharpness(loss_fn, params, rho)
  assert sp.np.linalg.norm(sp.flat(res.perturbation)) <= rho * (1 + 1e-5)
  flat0, unravel = ravel_pytree(params)
  d = jax.random.normal(KEY, (64, flat0.size))
  points = flat0 + rho * d / jnp.linalg.norm(d, axis=1, keepdims=True)
  losses = jax.jit(jax.vmap(lambda x: loss_fn(unravel(x))))(points)
  random_increase = losses - loss_fn(params)
  assert float(jnp.max(random_increase)) < float(res.sharpness)


def test_average_case_sharpness_is_half_sigma_squared_trace():
  sigma = 0.05
  res = sharpness.average_case_sharpness(
      QUAD.loss_fn, QUAD.at(QUAD.center), sigma, key=KEY, num_samples=2000,
      batch_size=500,
  )
  want = 0.5 * sigma ** 2 * sum(SPECTRUM)
  assert abs(float(res.sharpness) - want) < 4.5 * float(res.std_error)
  # ½ εᵀHε with ε ~ N(0, σ²I): variance σ⁴ tr(H²)/2.
  sd = sigma ** 2 * np.sqrt(0.5 * np.sum(np.square(SPECTRUM)))
  np.testing.assert_allclose(res.std_error, sd / np.sqrt(2000), rtol=0.15)


def test_adaptive_average_case_sharpness_uses_the_rescaled_hessian():
  sigma, eta = 0.05, 0.01
  res = sharpness.average_case_sharpness(
      QUAD.loss_fn, QUAD.at(QUAD.center), sigma, key=KEY, num_samples=2000,
      adaptive=True, eta=eta, batch_size=500,
  )
  t = np.diag(np.abs(QUAD.center.astype(np.float32)) + eta)
  want = 0.5 * sigma ** 2 * np.trace(t @ QUAD.hessian @ t)
  assert abs(float(res.sharpness) - want) < 4.5 * float(res.std_error)
  assert abs(want - 0.5 * sigma ** 2 * sum(SPECTRUM)) > 10 * float(res.std_error)


def _per_example_quadratics(n=8, dim=7, seed=0):
  """Example i has loss ½ (w − c)ᵀ H_i (w − c); all share the minimum c."""
  rng = np.random.RandomState(seed)
  a = rng.randn(n, dim, dim) / np.sqrt(dim)
  hs = np.einsum("nij,nkj->nik", a, a) * rng.uniform(0.5, 5.0, size=(n, 1, 1))
  c = rng.randn(dim)

  def loss_fn(w, batch):
    d = w - jnp.asarray(c, jnp.float32)
    return 0.5 * jnp.mean(jnp.einsum("i,nij,j->n", d, batch, d))

  return hs, c, loss_fn


@pytest.mark.parametrize("group_size", [2, 8])
def test_m_sharpness_averages_per_group_maxima(group_size):
  hs, c, loss_fn = _per_example_quadratics()
  rho = 0.1
  res = sharpness.m_sharpness(
      loss_fn, jnp.asarray(c, jnp.float32), jnp.asarray(hs, jnp.float32), rho,
      group_size=group_size, num_steps=150, step_size=2.0,
  )
  groups = hs.reshape(-1, group_size, *hs.shape[1:]).mean(axis=1)
  want = 0.5 * rho ** 2 * np.linalg.eigvalsh(groups)[:, -1]
  np.testing.assert_allclose(res.group_sharpness, want, rtol=2e-3)
  np.testing.assert_allclose(res.sharpness, want.mean(), rtol=2e-3)
  np.testing.assert_allclose(res.group_loss, 0.0, atol=1e-6)
  if group_size == 8:  # one group: the full-batch worst case
    full = sharpness.worst_case_sharpness(
        lambda w: loss_fn(w, jnp.asarray(hs, jnp.float32)), jnp.asarray(c, jnp.float32),
        rho, num_steps=150, step_size=2.0,
    )
    np.testing.assert_allclose(res.sharpness, full.sharpness, rtol=1e-3)


@pytest.mark.parametrize(
    "fn, kwargs, match",
    [
        ("worst", {"rho": -0.1}, r"`rho` must lie in \[0, inf\); got rho=-0.1"),
        ("worst", {"num_steps": -1},
         r"`num_steps` must lie in \[0, inf\); got num_steps=-1"),
        ("worst", {"step_size": 0.0},
         r"`step_size` must lie in \(0, inf\); got step_size=0.0"),
        ("worst", {"eta": -1.0}, r"`eta` must lie in \[0, inf\)"),
        ("sweep", {"rhos": [0.1, -0.1]},
         r"every radius in `rhos` must lie in \[0, inf\)"),
        ("sweep", {"rhos": [[0.1]]}, r"`rhos` must be a non-empty 1-D array"),
        ("average", {"sigma": -1.0}, r"`sigma` must lie in \[0, inf\); got sigma=-1.0"),
        ("average", {"num_samples": 0}, r"`num_samples` must lie in \[1, inf\)"),
        ("m", {"group_size": 3},
         r"`group_size` must divide the batch size 8; got group_size=3"),
        ("m", {"group_size": 0},
         r"`group_size` must lie in \[1, inf\); got group_size=0"),
    ],
)
def test_bad_arguments_are_named(fn, kwargs, match):
  w = jnp.zeros(7)
  hs, _, batch_loss = _per_example_quadratics()

  def loss_fn(p):
    return batch_loss(p, jnp.asarray(hs, jnp.float32))

  with pytest.raises(ValueError, match=match):
    if fn == "worst":
      sharpness.worst_case_sharpness(loss_fn, w, **{"rho": 0.1, **kwargs})
    elif fn == "sweep":
      sharpness.sharpness_vs_rho(loss_fn, w, **kwargs)
    elif fn == "average":
      sharpness.average_case_sharpness(
          loss_fn, w, key=KEY, **{"sigma": 0.1, **kwargs}
      )
    else:
      sharpness.m_sharpness(batch_loss, w, jnp.asarray(hs, jnp.float32), 0.1, **kwargs)
