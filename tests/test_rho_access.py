"""Logging and changing the radius in a training loop: ``sam_stats`` with
``missing=``, ``SAMStats.as_dict``, ``get_rho`` and ``set_rho``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems
from tests.reference import flat, sam_gradient


def _loop(tx, params, loss_fn, steps, rho_at=None):
  """A jitted loop; ``rho_at(t)`` (if given) is set before step t."""
  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  for t in range(steps):
    if rho_at is not None:
      s = sam_optax.set_rho(s, rho_at(t))
    p, s = step(p, s)
  return p, s, step


def test_set_rho_on_an_injected_sam_changes_the_radius_without_recompiling():
  params, loss_fn = problems.mlp_problem(seed=6)
  tx = optax.chain(optax.inject_hyperparams(sam_optax.sam)(rho=0.05), optax.sgd(0.1))
  rhos = [0.05, 0.2, 0.01]
  p, s, step = _loop(tx, params, loss_fn, 3, rho_at=lambda t: rhos[t])
  assert step._cache_size() == 1
  # The reference: three plain two-pass SAM steps at those radii.
  q = params
  for rho in rhos:
    q = jax.tree.map(lambda w, u: w - 0.1 * u, q, sam_gradient(loss_fn, q, rho))
  np.testing.assert_allclose(flat(p), flat(q), rtol=1e-5, atol=1e-7)
  assert float(sam_optax.get_rho(s)) == pytest.approx(0.01)
  assert float(sam_optax.sam_stats(s).rho) == pytest.approx(0.01)


def test_set_rho_on_auto_restarts_the_controller_from_that_radius():
  params, loss_fn = problems.mlp_problem(seed=7)
  tx = optax.chain(sam_optax.sam("auto"), optax.sgd(0.1))
  _, s, _ = _loop(tx, params, loss_fn, 3)
  s = sam_optax.set_rho(s, 0.123)
  assert float(sam_optax.get_rho(s)) == pytest.approx(0.123, rel=1e-6)
  u, s2 = tx.update(jax.grad(loss_fn)(params), s, params, loss_fn=loss_fn)
  assert float(sam_optax.sam_stats(s2).rho) == pytest.approx(0.123, rel=1e-6)


def test_get_rho_of_a_fixed_radius_is_the_last_radius_and_set_rho_names_the_fix():
  params, loss_fn = problems.mlp_problem(seed=8)
  for rho, want in ((0.05, 0.05), (sam_optax.guarded(0.07), 0.07)):
    tx = optax.chain(sam_optax.sam(rho), optax.sgd(0.1))
    _, s, _ = _loop(tx, params, loss_fn, 1)
    assert float(sam_optax.get_rho(s)) == pytest.approx(want)
    with pytest.raises(ValueError, match=r"inject_hyperparams\(sam_optax.sam\)"):
      sam_optax.set_rho(s, 0.1)
  with pytest.raises(ValueError, match="no sharpness-aware transform"):
    sam_optax.set_rho(optax.sgd(0.1).init(params), 0.1)


def test_sam_stats_missing_and_as_dict():
  params, loss_fn = problems.mlp_problem(seed=9)
  plain = optax.sgd(0.1).init(params)
  assert sam_optax.sam_stats(plain) is None
  zeros = sam_optax.sam_stats(plain, missing="zeros")
  assert zeros.as_dict() == {k: 0.0 for k in sam_optax.SAMStats._fields}
  with pytest.raises(ValueError, match='missing="zeros"'):
    sam_optax.sam_stats(plain, missing="raise")
  with pytest.raises(ValueError, match="`missing` must be"):
    sam_optax.sam_stats(plain, missing="zero")
  tx = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1))
  _, s, _ = _loop(tx, params, loss_fn, 1)
  d = sam_optax.sam_stats(s).as_dict()
  assert all(type(v) is float for v in d.values())
  g = flat(jax.grad(loss_fn)(params))
  assert d["grad_norm"] == pytest.approx(float(np.linalg.norm(g)), rel=1e-5)
  assert d["rho"] == pytest.approx(0.05) and d["pass_taken"] == 1.0
