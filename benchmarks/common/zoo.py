"""Three Flax Linen models on synthetic batches, for the overhead benchmark.

* :func:`mlp`: a ReLU multilayer perceptron on dense features.
* :func:`resnet`: a ResNet-style CNN with BatchNorm; its statistics are
  threaded through the loss's ``aux`` as a Flax user would
  (``loss_fn`` returns ``(loss, new_batch_stats)``).
* :func:`transformer`: a pre-LayerNorm Transformer encoder that classifies
  every token of a synthetic sequence.

Each factory returns a :class:`Problem`: initial parameters, the model
state (``None`` when there is none), one fixed batch, and a pure function
giving per-example losses. :data:`SIZES` holds a CPU-sized and a GPU-sized
configuration of each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


class Problem(NamedTuple):
  """A model and a batch, as pure data and one pure function.

  Attributes:
    name: short label (``"mlp"``, ``"resnet"``, ``"transformer"``).
    description: architecture and batch in words.
    params: the trainable parameters (the ``"params"`` collection).
    state: other variables updated by the training forward pass (BatchNorm
      statistics), or ``None``.
    x: inputs of the batch.
    y: integer labels of the batch.
    per_example: ``(params, state, x, y) -> (losses, new_state)`` with
      ``losses`` of shape ``(batch,)`` in float32 and ``new_state`` the
      updated model state (``None`` when the model has none).
  """

  name: str
  description: str
  params: PyTree
  state: PyTree | None
  x: jax.Array
  y: jax.Array
  per_example: Callable[..., tuple[jax.Array, PyTree | None]]


def _xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  logits = logits.astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# ----------------------------------------------------------------------------- MLP


class MLP(nn.Module):
  widths: Sequence[int]
  classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    for w in self.widths:
      x = nn.relu(nn.Dense(w, dtype=self.dtype)(x))
    return nn.Dense(self.classes, dtype=self.dtype)(x)


def mlp(
    features: int = 256,
    widths: Sequence[int] = (512, 512),
    classes: int = 10,
    batch: int = 256,
    *,
    dtype: Any = jnp.float32,
    seed: int = 0,
) -> Problem:
  """A ReLU MLP ``features -> widths -> classes`` on Gaussian inputs."""
  model = MLP(tuple(widths), classes, dtype)
  kx, ky, ki = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (batch, features), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, classes)
  params = model.init(ki, x[:1])["params"]

  def per_example(params, state, x, y):
    return _xent(model.apply({"params": params}, x), y), state

  sizes = "-".join(str(s) for s in (features, *widths, classes))
  return Problem(
      "mlp", f"MLP {sizes}, batch {batch}", params, None, x, y, per_example
  )


# -------------------------------------------------------------------------- ResNet


class ResidualBlock(nn.Module):
  channels: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(
        use_running_average=not train, momentum=0.9, dtype=self.dtype
    )
    conv = lambda c, k, s: nn.Conv(
        c, (k, k), (s, s), use_bias=False, dtype=self.dtype
    )
    h = nn.relu(norm()(conv(self.channels, 3, self.stride)(x)))
    h = norm()(conv(self.channels, 3, 1)(h))
    if self.stride != 1 or x.shape[-1] != self.channels:
      x = norm()(conv(self.channels, 1, self.stride)(x))
    return nn.relu(x + h)


class ResNet(nn.Module):
  stages: Sequence[int]
  blocks: int
  classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.astype(self.dtype)
    x = nn.Conv(self.stages[0], (3, 3), use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(
        nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     dtype=self.dtype)(x)
    )
    for i, channels in enumerate(self.stages):
      for j in range(self.blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = ResidualBlock(channels, stride, self.dtype)(x, train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.classes, dtype=self.dtype)(x)


def resnet(
    image: int = 16,
    stages: Sequence[int] = (16, 32),
    blocks: int = 1,
    classes: int = 10,
    batch: int = 32,
    *,
    dtype: Any = jnp.float32,
    seed: int = 0,
) -> Problem:
  """A ResNet-style CNN with BatchNorm on random ``image x image x 3`` inputs.

  A 3x3 stem, then ``blocks`` basic residual blocks per stage (the first
  block of each later stage halves the resolution), global mean pooling and
  a dense classifier. The batch statistics are the model state: the loss
  uses the batch's statistics and returns the updated running averages.
  """
  model = ResNet(tuple(stages), blocks, classes, dtype)
  kx, ky, ki = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (batch, image, image, 3), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, classes)
  variables = model.init(ki, x[:2], train=False)

  def per_example(params, batch_stats, x, y):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True,
        mutable=["batch_stats"],
    )
    return _xent(logits, y), updates["batch_stats"]

  desc = (
      f"ResNet, {image}x{image}x3 inputs, stages {'-'.join(map(str, stages))},"
      f" {blocks} block(s) per stage, BatchNorm, batch {batch}"
  )
  return Problem(
      "resnet", desc, variables["params"], variables["batch_stats"], x, y,
      per_example,
  )


# --------------------------------------------------------------------- Transformer


class EncoderBlock(nn.Module):
  heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = nn.LayerNorm(dtype=self.dtype)(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, dtype=self.dtype, deterministic=True
    )(h, h)
    x = x + h
    h = nn.LayerNorm(dtype=self.dtype)(x)
    h = nn.Dense(self.mlp_ratio * d, dtype=self.dtype)(h)
    h = nn.Dense(d, dtype=self.dtype)(nn.gelu(h))
    return x + h


class TokenClassifier(nn.Module):
  vocab: int
  length: int
  width: int
  depth: int
  heads: int
  classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.width, dtype=self.dtype)(tokens)
    pos = self.param(
        "pos", nn.initializers.normal(0.02), (self.length, self.width)
    )
    x = x + pos.astype(self.dtype)
    for _ in range(self.depth):
      x = EncoderBlock(self.heads, dtype=self.dtype)(x)
    x = nn.LayerNorm(dtype=self.dtype)(x)
    return nn.Dense(self.classes, dtype=self.dtype)(x)


def transformer(
    vocab: int = 64,
    length: int = 32,
    width: int = 64,
    depth: int = 2,
    heads: int = 4,
    classes: int = 8,
    batch: int = 32,
    *,
    dtype: Any = jnp.float32,
    seed: int = 0,
) -> Problem:
  """A pre-LayerNorm Transformer encoder labelling every token.

  Random token sequences; the label of a token is a fixed function of it
  and its left neighbour, so attention has something to learn. The loss of
  an example is the mean cross-entropy over its tokens.
  """
  model = TokenClassifier(vocab, length, width, depth, heads, classes, dtype)
  kx, ki = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.randint(kx, (batch, length), 0, vocab)
  y = (x + 3 * jnp.roll(x, 1, axis=1)) % classes
  params = model.init(ki, x[:1])["params"]

  def per_example(params, state, x, y):
    logits = model.apply({"params": params}, x)
    return _xent(logits, y).mean(axis=-1), state

  desc = (
      f"Transformer encoder, {depth} layers, width {width}, {heads} heads,"
      f" {length} tokens (vocabulary {vocab}), {classes} classes per token,"
      f" batch {batch}"
  )
  return Problem("transformer", desc, params, None, x, y, per_example)


# ---------------------------------------------------------------------------- sizes

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    # Well under a second per step on two CPU cores; the batches are large
    # enough that per-step work over the parameters does not dominate.
    "default": {
        "mlp": {"features": 256, "widths": (512, 512), "batch": 1024},
        "resnet": {"image": 16, "stages": (16, 32), "blocks": 1, "batch": 32},
        "transformer": {"length": 32, "width": 64, "depth": 2, "heads": 4, "batch": 64},
    },
    # Tiny, for tests.
    "quick": {
        "mlp": {"features": 32, "widths": (64,), "batch": 32},
        "resnet": {"image": 8, "stages": (4,), "blocks": 1, "batch": 8},
        "transformer": {"length": 8, "width": 16, "depth": 1, "heads": 2, "batch": 4},
    },
    # Sized for one GPU.
    "large": {
        "mlp": {"features": 1024, "widths": (4096, 4096, 4096), "batch": 1024},
        "resnet": {"image": 32, "stages": (64, 128, 256), "blocks": 2, "batch": 256},
        "transformer": {
            "vocab": 1024,
            "length": 256,
            "width": 512,
            "depth": 6,
            "heads": 8,
            "batch": 64,
        },
    },
}

FACTORIES: dict[str, Callable[..., Problem]] = {
    "mlp": mlp,
    "resnet": resnet,
    "transformer": transformer,
}


def problems(size: str = "default", dtype: Any = jnp.float32) -> list[Problem]:
  """The three problems at ``size`` (``"default"``, ``"quick"``, ``"large"``)."""
  if size not in SIZES:
    raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}.")
  return [
      FACTORIES[name](**kwargs, dtype=dtype)
      for name, kwargs in SIZES[size].items()
  ]


def param_bytes(tree: PyTree) -> int:
  """Bytes of all leaves of ``tree``."""
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))
