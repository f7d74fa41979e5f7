"""WSAM against a float64 transcription of the authors' ``WeightedSAM``.

Transcribed from ``atorch/atorch/optimizers/wsam.py`` in
``intelligent-machine-learning/dlrover`` (class ``WeightedSAM``, ``step``,
``first_step``, ``second_step``, ``_grad_norm``), ``adaptive=False``:

* first step: ``scale = rho / (‖g‖ + sam_eps)`` from the raw gradient,
  ``e_w = g * scale``, ``p += e_w``; then ``clip_grad_norm_(max_norm)`` on
  the clean gradient, which is stored;
* second step: ``p -= e_w``; ``clip_grad_norm_(max_norm)`` on ``g_p``;
  coupled: ``grad = alpha g_p + (1 - alpha) g`` and the base optimizer steps;
  decoupled: ``sharpness = g_p - g``, the base optimizer steps with ``g``,
  then ``p -= lr * alpha * sharpness``, with ``alpha = gamma / (1 - gamma)``.

``clip_grad_norm_`` is torch's: ``g *= min(1, max_norm / (‖g‖ + 1e-6))``.
Not copied: the distributed all-reduce (the package's ``axis_name``), the
BatchNorm running-statistics toggling (a model concern), ``adaptive``
(composable from parts), and the default ``max_norm=1.0`` (here ``None``;
the tests pass it explicitly).
"""

from __future__ import annotations

import inspect

import jax
import numpy as np
import optax
import pytest

import sam_optax
from tests import torch_layout as model

MOMENTUM, STEPS = 0.9, 4


def _clip(g, max_norm):
  """``torch.nn.utils.clip_grad_norm_`` (total 2-norm over all tensors)."""
  if max_norm is None:
    return g
  coef = min(max_norm / (model.global_norm(g) + 1e-6), 1.0)
  return {k: v * coef for k, v in g.items()}


def _weighted_sam(rho, gamma, decouple, max_norm, lr_at, steps, sam_eps=1e-12):
  """The reference: ``steps`` of WeightedSAM around torch's SGD(momentum)."""
  alpha = gamma / (1 - gamma)
  w, sgd, trajectory = model.start(), model.SGD(lr_at(0), MOMENTUM), []
  for t in range(steps):
    sgd.lr = lr_at(t)  # the scheduler has set the group's lr for this step
    g = model.grad(w)  # closure(), then first_step
    scale = rho / (model.global_norm(g) + sam_eps)
    e_w = {k: g[k] * scale for k in w}
    w = {k: w[k] + e_w[k] for k in w}
    stored = _clip(g, max_norm)
    g_p = model.grad(w)  # closure() at w + e_w, then second_step
    w = {k: w[k] - e_w[k] for k in w}
    g_p = _clip(g_p, max_norm)
    if not decouple:
      w = sgd.step(w, {k: alpha * g_p[k] + (1 - alpha) * stored[k] for k in w})
    else:
      sharpness = {k: g_p[k] - stored[k] for k in w}
      w = sgd.step(w, stored)
      w = {k: w[k] - sgd.lr * alpha * sharpness[k] for k in w}
    trajectory.append(w)
  return trajectory


def _library(tx, steps):
  params = model.params()
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(model.loss)(p), s, p, loss_fn=model.loss)
    return optax.apply_updates(p, u), s

  trajectory = []
  for _ in range(steps):
    params, state = step(params, state)
    trajectory.append(model.numpy_of(params))
  return trajectory, state


def _assert_close(got, want):
  for t, (a, b) in enumerate(zip(got, want, strict=True)):
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-6, err_msg=f"step {t}, {k}")


def _far(a, b):
  return max(np.max(np.abs(a[-1][k] - b[-1][k])) for k in b[-1]) > 1e-4


def test_the_clipping_is_active_in_these_tests():
  # Both gradients exceed the max_norm used below, so the clip matters.
  assert model.global_norm(model.grad(model.start())) > 0.5


@pytest.mark.parametrize("max_norm", [None, 0.3])
@pytest.mark.parametrize("gamma", [0.88, 0.6])
def test_coupled_matches_the_transcribed_code(gamma, max_norm):
  lr, rho = 0.02, 0.1
  tx = optax.chain(
      sam_optax.wsam(rho, gamma, max_norm=max_norm),
      optax.sgd(lr, momentum=MOMENTUM),
  )
  got, _ = _library(tx, STEPS)
  want = _weighted_sam(rho, gamma, False, max_norm, lambda t: lr, STEPS)
  _assert_close(got, want)


@pytest.mark.parametrize("max_norm", [None, 0.3])
@pytest.mark.parametrize("schedule", [False, True])
def test_decoupled_matches_the_transcribed_code(max_norm, schedule):
  rho, gamma = 0.1, 0.88
  if schedule:  # torch's LambdaLR(lambda t: 1 - 0.1 t), stepped after each step
    lr, lr_at = optax.linear_schedule(0.02, 0.0, 10), lambda t: 0.02 * (1 - 0.1 * t)
  else:
    lr, lr_at = 0.02, lambda t: 0.02
  tx = sam_optax.wsam_decoupled(
      optax.sgd(lr, momentum=MOMENTUM), lr, rho, gamma, max_norm=max_norm
  )
  got, state = _library(tx, STEPS)
  want = _weighted_sam(rho, gamma, True, max_norm, lr_at, STEPS)
  _assert_close(got, want)
  assert isinstance(state, sam_optax.WSAMDecoupledState)
  assert float(sam_optax.sam_stats(state).pass_taken) == 1.0
  # The two forms differ once momentum carries the sharpness term.
  coupled = _weighted_sam(rho, gamma, False, max_norm, lr_at, STEPS)
  assert _far(coupled, want)


def test_half_is_sam():
  tx = optax.chain(sam_optax.wsam(0.1, 0.5), optax.sgd(0.05))
  ref = optax.chain(sam_optax.sam(0.1), optax.sgd(0.05))
  a, _ = _library(tx, 3)
  b, _ = _library(ref, 3)
  _assert_close(a, b)


@pytest.mark.parametrize("rho", [0.0, "traced"])
def test_decoupled_rho_zero_is_the_base_optimizer(rho):
  base = lambda: optax.sgd(0.05, momentum=MOMENTUM)  # noqa: E731
  r = (lambda count: 0.0 * count) if rho == "traced" else 0.0
  a, _ = _library(sam_optax.wsam_decoupled(base(), 0.05, r), 3)
  b, _ = _library(optax.chain(sam_optax.sam(0.0), base()), 3)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_allclose(x[k], y[k], rtol=1e-6, atol=1e-7)


def test_defaults():
  for fn in (sam_optax.wsam, sam_optax.wsam_decoupled):
    sig = inspect.signature(fn).parameters
    assert sig["rho"].default == 0.05 and sig["gamma"].default == 0.88
    assert sig["max_norm"].default is None  # the authors': 1.0 (documented)
    assert sig["eps"].default == 1e-12  # sam_eps


def test_bad_options_name_the_argument():
  with pytest.raises(ValueError, match=r"`wsam`: `gamma`"):
    sam_optax.wsam(gamma=1.0)
  with pytest.raises(ValueError, match=r"`wsam`: `max_norm`"):
    sam_optax.wsam(max_norm=0.0)
  with pytest.raises(TypeError, match=r"`wsam_decoupled`: `base_optimizer`"):
    sam_optax.wsam_decoupled(0.1, 0.1)
  with pytest.raises(ValueError, match=r"`wsam_decoupled`: `learning_rate`"):
    sam_optax.wsam_decoupled(optax.sgd(0.1), -0.1)
