"""SAMSON's operator: the outlier normalization and its edge cases.

The multi-step float64 comparison with the rule lives in the contract suite
(cases ``samson`` and ``samson_p2``, oracle ``tests.oracles.samson``); here the
operator's pieces are checked one at a time against numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import oracles, reference

PARAMS = {
    "kernel": jnp.asarray([[2.0, -0.5, 0.1], [0.0, 0.3, -1.0]]),
    "bias": jnp.zeros(3),  # a zero leaf: T = 1
    "scale": jnp.asarray([0.5, -4.0, 1.0]),
}


def _loss(p):
  x = jnp.asarray([[1.0, -2.0], [0.5, 0.25]])
  out = (x @ p["kernel"] + p["bias"]) * p["scale"]
  return jnp.sum(jnp.sin(out) + 0.1 * out**2)


def _operator(w, eta, norm):
  """SAMSON's T for one leaf, written from the rule (T = 1 on a zero leaf)."""
  n = np.max(np.abs(w)) if norm == "max" else np.linalg.norm(w.ravel())
  return np.ones_like(w) if n == 0 else (np.abs(w) + eta) / n


@pytest.mark.parametrize("norm", ["max", "l2"])
@pytest.mark.parametrize("masked", [False, True])
def test_the_perturbation_is_the_rule(norm, masked):
  eta, rho = 0.01, 0.2
  mask = {"kernel": True, "bias": True, "scale": not masked}
  tx = sam_optax.samson(rho, eta, norm=norm, mask=mask)
  seen = []
  closure = oracles.recording(_loss, seen)  # records the perturbed point
  g = jax.grad(_loss)(PARAMS)
  out, _ = tx.update(g, tx.init(PARAMS), PARAMS, loss_fn=closure)
  leaves = jax.tree.leaves(PARAMS)
  keys = sorted(PARAMS)  # the jax.tree.leaves order of a dict
  t = np.concatenate([
      (np.ones(np.size(w)) if (k == "scale" and masked) else
       _operator(np.asarray(w, np.float64), eta, norm).ravel())
      for k, w in zip(keys, leaves)
  ])
  gv = reference.flat(g)
  eps = rho * t * t * gv / np.linalg.norm(t * gv)
  jax.effects_barrier()
  np.testing.assert_allclose(seen[-1][1] - reference.flat(PARAMS), eps,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
      reference.flat(out),
      reference.grad_at(_loss, PARAMS, reference.flat(PARAMS) + eps),
      rtol=1e-5, atol=1e-6,
  )
  # The layer's largest weight bounds the step of every weight of that layer.
  assert np.all(np.abs(eps) <= rho * (1 + eta / 0.5) + 1e-7)


def test_an_outlier_shrinks_the_rest_of_its_layer():
  # Same weights, one outlier added: the others' operator shrinks by max|W|.
  w = np.asarray([0.2, -0.3, 0.1])
  with_outlier = np.asarray([0.2, -0.3, 0.1, 10.0])
  t, t_out = _operator(w, 0.01, "max"), _operator(with_outlier, 0.01, "max")
  np.testing.assert_allclose(t_out[:3] / t, 0.3 / 10.0)
  d = sam_optax.perturbations.outlier_normalized(0.01)
  g = {"w": jnp.ones(4)}
  got, _ = d.direction(g, {"w": jnp.asarray(with_outlier, jnp.float32)}, d.init(g), 0)
  want = t_out**2 / np.linalg.norm(t_out)
  np.testing.assert_allclose(np.asarray(got["w"]), want, rtol=1e-5)


def test_bad_options_name_the_argument():
  with pytest.raises(ValueError, match=r"`samson`: `norm` must be one of 'max', 'l2'"):
    sam_optax.samson(norm="inf")
  with pytest.raises(ValueError, match=r"`samson`: `eta` must lie in \[0"):
    sam_optax.samson(eta=-1.0)
  with pytest.raises(ValueError, match=r"`samson`: `rho`"):
    sam_optax.samson(rho=-0.1)


def test_composes_with_other_parts():
  # The operator is a part: with GSAM's direction and a policy.
  tx = optax.chain(
      sam_optax.sharpness_aware(
          0.2,
          perturbation=sam_optax.perturbations.outlier_normalized(0.01),
          direction=sam_optax.directions.gsam(0.1),
      ),
      optax.sgd(0.05),
  )
  params, state = PARAMS, tx.init(PARAMS)
  start = float(_loss(params))
  for _ in range(30):
    u, state = tx.update(jax.grad(_loss)(params), state, params, loss_fn=_loss)
    params = optax.apply_updates(params, u)
  assert float(_loss(params)) < start
