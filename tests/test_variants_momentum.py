"""F-SAM, VaSSO and Fisher SAM against their papers' update rules (float64 NumPy).

The references below are written from the papers' equations, independently of
the package: parameters are one flat float64 vector, gradients come from
``jax.grad`` of the loss at that vector (``tests.reference.grad_at``), and the
state-carrying variants are run for several steps feeding plain SGD.
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

LR = 0.2


def _trajectory(tx, params, loss_fn, steps, lr=LR):
  """Flat parameters after each of ``steps`` jitted steps of ``chain(tx, sgd)``."""
  chained = optax.chain(tx, optax.sgd(lr))

  @jax.jit
  def step(p, s):
    updates, s = chained.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, updates), s

  p, s = params, chained.init(params)
  out = []
  for _ in range(steps):
    p, s = step(p, s)
    out.append(flat(p))
  return out, s


def _unit(v):
  n = np.linalg.norm(v)
  return v / n if n > 0 else np.zeros_like(v)


def _check_trajectory(got, want, rtol=2e-4, atol=2e-5):
  assert len(got) == len(want)
  for t, (a, b) in enumerate(zip(got, want)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"step {t}")


# ---------------------------------------------------------------------- F-SAM

def _friendly_sam_reference(loss_fn, params, rho, sigma, lam, steps, rho_at=None):
  """Li et al. 2024: d = g - σ m_{t-1}, m_t = λ m_{t-1} + (1-λ) g; first step d = m = g."""
  w = flat(params)
  m = None
  out, momenta = [], []
  for t in range(steps):
    g = grad_at(loss_fn, params, w)
    if m is None:
      d, m = g, g
    else:
      d = g - sigma * m
      m = lam * m + (1 - lam) * g
    r = rho if rho_at is None else rho_at(t)
    u = grad_at(loss_fn, params, w + r * _unit(d)) if r > 0 else g
    w = w - LR * u
    out.append(w)
    momenta.append(m)
  return out, momenta


@pytest.mark.parametrize("sigma,lam", [(1.0, 0.6), (0.5, 0.9)])
def test_friendly_sam_matches_paper_over_steps(sigma, lam):
  params, loss_fn = problems.mlp_problem(seed=51)
  rho, steps = 0.3, 6
  got, state = _trajectory(sam_optax.friendly_sam(rho, sigma, lam), params, loss_fn, steps)
  want, momenta = _friendly_sam_reference(loss_fn, params, rho, sigma, lam, steps)
  _check_trajectory(got, want)
  momentum = state[0].variant.perturbation.momentum
  np.testing.assert_allclose(flat(momentum), momenta[-1], rtol=2e-4, atol=2e-6)


def test_friendly_sam_momentum_tracks_clean_gradients_while_rho_is_zero():
  params, loss_fn = problems.mlp_problem(seed=52)
  rho_at = lambda t: 0.0 if t < 2 else 0.3
  schedule = lambda count: jnp.where(count < 2, 0.0, 0.3)
  steps = 5
  got, _ = _trajectory(sam_optax.friendly_sam(schedule, 1.0, 0.6), params, loss_fn, steps)
  want, _ = _friendly_sam_reference(loss_fn, params, None, 1.0, 0.6, steps, rho_at)
  _check_trajectory(got, want)


def test_friendly_sam_first_step_and_sigma_zero_are_sam():
  params, loss_fn = problems.mlp_problem(seed=53)
  sam_path, _ = _trajectory(sam_optax.sam(0.2), params, loss_fn, 4)
  first, _ = _trajectory(sam_optax.friendly_sam(0.2, sigma=1.0), params, loss_fn, 1)
  np.testing.assert_allclose(first[0], sam_path[0], rtol=1e-6, atol=1e-7)
  no_sigma, _ = _trajectory(sam_optax.friendly_sam(0.2, sigma=0.0), params, loss_fn, 4)
  _check_trajectory(no_sigma, sam_path, rtol=1e-5, atol=1e-6)
  # With σ=1 the later steps differ from SAM: the test above can fail.
  later, _ = _trajectory(sam_optax.friendly_sam(0.2, sigma=1.0), params, loss_fn, 4)
  assert np.max(np.abs(later[-1] - sam_path[-1])) > 1e-4


def test_friendly_sam_zero_direction_is_finite():
  # A linear loss has a constant gradient: from step 1 on, d = g - m = 0.
  params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
  coef = {"a": jnp.array([0.3, -0.7]), "b": jnp.array(2.0)}
  loss_fn = lambda p: sum(jnp.sum(c * x) for c, x in zip(jax.tree.leaves(coef), jax.tree.leaves(p)))
  got, state = _trajectory(sam_optax.friendly_sam(0.1, 1.0, 0.6), params, loss_fn, 3)
  assert all(np.all(np.isfinite(v)) for v in got)
  want = flat(params) - LR * 3 * flat(coef)  # the gradient never changes
  np.testing.assert_allclose(got[-1], want, rtol=1e-6, atol=1e-6)
  assert all(bool(jnp.isfinite(x)) for x in sam_optax.sam_stats(state))


def test_friendly_sam_bad_hyperparameters():
  with pytest.raises(ValueError, match=r"`friendly_sam`: `sigma` must lie in \[0, inf\); got sigma=-1"):
    sam_optax.friendly_sam(0.1, sigma=-1.0)
  with pytest.raises(ValueError, match=r"`lam` must lie in \[0, 1\]; got lam=1.5"):
    sam_optax.friendly_sam(0.1, lam=1.5)


# ---------------------------------------------------------------------- VaSSO

def _vasso_reference(loss_fn, params, rho, theta, steps, ascent_steps=1):
  """Li & Giannakis 2023: d_t = (1-θ) d_{t-1} + θ g_t (d_0 = g_0), ε = ρ d_t/‖d_t‖.

  With several ascent steps, each later one averages the gradient at the
  intermediate point into the previous step's d (d itself is updated once).
  """
  w = flat(params)
  d_prev = None
  out, ds = [], []
  for _ in range(steps):
    def avg(g, d_prev=d_prev):
      return g if d_prev is None else (1 - theta) * d_prev + theta * g

    g = grad_at(loss_fn, params, w)
    d = avg(g)
    offset = (rho / ascent_steps) * _unit(d)
    for _ in range(ascent_steps - 1):
      g_k = grad_at(loss_fn, params, w + offset)
      offset = offset + (rho / ascent_steps) * _unit(avg(g_k))
    u = grad_at(loss_fn, params, w + offset)
    w = w - LR * u
    d_prev = d
    out.append(w)
    ds.append(d)
  return out, ds


@pytest.mark.parametrize("theta", [0.9, 0.4])
def test_vasso_matches_paper_over_steps(theta):
  params, loss_fn = problems.mlp_problem(seed=54)
  rho, steps = 0.3, 6
  got, state = _trajectory(sam_optax.vasso(rho, theta), params, loss_fn, steps)
  want, ds = _vasso_reference(loss_fn, params, rho, theta, steps)
  _check_trajectory(got, want)
  np.testing.assert_allclose(flat(state[0].variant.perturbation.d), ds[-1], rtol=2e-4, atol=2e-6)


def test_vasso_two_ascent_steps_match_reference():
  params, loss_fn = problems.mlp_problem(seed=55)
  got, _ = _trajectory(sam_optax.vasso(0.3, 0.5, num_ascent_steps=2), params, loss_fn, 4)
  want, _ = _vasso_reference(loss_fn, params, 0.3, 0.5, 4, ascent_steps=2)
  _check_trajectory(got, want)


def test_vasso_theta_one_and_first_step_are_sam():
  params, loss_fn = problems.mlp_problem(seed=56)
  sam_path, _ = _trajectory(sam_optax.sam(0.2), params, loss_fn, 4)
  theta_one, _ = _trajectory(sam_optax.vasso(0.2, theta=1.0), params, loss_fn, 4)
  _check_trajectory(theta_one, sam_path, rtol=1e-5, atol=1e-6)
  path, _ = _trajectory(sam_optax.vasso(0.2, theta=0.3), params, loss_fn, 4)
  np.testing.assert_allclose(path[0], sam_path[0], rtol=1e-6, atol=1e-7)
  assert np.max(np.abs(path[-1] - sam_path[-1])) > 1e-4


def test_vasso_bad_theta():
  with pytest.raises(ValueError, match=r"`vasso`: `theta` must lie in \[0, 1\]; got theta=1.1"):
    sam_optax.vasso(0.1, theta=1.1)


# ----------------------------------------------------------------- Fisher SAM

def _fisher_epsilon(g, rho, eta):
  """Kim et al. 2022: ε = ρ F⁻¹g / sqrt(gᵀF⁻¹g), F = diag(1 + η g²)."""
  f = 1.0 + eta * g * g
  q = g @ (g / f)
  return rho * (g / f) / np.sqrt(q) if q > 0 else np.zeros_like(g)


@pytest.mark.parametrize("eta", [0.5, 40.0])
def test_fisher_sam_matches_paper_over_steps(eta):
  params, loss_fn = problems.mlp_problem(seed=57)
  rho, steps = 0.3, 3
  got, _ = _trajectory(sam_optax.fisher_sam(rho, eta), params, loss_fn, steps)
  w, want = flat(params), []
  for _ in range(steps):
    g = grad_at(loss_fn, params, w)
    w = w - LR * grad_at(loss_fn, params, w + _fisher_epsilon(g, rho, eta))
    want.append(w)
  _check_trajectory(got, want)


def test_fisher_sam_perturbation_solves_the_ellipsoid_problem():
  params, loss_fn = problems.mlp_problem(seed=58)
  rho, eta = 0.3, 20.0
  seen = []

  def grad_fn(p):  # called eagerly: records the perturbed point
    seen.append(flat(p))
    return jax.grad(loss_fn)(p)

  tx = sam_optax.fisher_sam(rho, eta)
  grads = jax.grad(loss_fn)(params)
  tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
  (point,) = seen
  g = flat(grads)
  eps = point - flat(params)
  f = 1.0 + eta * g * g
  np.testing.assert_allclose(eps @ (f * eps), rho**2, rtol=1e-4)  # on the ellipsoid
  # First-order optimality: no point of the ellipsoid has a larger gᵀε.
  rng = np.random.RandomState(0)
  for _ in range(200):
    v = rng.randn(g.size)
    v = rho * v / np.sqrt(v @ (f * v))
    assert g @ v <= g @ eps * (1 + 1e-5)
  # ... and it differs from SAM's ball (the ellipsoid is not a sphere here).
  assert np.linalg.norm(eps - rho * _unit(g)) > 1e-3


def test_fisher_sam_eta_zero_is_sam():
  params, loss_fn = problems.mlp_problem(seed=59)
  a, _ = _trajectory(sam_optax.fisher_sam(0.2, eta=0.0), params, loss_fn, 3)
  b, _ = _trajectory(sam_optax.sam(0.2), params, loss_fn, 3)
  _check_trajectory(a, b, rtol=1e-6, atol=1e-7)


def test_fisher_sam_bad_eta():
  with pytest.raises(ValueError, match=r"`fisher_sam`: `eta` must lie in \[0, inf\); got eta=-0.5"):
    sam_optax.fisher_sam(0.1, eta=-0.5)


# ------------------------------------------------------------------- shared

@pytest.mark.parametrize(
    "factory",
    [
        lambda rho: sam_optax.friendly_sam(rho, 1.0, 0.6),
        lambda rho: sam_optax.vasso(rho, 0.9),
        lambda rho: sam_optax.fisher_sam(rho, 1.0),
    ],
    ids=["friendly_sam", "vasso", "fisher_sam"],
)
def test_zero_gradient_on_the_first_step_is_finite(factory):
  # Step 0 sees a zero gradient (the state starts from it), later steps do not.
  params = {"a": jnp.zeros(3), "b": jnp.array(0.0)}
  at_rest = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
  shifted = lambda p: at_rest(jax.tree.map(lambda x: x - 1.0, p))
  chained = optax.chain(factory(0.1), optax.sgd(LR))
  p, s = params, chained.init(params)
  for t, loss_fn in enumerate([at_rest, shifted, shifted]):
    updates, s = chained.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert all(bool(jnp.isfinite(x)) for x in sam_optax.sam_stats(s))
    if t == 0:
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    else:
      assert float(optax.tree.norm(updates)) > 0
    p = optax.apply_updates(p, updates)


@pytest.mark.parametrize(
    "factory,kwargs",
    [
        (sam_optax.friendly_sam, {"sigma": 1.0, "lam": 0.6}),
        (sam_optax.vasso, {"theta": 0.9}),
    ],
    ids=["friendly_sam", "vasso"],
)
def test_state_buffers_are_float32_for_bfloat16_params(factory, kwargs):
  params, _ = problems.mlp_problem(dtype=jnp.bfloat16)
  state = factory(0.1, **kwargs).init(params)
  for leaf in jax.tree.leaves(state.variant):
    assert leaf.dtype == jnp.float32
  chex.assert_trees_all_equal_shapes(state.variant.perturbation[0], params)
