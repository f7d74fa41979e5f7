"""Masks that select which parameter leaves a rule acts on (optax style)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

PyTree = Any
MaskOrFn = Optional[Union[PyTree, Callable[[PyTree], PyTree]]]


def is_placeholder(params: PyTree) -> bool:
  """Whether ``params`` is the stand-in ``optax.tree.map_params`` passes to ``init``.

  ``optax.tree.map_params`` (the documented way to derive sharding specs of
  an optimizer state) calls ``init`` once with a placeholder in place of the
  parameters, a pytree node without leaves, to locate the parameter-shaped
  parts of the state. A mask cannot be checked against it; ``init`` must
  only return the state's structure with the placeholder where parameter
  trees go (as ``optax.masked`` does).
  """
  kind = type(params)
  return kind.__name__ == "_ParamsPlaceholder" and kind.__module__.startswith(
      "optax"
  )


def resolve(caller: str, name: str, mask: MaskOrFn, params: PyTree) -> PyTree:
  """A tree of booleans (one per leaf of ``params``) from ``mask``.

  ``mask`` may be ``None`` (every leaf selected), a pytree of booleans with the
  structure of ``params``, or a callable ``params -> such a tree``. Leaves may
  be Python bools or boolean arrays broadcastable to the parameter's shape.
  For the placeholder of ``optax.tree.map_params`` (see
  :func:`is_placeholder`) it returns the placeholder, unchecked.
  """
  if is_placeholder(params):
    return params
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
  """Leaf-wise ``on if mask else off``; Python-bool leaves are resolved statically.

  Under explicit sharding an array mask leaf is resharded like ``on``'s leaf.
  """

  def leaf(m, a, b):
    if isinstance(m, bool):
      return a if m else b
    sharding = _explicit_sharding(a)
    if sharding is not None and _explicit_sharding(m) != sharding:
      # Explicit sharding wants the selector laid out like the cases (a
      # mask built by `jnp.arange(...)` or a stored one may be replicated).
      m = jax.sharding.reshard(jnp.broadcast_to(m, jnp.shape(a)), sharding)
    return jnp.where(m, a, b)

  return jax.tree.map(leaf, mask, on, off)


def top_fraction(scores: Any, keep_fraction: Any, count: str = "round") -> Any:
  """Boolean tree selecting the largest ``scores`` over all leaves together.

  With ``count="round"`` it keeps ``round(keep_fraction * n)`` of the ``n``
  entries, at least one for a positive fraction; with ``count="floor"``,
  ``floor(keep_fraction * n)``, possibly none (``int(n * keep_ratio)`` of
  Zhong et al.'s code; a Python-float ``keep_fraction`` is counted in
  Python float64 as there, a traced one in its own dtype). It is a global
  top-k, not per leaf. Ties are broken deterministically: among equal
  scores, the entry that comes first in ``jax.tree.leaves`` order
  (row-major within a leaf) wins. ``keep_fraction`` may be a traced value.

  Leaves sharded over a mesh axis in JAX's explicit sharding mode are
  gathered (``jax.sharding.reshard`` to replicated) before they are
  flattened, and each leaf of the result is resharded like its score; the
  ranking is the same as unsharded. Under automatic sharding the compiler
  places the gather itself.
  """
  leaves, treedef = jax.tree.flatten(scores)
  if not leaves:
    return scores
  shardings = [_explicit_sharding(x) for x in leaves]
  flat = jnp.concatenate([
      jnp.ravel(x if s is None else jax.sharding.reshard(x, NamedSharding(s.mesh, P())))
      for x, s in zip(leaves, shardings)
  ])
  n = flat.size
  if count == "floor":
    if isinstance(keep_fraction, (int, float)):
      keep = jnp.asarray(math.floor(n * float(keep_fraction)), jnp.int32)
    else:
      keep = jnp.floor(jnp.asarray(keep_fraction) * n).astype(jnp.int32)
  else:
    fraction = jnp.asarray(keep_fraction)
    keep = jnp.round(fraction * n).astype(jnp.int32)
    keep = jnp.where(fraction > 0, jnp.maximum(keep, 1), keep)  # never empty
  order = jnp.argsort(-flat, stable=True)
  ranks = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  selected = ranks < keep
  out, start = [], 0
  for x, sharding in zip(leaves, shardings):
    leaf = selected[start:start + x.size].reshape(jnp.shape(x))
    if sharding is not None:
      leaf = jax.sharding.reshard(leaf, sharding)
    out.append(leaf)
    start += x.size
  return jax.tree.unflatten(treedef, out)


def _explicit_sharding(x: Any) -> Optional[jax.sharding.NamedSharding]:
  """The sharding in ``x``'s type when a mesh axis shards it explicitly, else None.

  Under JAX's explicit sharding mode an array's type records the mesh axes
  it is split over, and reshaping such an array (as flattening does) is a
  type error; automatic-mode and unsharded arrays give ``None``.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(axis is None for axis in spec):
    return None
  return sharding
