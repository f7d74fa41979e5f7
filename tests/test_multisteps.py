"""Gradient accumulation with SAM: where ``optax.MultiSteps`` goes.

A batch is split into ``k`` micro-batches with losses ``L_1 … L_k`` (equal
sizes, so the batch loss is their mean). There are three ways to combine
SAM with accumulation; they differ in what is averaged.

1. **SAM outside the accumulation (recommended):**
   ``optax.chain(sam(rho), optax.MultiSteps(base, k).gradient_transformation())``,
   called once per micro-batch with that micro-batch's clean gradient and
   loss closure. Each micro-step computes its own SAM gradient
   ``u_i = ∇L_i(w + ρ g_i/‖g_i‖)``; ``MultiSteps`` averages them and ``base``
   takes one step with ``mean_i u_i`` every ``k`` micro-steps (the weights do
   not move in between, so every ``u_i`` is taken at the same ``w``). This
   is SAM with a perturbation per micro-batch (``m``-sharpness with ``m`` the
   micro-batch size). Cost: two passes per micro-batch. ``sam``'s own
   ``count`` (and so a ``rho`` schedule, or LookSAM's period) advances once
   per micro-batch.

2. **SAM inside the accumulation (rejected):**
   ``optax.MultiSteps(optax.chain(sam(rho), base), k)``. ``MultiSteps``
   would hand the inner chain the running mean of the *clean* gradients
   together with the *current* micro-batch's closure, at every micro-step,
   and keep only the last result: ``∇L_k(w + ρ ḡ/‖ḡ‖)``, the perturbed
   gradient of the last micro-batch alone, at two passes per micro-step.
   The transform raises when it is traced inside ``MultiSteps.update``,
   with form 1 as the fix.

3. **Accumulation inside the closure (large-batch SAM):** pass the mean
   clean gradient as ``updates`` and a ``grad_fn`` that averages the
   micro-batch gradients at the point it is given (a ``jax.lax.scan`` or
   ``jax.lax.map`` over the micro-batches). This is exactly SAM on the whole
   batch, ``∇L(w + ρ ḡ/‖ḡ‖)`` with ``L = mean_i L_i``, at two passes per
   micro-batch, with all micro-batches at hand in one call.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems, reference

K = 4
RHO = 0.1
LR = 0.5


def _data(seed=0, micro=8):
  """Two batches of ``K`` micro-batches each, stacked: ``(2, K, micro, ...)``."""
  x, y = problems.mlp_batch(seed + 1, n=2 * K * micro)
  return x.reshape(2, K, micro, -1), y.reshape(2, K, micro)


def _losses(x, y):
  """The loss closures of the micro-batches of one batch."""
  return [lambda p, b=(x[i], y[i]): problems.mlp_loss(p, b) for i in range(K)]


def _base():
  return optax.sgd(LR, momentum=0.9)


def _mean_sam_gradient(losses, params):
  """The mean over micro-batches of two-pass SAM gradients (flat, float64)."""
  return np.mean(
      [reference.flat(reference.sam_gradient(l, params, RHO)) for l in losses],
      axis=0,
  )


def _apply_reference(params, directions_per_step):
  """Feeds ``base`` the given float64 flat directions, one per step."""
  base = _base()
  state = base.init(params)
  for d in directions_per_step:
    u = reference.unflatten(params, d)
    u = jax.tree.map(lambda a, p: jnp.asarray(a, p.dtype), u, params)
    updates, state = base.update(u, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _micro_step(tx):
  @jax.jit
  def step(params, state, x, y):
    loss_fn = lambda p: problems.mlp_loss(p, (x, y))
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  return step


def test_sam_outside_multisteps_averages_per_micro_batch_sam_gradients():
  params = problems.mlp_params(seed=0)
  xs, ys = _data()
  accumulate = optax.MultiSteps(_base(), every_k_schedule=K)
  tx = optax.chain(sam_optax.sam(RHO), accumulate.gradient_transformation())
  step = _micro_step(tx)
  p, s = params, tx.init(params)
  history = []
  for t in range(2):
    for i in range(K):
      before = p
      p, s = step(p, s, xs[t, i], ys[t, i])
      if i < K - 1:  # the weights move only every K micro-steps
        chex.assert_trees_all_equal(p, before)
      history.append(p)
  assert int(s[0].count) == 2 * K  # sam counts micro-steps
  assert bool(accumulate.has_updated(s[1]))

  # Reference: mean over micro-batches of two-pass SAM gradients, then base.
  w, directions = params, []
  for t in range(2):
    losses = _losses(xs[t], ys[t])
    directions.append(_mean_sam_gradient(losses, w))
    w = _apply_reference(params, directions)
  chex.assert_trees_all_close(p, w, rtol=1e-5, atol=1e-6)
  # One step before: the first emit matches the one-step reference.
  chex.assert_trees_all_close(history[K - 1], _apply_reference(params, directions[:1]),
                              rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "make",
    [lambda: sam_optax.sam(RHO), lambda: sam_optax.asam(RHO),
     lambda: sam_optax.sam("auto"), lambda: sam_optax.looksam(RHO, k=2)],
    ids=["sam", "asam", "auto", "looksam"],
)
def test_sam_inside_multisteps_is_rejected_with_the_fix(make, jit):
  params = problems.mlp_params(seed=1)
  xs, ys = _data(seed=1)
  tx = optax.MultiSteps(optax.chain(make(), _base()), every_k_schedule=K)
  step = _micro_step(tx) if jit else _micro_step(tx).__wrapped__
  state = tx.init(params)  # init cannot tell; the first update does
  with pytest.raises(ValueError, match=r"(?s)wrapped by `optax.MultiSteps`.*"
                     r"optax\.chain\(sam_optax\.\w+\(\.\.\.\), optax\.MultiSteps\("
                     r"base, k\)\.gradient_transformation\(\)\)"):
    step(params, state, xs[0, 0], ys[0, 0])


def test_the_gradient_transformation_form_is_rejected_too():
  params = problems.mlp_params(seed=2)
  xs, ys = _data(seed=2)
  inner = optax.chain(sam_optax.sam(RHO), _base())
  tx = optax.MultiSteps(inner, K).gradient_transformation()
  with pytest.raises(ValueError, match="wrapped by `optax.MultiSteps`"):
    _micro_step(tx)(params, tx.init(params), xs[0, 0], ys[0, 0])


def test_multisteps_after_sam_is_not_mistaken_for_a_wrapper():
  # The recommended form traces sam's update outside MultiSteps.update.
  params = problems.mlp_params(seed=2)
  xs, ys = _data(seed=2)
  tx = optax.chain(sam_optax.sam(RHO), optax.MultiSteps(_base(), K).gradient_transformation())
  p, s = _micro_step(tx)(params, tx.init(params), xs[0, 0], ys[0, 0])
  assert int(s[0].count) == 1


def test_accumulating_inside_the_closure_is_large_batch_sam():
  params = problems.mlp_params(seed=3)
  xs, ys = _data(seed=3)
  tx = optax.chain(sam_optax.sam(RHO), _base())

  @jax.jit
  def step(params, state, x, y):  # x, y: (K, micro, ...)
    def mean_grad(p):
      def one(carry, batch):
        g = jax.grad(problems.mlp_loss)(p, batch)
        return jax.tree.map(lambda c, gi: c + gi / K, carry, g), None

      zeros = jax.tree.map(jnp.zeros_like, p)
      return jax.lax.scan(one, zeros, (x, y))[0]

    updates, state = tx.update(mean_grad(params), state, params, grad_fn=mean_grad)
    return optax.apply_updates(params, updates), state

  p, s = params, tx.init(params)
  for t in range(2):
    p, s = step(p, s, xs[t], ys[t])

  want = params
  directions = []
  for t in range(2):
    losses = _losses(xs[t], ys[t])
    batch_loss = lambda q, losses=losses: jnp.mean(jnp.stack([l(q) for l in losses]))
    directions.append(reference.flat(reference.sam_gradient(batch_loss, want, RHO)))
    want = _apply_reference(params, directions)
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)
