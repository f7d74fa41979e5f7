"""Small character-level language models in Flax Linen, sized for two CPU cores.

* :class:`CausalTransformer`: token embedding plus learned positions,
  pre-LayerNorm blocks (causal multi-head self-attention, GELU MLP),
  dropout on the embeddings, the attention weights and both residual
  branches, a final LayerNorm, and an output layer tied to the input
  embedding (``logits = h @ E^T``).
* :class:`GRULanguageModel`: the same embedding (no positions), stacked GRU
  layers with dropout between them, a final LayerNorm and the tied output.

:func:`language_model` wraps either as a :class:`LanguageModel` of pure
functions, ``init(key) -> params`` and ``apply(params, x, *, dropout_key)
-> logits``: with a key, dropout is on (training); without, off. A SAM
step must use the same key in both passes, so the loss closure closes over
it (see :func:`loss_closure`). :func:`lm_loss` is the mean per-token
cross-entropy, with an optional mask that leaves out padding.
:func:`hidden_states` returns the final hidden states instead of the logits,
for a task head on a pre-trained model (``benchmarks/fine_tuning.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Params = Any
_INIT = nn.initializers.normal(0.02)


class TransformerBlock(nn.Module):
  """Pre-LN block: ``x + Drop(Attn(LN(x)))``, then ``x + Drop(MLP(LN(x)))``."""

  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.1
  num_layers: int = 2
  attention_dropout: float | None = None

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    d = x.shape[-1]
    # GPT-2's scaling of the residual projections by 1/sqrt(2 * layers).
    out_init = nn.initializers.normal(0.02 / (2 * self.num_layers) ** 0.5)
    h = nn.LayerNorm(name="ln_attn")(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        dropout_rate=self.dropout if self.attention_dropout is None else self.attention_dropout,
        kernel_init=_INIT, out_kernel_init=out_init, name="attn",
    )(h, h, mask=mask, deterministic=not train)
    x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.Dense(self.mlp_ratio * d, kernel_init=_INIT, name="mlp_in")(h)
    h = nn.Dense(d, kernel_init=out_init, name="mlp_out")(nn.gelu(h))
    return x + nn.Dropout(self.dropout)(h, deterministic=not train)


class CausalTransformer(nn.Module):
  """A decoder-only Transformer: ``tokens (B, T) -> logits (B, T, vocab)``.

  Attributes:
    vocab_size: number of token ids.
    max_len: longest sequence (the learned position table's length).
    d_model: width.
    num_layers: blocks.
    num_heads: attention heads.
    mlp_ratio: MLP width / ``d_model``.
    dropout: dropout rate (embeddings, residual branches, and attention
      weights unless ``attention_dropout`` is given).
    attention_dropout: dropout rate of the attention weights (``None``:
      ``dropout``). It draws ``T / d_model`` times the random bits of the
      other dropouts, the larger part of dropout's cost on a CPU.
  """

  vocab_size: int
  max_len: int = 128
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  dropout: float = 0.1
  attention_dropout: float | None = None

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, return_hidden: bool = False):
    length = tokens.shape[-1]
    if length > self.max_len:
      raise ValueError(f"sequence of {length} tokens exceeds max_len {self.max_len}.")
    embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=_INIT, name="embed")
    pos = self.param("pos", _INIT, (self.max_len, self.d_model))
    x = embed(tokens) + pos[:length]
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    mask = nn.make_causal_mask(tokens)  # (B, 1, T, T): query i sees keys j <= i
    for i in range(self.num_layers):
      x = TransformerBlock(self.num_heads, self.mlp_ratio, self.dropout,
                           self.num_layers, self.attention_dropout,
                           name=f"block{i}")(x, mask, train=train)
    x = nn.LayerNorm(name="ln_out")(x)
    if return_hidden:  # the final hidden states (B, T, d_model), for a task head
      return x
    return embed.attend(x)  # tied output layer


class GRULanguageModel(nn.Module):
  """Stacked GRUs: ``tokens (B, T) -> logits (B, T, vocab)``, tied output.

  Attributes:
    vocab_size: number of token ids.
    d_model: embedding and hidden width.
    num_layers: GRU layers.
    dropout: dropout rate (embeddings and between layers).
  """

  vocab_size: int
  d_model: int = 128
  num_layers: int = 2
  dropout: float = 0.1

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, return_hidden: bool = False):
    embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=_INIT, name="embed")
    x = nn.Dropout(self.dropout)(embed(tokens), deterministic=not train)
    for i in range(self.num_layers):
      x = nn.RNN(nn.GRUCell(self.d_model), name=f"gru{i}")(x)
      x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = nn.LayerNorm(name="ln_out")(x)
    if return_hidden:
      return x
    return embed.attend(x)


class LanguageModel(NamedTuple):
  """A model as pure functions.

  Attributes:
    name: ``"transformer"`` or ``"gru"``.
    module: the Flax module.
    init: ``key -> params``.
    apply: ``(params, x, *, dropout_key=None) -> logits``; dropout is on
      exactly when a key is given.
    description: architecture in words.
  """

  name: str
  module: nn.Module
  init: Callable[[jax.Array], Params]
  apply: Callable[..., jax.Array]
  description: str


def language_model(kind: str, vocab_size: int, *, length: int = 128, d_model: int = 128,
                   num_layers: int = 2, num_heads: int = 4, dropout: float = 0.1,
                   attention_dropout: float | None = None) -> LanguageModel:
  """A :class:`LanguageModel` of ``kind`` ``"transformer"`` or ``"gru"``."""
  if kind == "transformer":
    module = CausalTransformer(vocab_size, length, d_model, num_layers, num_heads,
                               dropout=dropout, attention_dropout=attention_dropout)
    attn = dropout if attention_dropout is None else attention_dropout
    desc = (f"causal Transformer, {num_layers} pre-LN layers, width {d_model},"
            f" {num_heads} heads, dropout {dropout:g} (attention weights"
            f" {attn:g}), tied embeddings")
  elif kind == "gru":
    module = GRULanguageModel(vocab_size, d_model, num_layers, dropout)
    desc = (f"GRU, {num_layers} layers, width {d_model}, dropout {dropout:g},"
            " tied embeddings")
  else:
    raise ValueError(f"unknown model {kind!r}; use 'transformer' or 'gru'.")

  def init(key: jax.Array) -> Params:
    return module.init(key, jnp.zeros((1, length), jnp.int32))["params"]

  def apply(params: Params, x: jax.Array, *, dropout_key: jax.Array | None = None):
    if dropout_key is None:
      return module.apply({"params": params}, x, train=False)
    return module.apply({"params": params}, x, train=True, rngs={"dropout": dropout_key})

  return LanguageModel(kind, module, init, apply, desc)


def hidden_states(model: LanguageModel, params: Params, x: jax.Array, *,
                  dropout_key: jax.Array | None = None) -> jax.Array:
  """The final hidden states ``(B, T, d_model)`` (after the last LayerNorm).

  The logits of ``model.apply`` are these times the transposed embedding;
  a task head (fine-tuning) reads them instead. Dropout as in ``apply``.
  """
  if dropout_key is None:
    return model.module.apply({"params": params}, x, train=False, return_hidden=True)
  return model.module.apply({"params": params}, x, train=True, return_hidden=True,
                            rngs={"dropout": dropout_key})


def lm_loss(logits: jax.Array, targets: jax.Array,
            mask: jax.Array | None = None) -> jax.Array:
  """Mean per-token cross-entropy (nats); with ``mask``, over the tokens where it is 1."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  if mask is None:
    return losses.mean()
  mask = mask.astype(jnp.float32)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def loss_closure(model: LanguageModel, x: jax.Array, y: jax.Array,
                 dropout_key: jax.Array, mask: jax.Array | None = None):
  """``params -> loss`` on one batch with fixed dropout masks.

  The key is closed over, so the clean pass and SAM's perturbed pass drop
  the same units.
  """
  return lambda p: lm_loss(model.apply(p, x, dropout_key=dropout_key), y, mask)


def num_params(params: Params) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))
