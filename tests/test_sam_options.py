"""Core options of `sam`: multi-step ascent and renormalization (StableSAM)."""

from __future__ import annotations

import chex
import jax
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems, reference


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_multistep_ascent_matches_reference(n):
  params, loss_fn = problems.mlp_problem(seed=31)
  grads = jax.grad(loss_fn)(params)
  tx = sam_optax.sam(rho=0.5, num_ascent_steps=n)
  got, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))(
      grads, tx.init(params), params
  )
  want = reference.multistep_sam_gradient(loss_fn, params, 0.5, n)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)
  if n > 1:  # must differ from one-step SAM, or the test could not fail
    one = reference.sam_gradient(loss_fn, params, 0.5)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(got), jax.tree.leaves(one)))
    assert diff > 1e-4


def test_multistep_counts_gradient_evaluations():
  params, loss_fn = problems.mlp_problem(seed=32)
  calls = []

  def grad_fn(p):
    calls.append(1)
    return jax.grad(loss_fn)(p)

  tx = sam_optax.sam(rho=0.5, num_ascent_steps=4)
  jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(
      jax.grad(loss_fn)(params), tx.init(params), params
  )
  # a static count is unrolled: one trace per evaluation, the clean gradient
  # never recomputed (3 ascent evaluations, then the final gradient)
  assert len(calls) == 4


def test_multistep_with_injected_step_count():
  params, loss_fn = problems.mlp_problem(seed=33)
  grads = jax.grad(loss_fn)(params)
  tx = optax.inject_hyperparams(sam_optax.sam)(rho=0.5, num_ascent_steps=3)
  got, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))(
      grads, tx.init(params), params
  )
  want = reference.multistep_sam_gradient(loss_fn, params, 0.5, 3)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3])
def test_renormalize_rescales_to_clean_gradient_norm(n):
  params, loss_fn = problems.mlp_problem(seed=34)
  grads = jax.grad(loss_fn)(params)
  tx = sam_optax.sam(rho=0.5, num_ascent_steps=n, renormalize=True)
  got, state = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
  want = reference.renormalized(
      reference.multistep_sam_gradient(loss_fn, params, 0.5, n), grads
  )
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
      state.stats.perturbed_grad_norm, state.stats.grad_norm, rtol=1e-5
  )


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_invalid_num_ascent_steps(value):
  with pytest.raises(ValueError, match=r"`num_ascent_steps` must be an integer >= 1"):
    sam_optax.sam(num_ascent_steps=value)


def test_invalid_renormalize():
  with pytest.raises(ValueError, match=r"`renormalize` must be True or False"):
    sam_optax.sam(renormalize=1)
