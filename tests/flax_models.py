"""The same small CNN (Conv, BatchNorm, ReLU, Dropout, mean pool, Dense) in
Flax Linen and in Flax NNX, with a dropout layer that can report its masks.

Both ``__call__`` methods take an optional ``dropout_key``: given, it is the
dropout key (so the two frameworks can be fed the same masks); otherwise
Linen draws from the ``"dropout"`` collection and NNX from the module's
``dropout`` stream.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import sam_optax.flax  # noqa: E402

RATE = 0.3
CLASSES = 3
CHANNELS = 4
MASKS: list[np.ndarray] = []  # masks drawn by `record=True` dropout layers, in order


def _record(mask):
  MASKS.append(np.asarray(mask))


def _drop(x, key, rate, record):
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, x.shape)
  if record:
    jax.debug.callback(_record, mask)
  return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


class LinenDropout(nn.Module):
  """``nn.Dropout`` that reports its mask through ``jax.debug.callback``."""

  rate: float

  @nn.compact
  def __call__(self, x, key=None):
    return _drop(x, self.make_rng("dropout") if key is None else key, self.rate, True)


class LinenCNN(nn.Module):
  record: bool = False

  @nn.compact
  def __call__(self, x, train: bool, dropout_key: Optional[jax.Array] = None):
    x = nn.Conv(CHANNELS, (3, 3), name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    x = nn.relu(x)
    if train:
      if self.record:
        x = LinenDropout(RATE)(x, dropout_key)
      else:
        x = nn.Dropout(RATE, deterministic=False)(x, rng=dropout_key)
    x = x.mean(axis=(1, 2))
    return nn.Dense(CLASSES, name="dense")(x)


class NNXDropout(nnx.Module):
  """``nnx.Dropout`` that reports its mask through ``jax.debug.callback``."""

  def __init__(self, rate: float, rngs: nnx.Rngs):
    self.rate = rate
    self.rngs = rngs["dropout"].fork()

  def __call__(self, x, key=None):
    return _drop(x, self.rngs() if key is None else key, self.rate, True)


class NNXCNN(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, record: bool = False):
    self.conv = nnx.Conv(1, CHANNELS, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(CHANNELS, momentum=0.9, rngs=rngs)
    self.record = record
    if record:
      self.dropout = NNXDropout(RATE, rngs=rngs)
    else:
      self.dropout = nnx.Dropout(RATE, rngs=rngs)
    self.dense = nnx.Linear(CHANNELS, CLASSES, rngs=rngs)

  def __call__(self, x, dropout_key: Optional[jax.Array] = None):
    x = nnx.relu(self.bn(self.conv(x)))
    if self.record:
      x = self.dropout(x, dropout_key)
    else:
      x = self.dropout(x, rngs=dropout_key)
    return self.dense(x.mean(axis=(1, 2)))


class TinyNet(nnx.Module):
  """Linear, BatchNorm, dropout, linear: 4 features in, 2 classes out."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 6, rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(self.bn(self.linear(x))))


def batch(seed: int = 0, n: int = 8):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6, 6, 1)).astype(np.float32)
  y = rng.integers(0, CLASSES, size=(n,)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def cross_entropy(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class LinenState(sam_optax.flax.TrainState):
  batch_stats: Any


@functools.partial(jax.jit, static_argnums=1)
def _linen_init(key, record):
  return LinenCNN(record=record).init(key, batch()[0], train=False)


_LINEN = {False: LinenCNN(record=False), True: LinenCNN(record=True)}


def linen_state(tx, *, record: bool = False, seed: int = 0) -> LinenState:
  variables = _linen_init(jax.random.key(seed), record)
  return LinenState.create(
      apply_fn=_LINEN[record].apply,
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      tx=tx,
  )


def nnx_model(*, record: bool = False, seed: int = 0) -> NNXCNN:
  return NNXCNN(nnx.Rngs(params=seed, dropout=seed + 1), record=record)


def max_abs_diff(a, b) -> float:
  diffs = jax.tree.leaves(jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b))
  return max(float(d) for d in diffs)


def arrays(tree):
  """The arrays of `tree` as nested dicts (PRNG keys as their key data)."""

  def leaf(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key_data(x)
    return x

  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  return jax.tree.map(leaf, nnx.as_pure(tree))
