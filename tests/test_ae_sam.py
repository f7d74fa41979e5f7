"""AE-SAM: the adaptive gate against a float64 NumPy reference of the policy."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax._transforms.ae_sam import ae_sam_threshold_coefficient
from tests import oracles, problems
from tests.reference import flat, grad_at


# AE-SAM's decisions and statistics from the paper's equations (float64).
reference_policy = oracles.ae_sam_policy


def _varying_norms(steps, seed=0):
  rng = np.random.RandomState(seed)
  norms = np.exp(0.6 * rng.randn(steps))  # log-normal, with spikes
  norms[[7, 19, 31]] *= 4.0
  norms[20:26] *= 0.3  # a flat stretch
  return norms


@pytest.mark.parametrize(
    "delta, lambda_start, lambda_end, total_steps",
    [(0.9, -1.0, 1.0, 30), (0.8, 0.0, 2.0, 10), (0.95, 1.0, -1.0, 40)],
)
def test_gate_matches_reference_and_skipped_steps_skip_the_pass(
    delta, lambda_start, lambda_end, total_steps
):
  params, loss_fn = problems.mlp_problem(seed=81)
  rho, steps = 0.1, 40
  norms = _varying_norms(steps)
  direction = jax.grad(loss_fn)(params)
  unit = jax.tree.map(lambda d: d / optax.tree.norm(direction), direction)
  calls = []

  def grad_fn(p):
    jax.debug.callback(lambda: calls.append(1))
    return jax.grad(loss_fn)(p)

  tx = sam_optax.ae_sam(
      rho, delta, lambda_start, lambda_end, total_steps=total_steps
  )
  step = jax.jit(lambda g, s: tx.update(g, s, params, grad_fn=grad_fn))
  takes, margins, stats = reference_policy(
      norms.astype(np.float32).astype(np.float64) ** 2,
      delta, lambda_start, lambda_end, total_steps,
  )
  assert margins.min() > 1e-4, "test data too close to the threshold"
  assert 0 < takes.mean() < 1, "test data must take and skip the pass"
  s = tx.init(params)
  w = flat(params)
  for t in range(steps):
    scale = jnp.float32(norms[t])
    g = jax.tree.map(lambda d, scale=scale: scale * d, unit)
    before = len(calls)
    u, s = step(g, s)
    jax.effects_barrier()
    took = float(sam_optax.sam_stats(s).pass_taken)
    assert took == float(takes[t]), f"step {t}"
    assert len(calls) - before == int(takes[t])  # the pass ran iff taken
    np.testing.assert_allclose([float(s.variant.policy.mean), float(s.variant.policy.var)], stats[t], rtol=1e-4)
    if takes[t]:  # SAM: ∇L(w + ρ g/‖g‖)
      gf = flat(g)
      want = grad_at(loss_fn, params, w + rho * gf / np.linalg.norm(gf))
      np.testing.assert_allclose(flat(u), want, rtol=1e-4, atol=1e-6)
    else:  # ERM: g itself
      chex.assert_trees_all_equal(u, g)
  assert len(calls) == int(takes.sum())


def test_threshold_coefficient_is_linear_then_constant():
  c = lambda t: float(ae_sam_threshold_coefficient(t, -1.0, 1.0, 100))
  np.testing.assert_allclose([c(0), c(25), c(50), c(100), c(1000)], [-1.0, -0.5, 0.0, 1.0, 1.0], atol=1e-6)


def test_higher_threshold_fewer_sam_steps():
  params, loss_fn = problems.mlp_problem(seed=82)

  def fraction(lam):
    tx = optax.chain(
        sam_optax.ae_sam(0.05, 0.9, lam, lam, total_steps=1), optax.sgd(0.2, momentum=0.9)
    )

    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
      return (optax.apply_updates(p, u), s), sam_optax.sam_stats(s).pass_taken

    _, taken = jax.lax.scan(body, (params, tx.init(params)), length=60)
    return float(taken.mean())

  low, high = fraction(-1.0), fraction(1.5)
  assert low > high
  assert high < 0.5 < low


def test_always_sam_with_very_negative_threshold():
  params, loss_fn = problems.mlp_problem(seed=83)
  tx = sam_optax.ae_sam(0.1, lambda_start=-1e6, lambda_end=-1e6, total_steps=1)
  g = jax.grad(loss_fn)(params)
  a, s = tx.update(g, tx.init(params), params, loss_fn=loss_fn)
  sam = sam_optax.sam(0.1)
  b, _ = sam.update(g, sam.init(params), params, loss_fn=loss_fn)
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)
  assert float(sam_optax.sam_stats(s).pass_taken) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"delta": 1.0}, r"`ae_sam`: `delta` must lie in \[0, 1\); got delta=1.0"),
        ({"delta": -0.1}, r"`ae_sam`: `delta` must lie in \[0, 1\); got delta=-0.1"),
        ({"lambda_start": float("inf")}, r"`ae_sam`: `lambda_start` must be finite; got lambda_start=inf"),
        ({"lambda_end": "1"}, r"`ae_sam`: `lambda_end` must be a real number"),
        ({"total_steps": 0}, r"`ae_sam`: `total_steps` must be an integer >= 1; got total_steps=0"),
        ({"total_steps": 10.5}, r"`total_steps` must be an integer >= 1; got total_steps=10.5"),
        ({"rho": -1.0}, r"`ae_sam`: `rho` must lie in \[0, inf\); got rho=-1.0"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sam_optax.ae_sam(**{"total_steps": 100, **kwargs})


def test_total_steps_is_required():
  with pytest.raises(TypeError, match="total_steps"):
    sam_optax.ae_sam(0.05)
