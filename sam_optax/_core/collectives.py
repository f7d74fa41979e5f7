"""Data-parallel SAM: which devices share a perturbation, and the final average.

A transform built with ``axis_name`` runs inside a mapped computation
(``jax.shard_map``, ``jax.pmap`` or ``jax.vmap`` with that axis name): each
member of the axis (a device, or a micro-batch under ``vmap``) passes its own
*local* clean gradient. :class:`Axis` describes

* over which members the clean gradient is averaged before the perturbation
  is built: none (per-device, m-sharpness; the default), groups of
  ``group_size`` consecutive members, or all of them
  (``sync_perturbation=True``);
* the average of the returned direction over the whole axis, so that every
  member applies the same update.

Under ``jax.shard_map`` with ``check_vma=True`` JAX types every value as
varying or replicated over each mesh axis, and the gradient with respect to a
replicated input is summed over the axis automatically. The helpers here
check that the clean gradient is local (varying) and mark the perturbed point
varying before it is differentiated, so the perturbed gradient is local too.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

PyTree = Any
AxisName = Union[str, tuple[str, ...]]


def _names(axis_name: AxisName) -> tuple[str, ...]:
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _varying(x: Any) -> frozenset:
  manual = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(getattr(manual, "varying", ()) or ())


def check_options(
    caller: str, axis_name: Any, sync_perturbation: Any, group_size: Any
) -> None:
  """Construction-time checks of the data-parallel options."""
  if axis_name is not None:
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if not isinstance(names, tuple) or not names or not all(
        isinstance(n, str) for n in names
    ):
      raise ValueError(
          f"`{caller}`: `axis_name` must be None, a mapped axis name (str) or"
          f" a tuple of names; got axis_name={axis_name!r}."
      )
  if not isinstance(sync_perturbation, bool):
    raise ValueError(
        f"`{caller}`: `sync_perturbation` must be True or False; got"
        f" sync_perturbation={sync_perturbation!r}."
    )
  if group_size is not None and (
      isinstance(group_size, bool)
      or not isinstance(group_size, int)
      or group_size < 1
  ):
    raise ValueError(
        f"`{caller}`: `group_size` must be None or a positive int (the number"
        f" of consecutive devices that share one perturbation); got"
        f" group_size={group_size!r}."
    )
  if axis_name is None and (sync_perturbation or group_size is not None):
    raise ValueError(
        f"`{caller}`: `sync_perturbation` and `group_size` need `axis_name`,"
        " the mapped axis over which the batch is split (e.g."
        " `axis_name='batch'`)."
    )
  if sync_perturbation and group_size is not None:
    raise ValueError(
        f"`{caller}`: pass either `sync_perturbation=True` (one perturbation"
        f" for the whole axis) or `group_size={group_size}`, not both."
    )
  if group_size is not None and not isinstance(axis_name, str):
    raise ValueError(
        f"`{caller}`: `group_size` needs a single axis name; got"
        f" axis_name={axis_name!r}."
    )


class Axis(NamedTuple):
  """The data-parallel configuration of a transform (``name=None``: none)."""

  name: Optional[AxisName] = None
  sync: bool = False
  group_size: Optional[int] = None

  @property
  def active(self) -> bool:
    return self.name is not None

  def _vma(self) -> bool:
    """Whether values are typed varying/replicated (shard_map check_vma)."""
    names = _names(self.name)
    return set(names) <= _varying(jax.lax.axis_index(names))

  def check_local(self, caller: str, grads: PyTree) -> None:
    """Raises if the axis is unbound or the clean gradient already reduced."""
    try:
      vma = self._vma()
    except NameError as err:
      raise ValueError(
          f"`{caller}`: `axis_name={self.name!r}` names an axis that is not"
          " bound where `update` runs. Call `update` inside `jax.shard_map`,"
          " `jax.pmap` or `jax.vmap` over that axis (with"
          f" `axis_name={self.name!r}`), or leave `axis_name` out for"
          " single-device training."
      ) from err
    if not vma:
      return
    names = set(_names(self.name))
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
      if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) and not (
          names <= _varying(leaf)
      ):
        raise ValueError(
            f"`{caller}`: the clean gradient at"
            f" {jax.tree_util.keystr(path) or 'the root'} is replicated over"
            f" axis {self.name!r}, so it is not this device's local gradient."
            " Inside `jax.shard_map` the gradient with respect to replicated"
            " parameters is summed over the axis. Differentiate with respect"
            f" to `jax.lax.pcast(params, {self.name!r}, to='varying')`"
            " instead, and pass that local gradient; the transform averages"
            " over the axis itself (`sync_perturbation=True` for one shared"
            " perturbation)."
        )

  def to_varying(self, tree: PyTree) -> PyTree:
    """Marks leaves varying so their gradient stays local (check_vma only)."""
    if not self.active or not self._vma():
      return tree
    names = _names(self.name)

    def cast(x):
      if jax.dtypes.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
        return x
      missing = tuple(n for n in names if n not in _varying(x))
      return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)

  def perturbation_gradient(self, grads: PyTree) -> PyTree:
    """The gradient the perturbation is built from: local, group or global mean."""
    if not self.active:
      return grads
    if self.sync:
      return jax.lax.pmean(grads, self.name)
    if self.group_size is None or self.group_size == 1:
      return grads
    return _group_mean(grads, self.name, self.group_size)

  def mean(self, tree: PyTree) -> PyTree:
    """The average of floating leaves over the whole axis."""
    if not self.active:
      return tree
    return jax.lax.pmean(tree, self.name)

  def any(self, flag: jax.Array) -> jax.Array:
    """True on every member if ``flag`` is true on any."""
    if not self.active:
      return flag
    return jax.lax.psum(flag.astype(jnp.int32), self.name) > 0

  def agree(self, tree: PyTree) -> PyTree:
    """One value for every member: floats averaged, others from member 0.

    Typed PRNG keys are left as they are (they are derived from replicated
    state and are the same on every member).
    """
    if not self.active:
      return tree
    vma = self._vma()
    names = _names(self.name)
    first = jax.lax.axis_index(names) == 0

    def one(x):
      x = jnp.asarray(x)
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return x
      if vma and not set(names) <= _varying(x):
        return x  # already replicated
      if jnp.issubdtype(x.dtype, jnp.inexact):
        return jax.lax.pmean(x, names)
      wide = jnp.int32 if x.dtype == jnp.bool_ else x.dtype
      picked = jnp.where(first, x.astype(wide), jnp.zeros_like(x, wide))
      return jax.lax.psum(picked, names).astype(x.dtype)

    return jax.tree.map(one, tree)


def _group_mean(tree: PyTree, name: str, size: int) -> PyTree:
  """Mean over groups of ``size`` consecutive members of axis ``name``.

  Recursive doubling (``log2(size)`` exchanges) when ``size`` is a power of
  two, else a ring within each group (``size - 1`` exchanges); both with
  ``jax.lax.ppermute``, which works under ``shard_map``, ``pmap`` and
  ``vmap``.
  """
  n = jax.lax.axis_size(name)
  if n % size:
    raise ValueError(
        f"`group_size={size}` must divide the size of axis {name!r}, {n}."
    )
  if size & (size - 1) == 0:
    total, bit = tree, 1
    while bit < size:
      perm = [(i, i ^ bit) for i in range(n)]
      total = jax.tree.map(
          lambda t, p=perm: t + jax.lax.ppermute(t, name, p), total
      )
      bit *= 2
  else:
    perm = [(i, i - i % size + (i % size + 1) % size) for i in range(n)]
    total, moving = tree, tree
    for _ in range(size - 1):
      moving = jax.tree.map(lambda t: jax.lax.ppermute(t, name, perm), moving)
      total = jax.tree.map(jnp.add, total, moving)
  return jax.tree.map(lambda t: t / jnp.asarray(size, t.dtype), total)
