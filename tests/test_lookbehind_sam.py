"""Lookbehind-SAM against a float64 transcription of the authors' code.

Transcribed from ``chandar-lab/Lookbehind-SAM`` (commit 3beb51f):
``lookbehind.py`` (``Lookbehind_ASAM.__init__``, ``descent_step``,
``Lookbehind_SAM.ascent_step``) and the loop of ``example_cifar.py``: per
batch, ``k`` times: gradient at the model's weights, ``ascent_step``
(``p += rho g / (‖g‖ + 1e-16)``), gradient at the perturbed weights,
``descent_step`` (back up ``p``, load the cached fast weights, base
optimizer step, cache them, restore the backup: the perturbed point);
after ``k`` descents, ``p = alpha fast + (1 - alpha) slow`` (or the
per-tensor adaptive alpha) and both caches are reset to ``p``.

The reference keeps every cache and evaluates the 2k gradients of the
authors' loop; the library evaluates k + 1 (the ascent gradient at the
point of the previous descent gradient is that gradient).
"""

from __future__ import annotations

import inspect

import jax
import numpy as np
import optax
import pytest

import sam_optax
from tests import torch_layout as model

LR, MOMENTUM, BATCHES = 0.05, 0.9, 3


def _cos(a, b):
  """``torch.nn.CosineSimilarity(dim=0)`` of flattened tensors."""
  a, b = a.ravel(), b.ravel()
  return float(a @ b / (max(np.linalg.norm(a), 1e-8) * max(np.linalg.norm(b), 1e-8)))


class _LookbehindSAM:
  """The authors' ``Lookbehind_SAM`` around torch's SGD(momentum)."""

  def __init__(self, p, rho, k_steps, alpha):
    self.p, self.rho, self.k_steps, self.alpha = p, rho, k_steps, alpha
    self.sgd = model.SGD(LR, MOMENTUM)
    self.cached = {n: v.copy() for n, v in p.items()}
    self.cached_slow = {n: v.copy() for n, v in p.items()}
    self.k = 0
    self.grads = 0

  def backward(self):
    self.grads += 1
    self.grad = model.grad(self.p)

  def ascent_step(self):
    grad_norm = model.global_norm(self.grad) + 1.0e-16
    self.p = {n: v + self.grad[n] * (self.rho / grad_norm) for n, v in self.p.items()}

  def descent_step(self):
    backup = self.p  # _backup_and_load_cache
    self.p = self.sgd.step(self.cached, self.grad)
    if self.alpha == -1 and self.k == 0:
      self.first = {n: v.copy() for n, v in self.p.items()}
    self.cached = {n: v.copy() for n, v in self.p.items()}  # _cache_params
    self.p = backup  # _clear_and_load_backup
    self.k += 1
    if self.k >= self.k_steps:
      self.k = 0
      new = {}
      for n in self.p:
        fast, slow = self.cached[n], self.cached_slow[n]
        a = (_cos(self.first[n] - slow, fast - slow) + 1.0) / 2.0 if self.alpha == -1 else self.alpha
        new[n] = fast * a + slow * (1.0 - a)
      self.p = new
      self.cached = {n: v.copy() for n, v in new.items()}
      self.cached_slow = {n: v.copy() for n, v in new.items()}


def _reference(rho, k, alpha, batches):
  opt = _LookbehindSAM(model.start(), rho, k, alpha)
  trajectory = []
  for _ in range(batches):
    for _ in range(k):  # example_cifar.py's inner loop
      opt.backward()
      opt.ascent_step()
      opt.backward()
      opt.descent_step()
    trajectory.append(opt.p)
  assert opt.grads == 2 * k * batches
  return trajectory


def _library(tx, batches):
  params, calls = model.params(), []

  def loss_fn(p):
    jax.debug.callback(lambda: calls.append(1))
    return model.loss(p)

  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(model.loss)(p), s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, u), s

  trajectory = []
  for _ in range(batches):
    params, state = step(params, state)
    trajectory.append(model.numpy_of(params))
  jax.effects_barrier()
  return trajectory, state, len(calls)


@pytest.mark.parametrize("k,alpha", [(2, 0.5), (3, 0.8), (2, "adaptive"), (1, 0.5)])
def test_steps_match_the_transcribed_code(k, alpha):
  rho = 0.1
  tx = sam_optax.lookbehind_sam(optax.sgd(LR, momentum=MOMENTUM), rho, k, alpha)
  got, state, calls = _library(tx, BATCHES)
  want = _reference(rho, k, -1 if alpha == "adaptive" else alpha, BATCHES)
  for t, (a, b) in enumerate(zip(got, want, strict=True)):
    for n in b:
      np.testing.assert_allclose(a[n], b[n], rtol=2e-5, atol=2e-6, err_msg=f"batch {t}, {n}")
  assert calls == k * BATCHES  # k closure gradients per update (the authors': 2k)
  assert isinstance(state, sam_optax.LookbehindState)


def test_adaptive_alpha_differs_from_fixed():
  a = _reference(0.1, 3, -1, BATCHES)[-1]
  b = _reference(0.1, 3, 0.5, BATCHES)[-1]
  assert max(np.max(np.abs(a[n] - b[n])) for n in a) > 1e-5


def test_k1_alpha1_is_sam():
  tx = sam_optax.lookbehind_sam(optax.sgd(LR, momentum=MOMENTUM), 0.1, 1, 1.0)
  ref = optax.chain(sam_optax.sam(0.1, eps=1e-12), optax.sgd(LR, momentum=MOMENTUM))
  a, _, _ = _library(tx, BATCHES)
  b, _, _ = _library(ref, BATCHES)
  for x, y in zip(a, b):
    for n in x:
      np.testing.assert_allclose(x[n], y[n], rtol=1e-6, atol=1e-7)


def test_defaults():
  sig = inspect.signature(sam_optax.lookbehind_sam).parameters
  # The generalization benchmark's Lookbehind-SAM run: rho 0.05, k 2; alpha: the class default 0.5.
  assert sig["rho"].default == 0.05 and sig["k"].default == 2
  assert sig["alpha"].default == 0.5


def test_bad_options_name_the_argument():
  with pytest.raises(ValueError, match=r"`lookbehind_sam`: `k`"):
    sam_optax.lookbehind_sam(optax.sgd(0.1), k=0)
  with pytest.raises(ValueError, match=r"`lookbehind_sam`: `alpha`"):
    sam_optax.lookbehind_sam(optax.sgd(0.1), alpha=1.5)
  with pytest.raises(ValueError, match=r"`lookbehind_sam`: `alpha`"):
    sam_optax.lookbehind_sam(optax.sgd(0.1), alpha="cosine")
  with pytest.raises(ValueError, match=r"`lookbehind_sam`: `rho`"):
    sam_optax.lookbehind_sam(optax.sgd(0.1), rho=-0.1)
  with pytest.raises(TypeError, match=r"`lookbehind_sam`: `base_optimizer`"):
    sam_optax.lookbehind_sam(0.1)
