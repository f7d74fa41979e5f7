"""Pytree arithmetic shared by every transform: wide norms and dtype-safe sums."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def wide_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """The dtype a reduction over ``dtype`` values is carried out in.

  At least float32 (bf16/fp16 are promoted), float64 kept when x64 is on.
  """
  return jnp.promote_types(dtype, jnp.float32)


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm over all leaves together, accumulated in at least float32.

  An empty tree has norm 0. Complex leaves contribute ``|x|²``.
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  sq = [
      jnp.sum(jnp.square(jnp.abs(x.astype(wide_dtype(x.dtype))))) for x in leaves
  ]
  return jnp.sqrt(sum(sq[1:], sq[0]))


def _leaf_vdot(x: jax.Array, y: jax.Array) -> jax.Array:
  x, y = x.astype(wide_dtype(x.dtype)), y.astype(wide_dtype(y.dtype))
  if jnp.iscomplexobj(x):
    x = jnp.conj(x)
  # An element-wise product and a full reduction, not `jnp.vdot`: vdot
  # flattens its operands, a reshape that JAX's explicit sharding rejects
  # for an array sharded over a mesh axis; a sum keeps every layout.
  return jnp.sum(x * y).real


def vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Real inner product over all leaves, accumulated in at least float32.

  ``Re Σ conj(a) b`` per leaf, summed over leaves; no leaf is reshaped, so
  parameters sharded over a mesh (explicit sharding included) stay as they
  are.
  """
  parts = [
      _leaf_vdot(x, y)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]
  if not parts:
    return jnp.zeros((), jnp.float32)
  return sum(parts[1:], parts[0])


def widen(tree: PyTree) -> PyTree:
  """Every leaf cast to at least float32."""
  return jax.tree.map(lambda x: x.astype(wide_dtype(x.dtype)), tree)


def scale_wide(tree: PyTree, scale: jax.Array) -> PyTree:
  """``scale * tree``, each leaf computed in at least float32 (and kept wide)."""

  def leaf(x):
    wide = jnp.promote_types(wide_dtype(x.dtype), scale.dtype)
    return x.astype(wide) * scale.astype(wide)

  return jax.tree.map(leaf, tree)


def add_scaled(params: PyTree, direction: PyTree, scale: jax.Array) -> PyTree:
  """``params + scale * direction``, computed wide and cast to each param's dtype.

  ``scale`` is a scalar; ``direction`` has the structure of ``params``.
  """

  def leaf(p, d):
    wide = jnp.promote_types(wide_dtype(p.dtype), scale.dtype)
    return (p.astype(wide) + scale.astype(wide) * d.astype(wide)).astype(p.dtype)

  return jax.tree.map(leaf, params, direction)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
  """Cast every leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """``on_true`` where the scalar ``pred`` holds, else ``on_false``, per leaf.

  A select, not a conditional: both trees exist already, and nothing of the
  unselected one (NaN included) reaches the result.
  """
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
