"""Small convolutional networks in plain JAX, with a fast CPU convolution.

For the tiny shapes of MNIST-1D and the 8x8 digits, XLA's CPU convolution is
several times slower than gathering the receptive fields with strided slices
and doing one matrix multiplication (im2col), so :func:`conv` does the latter.
It computes the same function as ``flax.linen.Conv`` with symmetric integer
padding (the tests check it), with the same kernel layout
``(*kernel_size, in_features, features)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .models import Model, Params

IntOrSeq = int | Sequence[int]


def _tuple(value: IntOrSeq, n: int) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * n
  value = tuple(int(v) for v in value)
  if len(value) != n:
    raise ValueError(f"expected {n} values, got {value}.")
  return value


def conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    strides: IntOrSeq = 1,
    padding: IntOrSeq = 0,
) -> jax.Array:
  """N-D convolution (cross-correlation) by strided slices and one matmul.

  Args:
    x: input of shape ``(batch, *spatial, in_features)``.
    kernel: weights of shape ``(*kernel_size, in_features, features)``.
    bias: optional bias of shape ``(features,)``.
    strides: stride per spatial dimension (an int applies to all).
    padding: zeros added on both sides of each spatial dimension.

  Returns:
    The output, ``(batch, *out_spatial, features)`` with
    ``out = (size + 2 * padding - kernel_size) // stride + 1``.
  """
  nd = kernel.ndim - 2
  if x.ndim != nd + 2:
    raise ValueError(
        f"a {nd}-D kernel needs an input of rank {nd + 2}, got {x.shape}.")
  ksize = kernel.shape[:nd]
  strides, padding = _tuple(strides, nd), _tuple(padding, nd)
  x = jnp.pad(x, [(0, 0), *((p, p) for p in padding), (0, 0)])
  out = [(x.shape[1 + i] - ksize[i]) // strides[i] + 1 for i in range(nd)]
  if min(out) < 1:
    raise ValueError(f"kernel {ksize} does not fit the padded input {x.shape}.")
  patches = []
  for offset in itertools.product(*(range(k) for k in ksize)):
    start = (0, *offset, 0)
    limit = (x.shape[0],
             *(o + s * (n - 1) + 1 for o, s, n in zip(offset, strides, out)),
             x.shape[-1])
    patches.append(jax.lax.slice(x, start, limit, (1, *strides, 1)))
  # One 2-D matmul (rows: batch x output positions) keeps XLA's fast path,
  # also when vmapped.
  cols = jnp.stack(patches, axis=-2).reshape(x.shape[0] * math.prod(out), -1)
  y = (cols @ kernel.reshape(-1, kernel.shape[-1])).reshape(
      x.shape[0], *out, kernel.shape[-1])
  return y if bias is None else y + bias


def cnn(
    input_shape: Sequence[int],
    layers: Sequence[tuple[int, int, int]],
    num_classes: int = 10,
    padding: int = 1,
) -> Model:
  """ReLU convolutions followed by one dense layer.

  Args:
    input_shape: spatial shape of one example, e.g. ``(40,)`` or ``(8, 8)``;
      inputs arrive flat, ``(batch, prod(input_shape))``, with one channel.
    layers: ``(features, kernel_size, stride)`` of every convolution; the
      kernel is square in 2-D.
    num_classes: outputs of the final dense layer.
    padding: zero padding on each side, for every convolution.

  Returns:
    A :class:`~benchmarks.common.models.Model` with parameters
    ``{"conv0": {"w", "b"}, ..., "dense": {"w", "b"}}``; convolutions use
    He-normal weights, the dense layer LeCun-normal ones, biases start at 0.
  """
  input_shape = tuple(int(s) for s in input_shape)
  nd = len(input_shape)
  shapes, spatial, channels = [], input_shape, 1
  for features, k, stride in layers:
    shapes.append(((k,) * nd + (channels, features), stride))
    spatial = tuple((s + 2 * padding - k) // stride + 1 for s in spatial)
    if min(spatial) < 1:
      raise ValueError(f"layers {layers} shrink {input_shape} to nothing.")
    channels = features
  flat = math.prod(spatial) * channels

  def init(key: jax.Array) -> Params:
    keys = jax.random.split(key, len(shapes) + 1)
    params = {}
    for i, ((shape, _), k) in enumerate(zip(shapes, keys)):
      fan_in = math.prod(shape[:-1])
      params[f"conv{i}"] = {
          "w": jax.random.normal(k, shape, jnp.float32) * math.sqrt(2 / fan_in),
          "b": jnp.zeros((shape[-1],), jnp.float32),
      }
    params["dense"] = {
        "w": jax.random.normal(keys[-1], (flat, num_classes), jnp.float32)
        * math.sqrt(1 / flat),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }
    return params

  def apply(params: Params, x: jax.Array) -> jax.Array:
    h = x.reshape(x.shape[0], *input_shape, 1)
    for i, (_, stride) in enumerate(shapes):
      layer = params[f"conv{i}"]
      h = jax.nn.relu(conv(h, layer["w"], layer["b"], strides=stride,
                           padding=padding))
    h = h.reshape(h.shape[0], -1)
    return h @ params["dense"]["w"] + params["dense"]["b"]

  return Model(init, apply)


def mnist1d_cnn(channels: int = 25) -> Model:
  """The MNIST-1D paper's CNN: Conv kernels 5/3/3, stride 2, padding 1, Dense(10)."""
  return cnn((40,), [(channels, 5, 2), (channels, 3, 2), (channels, 3, 2)])


def digits_cnn(channels: Sequence[int] = (8, 16, 16)) -> Model:
  """A small 2-D CNN for 8x8 digits: 3x3 convolutions, strides 1/2/2, Dense(10)."""
  c0, c1, c2 = channels
  return cnn((8, 8), [(c0, 3, 1), (c1, 3, 2), (c2, 3, 2)])
