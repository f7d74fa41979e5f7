"""GCSAM against a float64 transcription of kozistr's ``SAM(use_gc=True)``.

Transcribed from ``kozistr/pytorch_optimizer``, ``pytorch_optimizer/
optimizer/sam.py`` (class ``SAM``, ``first_step``/``second_step``) and
``optimizer/gradient_centralization.py`` (``centralize_gradient``):

* ``grad_norm = ‖g‖ + perturb_eps`` over all tensors, from the raw gradient;
* for each tensor, in place: ``centralize_gradient(grad, gc_conv_only=False)``
  (tensors with ``dim() > 1`` lose their mean over dims ``1..n-1``), then
  ``e_w = grad * rho / grad_norm``, ``p += e_w``;
* the closure recomputes the gradient at ``w + e_w`` (the centralized one was
  zeroed), ``p`` is restored and the base optimizer steps with it.

Not copied: the in-place edit of ``p.grad`` (it is zeroed before it could be
seen again) and the ``adaptive`` option (``w²`` factor; compose
``perturbations.adaptive`` if needed). The multi-step comparison in the
Flax layout lives in the contract suite (cases ``gcsam``, ``gcsam_first``).
"""

from __future__ import annotations

import inspect

import jax
import numpy as np
import optax
import pytest

import sam_optax
from tests import torch_layout as model

LR, MOMENTUM, STEPS = 0.1, 0.9, 4


def _kozistr_sam_gc(rho: float, steps: int, perturb_eps: float = 1e-12):
  """The reference: ``steps`` of SAM(use_gc=True) with torch's SGD(momentum)."""
  w, sgd, trajectory = model.start(), model.SGD(LR, MOMENTUM), []
  for _ in range(steps):
    g = model.grad(w)
    grad_norm = model.global_norm(g) + perturb_eps
    scale = rho / grad_norm
    perturbed = {}
    for name, p in w.items():
      grad = g[name].copy()
      if grad.ndim > 1:  # centralize_gradient(grad, gc_conv_only=False)
        grad = grad - grad.mean(axis=tuple(range(1, grad.ndim)), keepdims=True)
      perturbed[name] = p + grad * scale
    g_s = model.grad(perturbed)  # the closure at w + e_w; not centralized
    w = sgd.step(w, g_s)
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
  return trajectory


def test_the_model_gradient_is_right():
  w = model.start()
  got = model.grad(w)
  want = jax.grad(model.loss)(model.params())
  for k in got:
    np.testing.assert_allclose(got[k], np.asarray(want[k]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rho", [0.05, 0.3])
def test_steps_match_the_transcribed_code(rho):
  tx = optax.chain(
      sam_optax.gcsam(rho, filter_axis="first"), optax.sgd(LR, momentum=MOMENTUM)
  )
  got = _library(tx, STEPS)
  want = _kozistr_sam_gc(rho, STEPS)
  for t, (a, b) in enumerate(zip(got, want)):
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=f"step {t}, {k}")
  # The centralization matters here: plain SAM takes another path.
  sam = _library(optax.chain(sam_optax.sam(rho), optax.sgd(LR, momentum=MOMENTUM)), STEPS)
  assert max(np.max(np.abs(sam[-1][k] - want[-1][k])) for k in want[-1]) > 1e-4


def test_flax_layout_is_the_transposed_pytorch_layout():
  # Moving the filter axis last and centralizing over the others ("last")
  # gives the same perturbation as "first" in the PyTorch layout.
  g = {k: np.float32(v) for k, v in model.grad(model.start()).items()}
  d_first = sam_optax.perturbations.centralized("first")
  d_last = sam_optax.perturbations.centralized("last")
  a, _ = d_first.direction(g, g, d_first.init(g), 0)
  moved = {k: np.moveaxis(v, 0, -1) for k, v in g.items()}
  b, _ = d_last.direction(moved, moved, d_last.init(moved), 0)
  for k in g:
    np.testing.assert_allclose(np.moveaxis(np.asarray(b[k]), -1, 0), a[k], rtol=1e-6)


def test_perturbation_norms():
  g = {k: np.float32(v) for k, v in model.grad(model.start()).items()}
  raw = model.global_norm(g)
  for norm in ("raw", "centralized"):
    d = sam_optax.perturbations.centralized("first", norm=norm)
    out = {k: np.asarray(v) for k, v in d.direction(g, g, d.init(g), 0)[0].items()}
    n = model.global_norm(out)
    if norm == "raw":  # shorter than ρ: the filters' means are removed
      assert n < 1.0 - 1e-3, n
      np.testing.assert_allclose(out["bias"], g["bias"] / raw, rtol=1e-6)
    else:
      assert abs(n - 1.0) < 1e-6, n
    for k in ("dense", "kernel"):  # every filter of a kernel has mean 0
      means = out[k].reshape(out[k].shape[0], -1).mean(axis=1)
      np.testing.assert_allclose(means, 0.0, atol=1e-7)


def test_defaults_match_the_transcribed_code():
  sig = inspect.signature(sam_optax.gcsam).parameters
  assert sig["rho"].default == 0.05  # SAM(rho=0.05)
  assert sig["eps"].default == 1e-12  # perturb_eps=1e-12
  assert sig["norm"].default == "raw"  # the norm is taken before centralizing


def test_bad_options_name_the_argument():
  with pytest.raises(ValueError, match=r"`gcsam`: `filter_axis`"):
    sam_optax.gcsam(filter_axis=1)
  with pytest.raises(ValueError, match=r"`gcsam`: `norm` must be one of"):
    sam_optax.gcsam(norm="l1")
  with pytest.raises(ValueError, match=r"`gcsam`: `rho`"):
    sam_optax.gcsam(rho=-0.1)
