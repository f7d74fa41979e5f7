"""Masks that select which parameter leaves a rule acts on (optax style)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

PyTree = Any
MaskOrFn = Optional[Union[PyTree, Callable[[PyTree], PyTree]]]


def resolve(caller: str, name: str, mask: MaskOrFn, params: PyTree) -> PyTree:
  """A tree of booleans (one per leaf of ``params``) from ``mask``.

  ``mask`` may be ``None`` (every leaf selected), a pytree of booleans with the
  structure of ``params``, or a callable ``params -> such a tree``. Leaves may
  be Python bools or boolean arrays broadcastable to the parameter's shape.
  """
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  tree = mask(params) if callable(mask) else mask
  if jax.tree.structure(tree) != jax.tree.structure(params):
    raise ValueError(
        f"`{caller}`: `{name}` must have the tree structure of the parameters"
        f" (or be a callable returning one).\n  {name}:"
        f" {jax.tree.structure(tree)}\n  params: {jax.tree.structure(params)}"
    )
  return tree


def select(mask: PyTree, on: PyTree, off: PyTree) -> PyTree:
  """Leaf-wise ``on if mask else off``; Python-bool leaves are resolved statically."""

  def leaf(m, a, b):
    if isinstance(m, bool):
      return a if m else b
    return jnp.where(m, a, b)

  return jax.tree.map(leaf, mask, on, off)


def top_fraction(scores: Any, keep_fraction: Any) -> Any:
  """Boolean tree selecting the largest ``scores`` over all leaves together.

  Keeps ``round(keep_fraction * n)`` of the ``n`` entries, at least one for
  a positive fraction (a global top-k, not per leaf). Ties are broken
  deterministically: among equal scores, the entry that comes first in
  ``jax.tree.leaves`` order (row-major within a leaf) wins.
  ``keep_fraction`` may be a traced value.
  """
  leaves, treedef = jax.tree.flatten(scores)
  if not leaves:
    return scores
  flat = jnp.concatenate([jnp.ravel(x) for x in leaves])
  n = flat.size
  fraction = jnp.asarray(keep_fraction)
  keep = jnp.round(fraction * n).astype(jnp.int32)
  keep = jnp.where(fraction > 0, jnp.maximum(keep, 1), keep)  # never empty
  order = jnp.argsort(-flat, stable=True)
  ranks = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  selected = ranks < keep
  out, start = [], 0
  for x in leaves:
    out.append(selected[start:start + x.size].reshape(x.shape))
    start += x.size
  return jax.tree.unflatten(treedef, out)
