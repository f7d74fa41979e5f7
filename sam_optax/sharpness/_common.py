"""Helpers shared by the sharpness diagnostics: checks, loss wrappers, flat views."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._core import closure, tree

PyTree = Any
LossFn = Callable[[PyTree], Any]


def check_int(
    caller: str, name: str, value: Any, *, low: int, high: Optional[int] = None
) -> int:
  """``value`` as an ``int``; a ``ValueError`` naming ``name`` if it is not one."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(
        f"`{caller}`: `{name}` must be a Python integer, got {value!r}."
    )
  value = int(value)
  if value < low or (high is not None and value > high):
    upper = f"{high}]" if high is not None else "inf)"
    raise ValueError(
        f"`{caller}`: `{name}` must lie in [{low}, {upper}; got {name}={value!r}."
    )
  return value


def check_choice(caller: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    accepted = ", ".join(repr(c) for c in choices)
    raise ValueError(
        f"`{caller}`: `{name}` must be one of {accepted}; got {name}={value!r}."
    )


def check_loss_fn(caller: str, loss_fn: Any) -> None:
  if not callable(loss_fn):
    raise TypeError(
        f"`{caller}`: `loss_fn` must be callable (params -> loss), got"
        f" {type(loss_fn).__name__}. Close over the batch, the model state and"
        " any random keys: `loss_fn = lambda p: loss(p, batch)`."
    )


def check_float_leaves(caller: str, params: PyTree, name: str = "params") -> None:
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError(f"`{caller}`: `{name}` has no leaves.")
  for leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
          f"`{caller}`: every leaf of `{name}` must be a floating-point array,"
          f" but one has dtype {jnp.result_type(leaf)}. Close over integer or"
          " non-trainable state in `loss_fn` instead of passing it in"
          f" `{name}`."
      )


def scalar_loss(caller: str, loss_fn: LossFn) -> Callable[[PyTree], jax.Array]:
  """``params -> loss``: a checked real scalar, any ``aux`` dropped."""
  check_loss_fn(caller, loss_fn)
  return closure.scalar_loss_fn(caller, loss_fn)


def loss_and_aux(
    caller: str, loss_fn: LossFn
) -> Callable[[PyTree], tuple[jax.Array, Any]]:
  """``params -> (loss, aux)``, with ``aux = None`` for a scalar ``loss_fn``."""
  check_loss_fn(caller, loss_fn)

  def fn(p):
    out = loss_fn(p)
    aux = out[1] if isinstance(out, (tuple, list)) and len(out) == 2 else None
    return closure.scalar_loss(caller, out), aux

  return fn


def loss_dtype(params: PyTree) -> jnp.dtype:
  """The dtype losses and sharpness values are reported in (at least float32)."""
  return functools.reduce(
      jnp.promote_types,
      [tree.wide_dtype(jnp.result_type(x)) for x in jax.tree.leaves(params)],
      jnp.dtype(jnp.float32),
  )


def add_tree(params: PyTree, delta: PyTree) -> PyTree:
  """``params + delta``, summed in the wider dtype and cast to each param's dtype."""

  def leaf(p, d):
    wide = jnp.promote_types(tree.wide_dtype(p.dtype), d.dtype)
    return (p.astype(wide) + d.astype(wide)).astype(p.dtype)

  return jax.tree.map(leaf, params, delta)


class Flat(NamedTuple):
  """A flat view of a parameter pytree: one vector in a wide dtype."""

  size: int
  dtype: jnp.dtype
  ravel: Callable[[PyTree], jax.Array]
  unravel: Callable[[jax.Array], PyTree]


def flat_view(params: PyTree) -> Flat:
  """Flattens like ``params`` into one vector of dtype at least float32.

  ``unravel`` casts each piece back to the dtype of its leaf, so tangents fed
  to ``jax.jvp`` match the primal dtypes (bf16 parameters get bf16 tangents).
  """
  leaves, treedef = jax.tree.flatten(params)
  shapes = [jnp.shape(x) for x in leaves]
  dtypes = [jnp.result_type(x) for x in leaves]
  sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
  splits = np.cumsum(sizes)[:-1].tolist()
  dtype = loss_dtype(params)

  def ravel(t: PyTree) -> jax.Array:
    return jnp.concatenate(
        [jnp.ravel(x).astype(dtype) for x in jax.tree.leaves(t)]
    )

  def unravel(vec: jax.Array) -> PyTree:
    pieces = jnp.split(vec, splits)
    return jax.tree.unflatten(
        treedef,
        [
            p.reshape(s).astype(d)
            for p, s, d in zip(pieces, shapes, dtypes, strict=True)
        ],
    )

  return Flat(sum(sizes), dtype, ravel, unravel)


def normal_like(key: jax.Array, params: PyTree) -> PyTree:
  """Standard normal noise with the shapes of ``params``, in their wide dtypes.

  One draw of a flat vector split over the leaves: a single random-number
  kernel however many leaves there are, which keeps compilation short.
  """
  leaves, treedef = jax.tree.flatten(params)
  sizes = [int(np.prod(jnp.shape(x), dtype=np.int64)) for x in leaves]
  z = jax.random.normal(key, (sum(sizes),), loss_dtype(params))
  pieces = jnp.split(z, np.cumsum(sizes)[:-1].tolist())
  return jax.tree.unflatten(
      treedef,
      [
          p.reshape(jnp.shape(x)).astype(tree.wide_dtype(jnp.result_type(x)))
          for p, x in zip(pieces, leaves, strict=True)
      ],
  )


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _normal(key, *, shape, dtype):
  return jax.random.normal(key, shape, dtype)


def standard_normal(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """``jax.random.normal`` compiled on its own, keyed on shape and dtype only.

  The diagnostics draw their random starts with this outside the program
  that depends on ``loss_fn``, so the random-number kernel is compiled once
  per parameter shape rather than once per loss function.
  """
  return _normal(key, shape=tuple(int(d) for d in shape), dtype=jnp.dtype(dtype))


random_like = jax.jit(normal_like)


# ------------------------------------------------------------- summaries (repr)


def format_number(value: Any) -> str:
  """A Python or NumPy scalar with 4 significant digits (bools and ints as is)."""
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  return f"{float(value):.4g}"


def _shape_and_dtype(x: Any) -> str:
  shape = "x".join(str(d) for d in jnp.shape(x)) or "scalar"
  try:
    dtype = jnp.result_type(x).name
  except Exception:  # pylint: disable=broad-except
    dtype = type(x).__name__
  return f"{shape} {dtype}"


def format_array(x: Any, max_items: int = 4) -> str:
  """A short text for an array: its value(s), or a summary when it is large.

  A scalar is written with 4 significant digits, a vector of at most
  ``max_items`` entries as a list; anything larger as its shape, dtype and
  range. Traced values (inside ``jit``) give their shape and dtype only.
  """
  if x is None:
    return "None"
  try:
    a = np.asarray(x)
  except Exception:  # pylint: disable=broad-except  (a tracer, say)
    return f"<traced {_shape_and_dtype(x)}>"
  if a.dtype == object:
    return f"<{type(x).__name__}>"
  if a.ndim == 0:
    return format_number(a.item())
  if a.ndim == 1 and a.size <= max_items:
    return "[" + ", ".join(format_number(v) for v in a.tolist()) + "]"
  text = f"<{_shape_and_dtype(a)}"
  if a.size and np.issubdtype(a.dtype, np.number):
    finite = a[np.isfinite(a)] if np.issubdtype(a.dtype, np.floating) else a
    if finite.size:
      text += f": min {format_number(finite.min())}, max {format_number(finite.max())}"
    if finite.size < a.size:
      text += f", {a.size - finite.size:,} non-finite"
  return text + ">"


def format_tree(tree: Any, *, batch: int = 0) -> str:
  """``<3 leaves, 1,234 floats>``: a summary of a pytree, without its values.

  With ``batch=k`` the leaves carry a leading axis of ``k`` stacked trees
  (for example ``k`` eigenvectors), and the count is given per tree.
  """
  if tree is None:
    return "None"
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return "<empty tree>"
  size = sum(int(np.prod(jnp.shape(x), dtype=np.int64)) for x in leaves)
  floating = all(
      jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves
  )
  kind = "floats" if floating else "values"
  noun = "leaf" if len(leaves) == 1 else "leaves"
  if batch:
    return f"<{batch} x ({len(leaves)} {noun}, {size // batch:,} {kind} each)>"
  return f"<{len(leaves)} {noun}, {size:,} {kind}>"


def format_coords(x: Any) -> str:
  """Grid coordinates as ``<21 points in [-1, 1]>``."""
  try:
    a = np.asarray(x)
  except Exception:  # pylint: disable=broad-except
    return f"<traced {_shape_and_dtype(x)}>"
  if a.ndim != 1 or not a.size:
    return format_array(a)
  return (
      f"<{a.size} points in [{format_number(a.min())},"
      f" {format_number(a.max())}]>"
  )


def summary_repr(name: str, fields: list[tuple[str, str]], width: int = 100) -> str:
  """``Name(a=..., b=...)`` on one line, or one field a line when too wide."""
  parts = [f"{key}={value}" for key, value in fields]
  line = f"{name}({', '.join(parts)})"
  if len(line) <= width:
    return line
  return f"{name}(\n" + "".join(f"    {p},\n" for p in parts) + ")"
