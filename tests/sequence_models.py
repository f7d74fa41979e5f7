"""A tiny causal sequence model, in pure JAX, Flax Linen and Flax NNX, for the
sequence-model tests (`tests/test_sequence_api.py`).

The pure-JAX model is an embedding, one causal single-head self-attention
block with a residual connection, optional dropout and a linear read-out. It
computes in the dtype of its parameters (float64 when the references run
under ``jax.enable_x64``) unless ``compute_dtype`` casts them (bf16
activations with float32 parameters); the logits are at least float32.

Padding: positions with ``mask == False`` are never attended to (key mask)
and carry zero weight in the loss, so the update does not depend on what
the padded positions hold.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:  # the Flax models are defined only when Flax is installed
  import flax.linen as nn
  from flax import nnx
except ImportError:  # pragma: no cover
  nn = nnx = None

VOCAB, DIM, LEN = 13, 16, 8
RATE = 0.3  # dropout rate
NEG = -1e9  # attention logit of a masked key


# ------------------------------------------------------------------ data


LENGTHS = (8, 3, 5, 1, 6, 2, 7, 4)  # of the sequences of `batch()`


def batch(seed: int = 0, lengths=LENGTHS) -> dict[str, jax.Array]:
  """Right-padded sequences: ``tokens``, ``targets`` (int32), ``mask`` (bool)."""
  rng = np.random.default_rng(seed)
  n = len(lengths)
  mask = np.arange(LEN)[None, :] < np.asarray(lengths)[:, None]
  return {
      "tokens": jnp.asarray(rng.integers(0, VOCAB, (n, LEN)), jnp.int32),
      "targets": jnp.asarray(rng.integers(0, VOCAB, (n, LEN)), jnp.int32),
      "mask": jnp.asarray(mask),
  }


def repad(data: dict[str, jax.Array], seed: int) -> dict[str, jax.Array]:
  """The same sequences with other tokens and targets at the padded positions."""
  rng = np.random.default_rng(seed)
  mask = np.asarray(data["mask"])
  out = dict(data)
  for name in ("tokens", "targets"):
    noise = rng.integers(0, VOCAB, mask.shape)
    out[name] = jnp.asarray(np.where(mask, np.asarray(data[name]), noise), jnp.int32)
  assert any(np.any(np.asarray(out[n])[~mask] != np.asarray(data[n])[~mask])
             for n in ("tokens", "targets"))
  return out


# ------------------------------------------------------------ pure JAX


def init_params(seed: int = 0) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)

  def normal(shape, scale):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

  s = 1.0 / np.sqrt(DIM)
  return {
      "embed": normal((VOCAB, DIM), 1.0),
      "pos": normal((LEN, DIM), 0.3),
      "attn": {"q": normal((DIM, DIM), s), "k": normal((DIM, DIM), s),
               "v": normal((DIM, DIM), s), "o": normal((DIM, DIM), s)},
      "out": {"w": normal((DIM, VOCAB), s), "b": normal((VOCAB,), 0.1)},
  }


def dropout(x: jax.Array, key: jax.Array, rate: float = RATE) -> jax.Array:
  """Inverted dropout whose mask is drawn in float32 (the same bits under x64)."""
  keep = jax.random.uniform(key, x.shape, jnp.float32) >= rate
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _attention(attn: dict[str, jax.Array], h: jax.Array, mask: jax.Array) -> jax.Array:
  q, k, v = h @ attn["q"], h @ attn["k"], h @ attn["v"]
  scores = jnp.einsum("btd,bsd->bts", q, k) * DIM**-0.5  # a weak-typed scale
  causal = jnp.tril(jnp.ones((h.shape[1], h.shape[1]), bool))
  allowed = causal[None] & mask[:, None, :]
  scores = jnp.where(allowed, scores, jnp.asarray(NEG, scores.dtype))
  weights = jax.nn.softmax(scores, axis=-1)
  return h + jnp.einsum("bts,bsd->btd", weights, v) @ attn["o"]


def forward(
    params: dict[str, Any],
    tokens: jax.Array,
    mask: jax.Array,
    *,
    dropout_key: Optional[jax.Array] = None,
    compute_dtype: Any = None,
    remat: bool = False,
) -> jax.Array:
  """Logits ``(batch, LEN, VOCAB)``, at least float32."""
  if compute_dtype is not None:
    params = jax.tree.map(lambda a: a.astype(compute_dtype), params)
  h = params["embed"][tokens] + params["pos"][None, : tokens.shape[1]]
  block = jax.checkpoint(_attention) if remat else _attention
  h = block(params["attn"], h, mask)
  if dropout_key is not None:
    h = dropout(h, dropout_key)
  logits = h @ params["out"]["w"] + params["out"]["b"]
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def masked_ce(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """``Σ mask · CE / Σ mask`` over all tokens."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.sum(mask.astype(ce.dtype))


def metrics(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Token accuracy over the valid tokens, and their number."""
  correct = (jnp.argmax(logits, -1) == targets) & mask
  tokens = jnp.sum(mask.astype(jnp.int32))
  return {"accuracy": jnp.sum(correct) / tokens, "tokens": tokens}


def loss(params: dict[str, Any], data: dict[str, jax.Array], **options: Any) -> jax.Array:
  logits = forward(params, data["tokens"], data["mask"], **options)
  return masked_ce(logits, data["targets"], data["mask"])


def loss_and_metrics(params, data, **options):
  """``(loss, {"accuracy", "tokens"})``: a closure with ``aux``."""
  logits = forward(params, data["tokens"], data["mask"], **options)
  return masked_ce(logits, data["targets"], data["mask"]), metrics(
      logits, data["targets"], data["mask"])


# ---------------------------------------------------------------- Flax


def attention_mask(mask: jax.Array) -> jax.Array:
  """``(batch, 1, LEN, LEN)``: causal, and only valid keys."""
  n = mask.shape[-1]
  causal = jnp.tril(jnp.ones((n, n), bool))
  return (causal[None] & mask[:, None, :])[:, None]


if nn is not None:

  class LinenSeq(nn.Module):
    """Embedding, causal self-attention, dropout, read-out."""

    @nn.compact
    def __call__(self, tokens, mask, train: bool):
      h = nn.Embed(VOCAB, DIM)(tokens)
      h = h + self.param("pos", nn.initializers.normal(0.3), (LEN, DIM))[: tokens.shape[1]]
      h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=DIM)(
          h, h, mask=attention_mask(mask))
      h = nn.Dropout(RATE, deterministic=not train)(h)
      return nn.Dense(VOCAB)(h)

  class NNXSeq(nnx.Module):
    """The same network in NNX; dropout draws from the ``dropout`` stream."""

    def __init__(self, rngs: nnx.Rngs):
      self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
      self.pos = nnx.Param(0.3 * jax.random.normal(rngs.params(), (LEN, DIM)))
      self.attn = nnx.MultiHeadAttention(
          num_heads=2, in_features=DIM, qkv_features=DIM, decode=False, rngs=rngs)
      self.dropout = nnx.Dropout(RATE, rngs=rngs)
      self.out = nnx.Linear(DIM, VOCAB, rngs=rngs)

    def __call__(self, tokens, mask):
      h = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
      h = h + self.attn(h, mask=attention_mask(mask))
      return self.out(self.dropout(h))


def linen_model_loss(model, tokens, targets, mask=None):
  """``model_loss`` for `linen_train_step`: ``(loss, metrics)``, the padding
  mask as a keyword (all tokens valid without it)."""
  mask = jnp.ones(tokens.shape, bool) if mask is None else mask
  logits = model(tokens, mask, train=True)
  return masked_ce(logits, targets, mask), metrics(logits, targets, mask)


def nnx_model_loss(model, tokens, targets, mask=None):
  """``model_loss`` for `nnx_train_step`, as :func:`linen_model_loss`."""
  mask = jnp.ones(tokens.shape, bool) if mask is None else mask
  logits = model(tokens, mask)
  return masked_ce(logits, targets, mask), metrics(logits, targets, mask)
