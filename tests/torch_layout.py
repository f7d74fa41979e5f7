"""A small model in the PyTorch layout, for transcriptions of PyTorch optimizers.

Kernels are stored ``(out, in, ...)`` as in ``torch.nn``: ``kernel`` is a
3-D filter bank (3 filters of 2 x 2), ``dense`` a 2 x 3 linear layer and
``bias`` its bias. The loss and its gradient are written twice: in JAX
(float32, for the library) and by hand in float64 NumPy (for the
references), so that a reference shares no code with the library, not even
automatic differentiation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_RNG = np.random.default_rng(7)
X = _RNG.normal(size=(6, 2, 2))  # 6 examples of 2 x 2 inputs
T = _RNG.normal(size=(6, 2))  # regression targets
INIT = {
    "bias": np.asarray([0.1, -0.2]),
    "dense": _RNG.normal(size=(2, 3)) * 0.8,
    "kernel": _RNG.normal(size=(3, 2, 2)) * 0.7 + 0.3,  # non-zero filter means
}


def params(dtype=jnp.float32) -> dict:
  """The initial parameters as JAX arrays."""
  return {k: jnp.asarray(v, dtype) for k, v in INIT.items()}


def loss(p) -> jnp.ndarray:
  """``Σ (dense · tanh(kernel ⋆ x) + bias − t)² / (2n)`` in JAX."""
  z = jnp.einsum("oij,nij->no", p["kernel"], jnp.asarray(X, p["kernel"].dtype))
  y = jnp.tanh(z) @ p["dense"].T + p["bias"]
  r = y - jnp.asarray(T, y.dtype)
  return jnp.sum(r * r) / (2 * X.shape[0])


def loss_and_grad(w: dict) -> tuple[float, dict]:
  """The same loss and its gradient, by hand, in float64 NumPy."""
  n = X.shape[0]
  z = np.einsum("oij,nij->no", w["kernel"], X)
  h = np.tanh(z)
  r = h @ w["dense"].T + w["bias"] - T
  dy = r / n
  dh = dy @ w["dense"]
  dz = dh * (1 - h * h)
  grads = {
      "bias": dy.sum(axis=0),
      "dense": dy.T @ h,
      "kernel": np.einsum("no,nij->oij", dz, X),
  }
  return float(np.sum(r * r) / (2 * n)), grads


def grad(w: dict) -> dict:
  return loss_and_grad(w)[1]


def start() -> dict:
  """The initial parameters in float64 NumPy (rounded through float32, as
  the library's start)."""
  return {k: np.asarray(np.float32(v), np.float64) for k, v in INIT.items()}


def numpy_of(p) -> dict:
  return {k: np.asarray(v, np.float64) for k, v in p.items()}


def global_norm(tensors: dict) -> float:
  """``torch.norm(torch.stack([g.norm() for g in grads]))``."""
  return float(np.linalg.norm([np.linalg.norm(g) for g in tensors.values()]))


class SGD:
  """``torch.optim.SGD(lr, momentum)`` without weight decay or dampening:
  ``buf = g`` at the first step, then ``buf = μ buf + g``; ``w -= lr buf``."""

  def __init__(self, lr: float, momentum: float = 0.0):
    self.lr, self.momentum, self.buf = lr, momentum, None

  def step(self, w: dict, g: dict) -> dict:
    if self.momentum:
      if self.buf is None:
        self.buf = {k: v.copy() for k, v in g.items()}
      else:
        self.buf = {k: self.momentum * self.buf[k] + g[k] for k in g}
      g = self.buf
    return {k: w[k] - self.lr * g[k] for k in w}
