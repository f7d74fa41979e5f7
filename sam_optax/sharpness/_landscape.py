"""Loss landscapes: filter-normalized directions, interpolations and slices."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._core import closure
from sam_optax.sharpness import _common

PyTree = Any

_NORMALIZATIONS = ("filter", "layer", None)
_ONE_D = ("zero", "weights", "keep")


class LossCurve(NamedTuple):
  """A 1-D loss profile, from :func:`linear_interpolation` or :func:`loss_slice_1d`.

  Attributes:
    alphas: the coordinates, shape ``(n,)``.
    losses: the loss at each coordinate, shape ``(n,)``.
    aux: the ``aux`` output of ``loss_fn`` at each coordinate (leading axis
      ``n``), or ``None`` when ``loss_fn`` returns a bare loss.
  """

  alphas: jax.Array
  losses: jax.Array
  aux: Any = None

  def __repr__(self) -> str:
    return _common.summary_repr(type(self).__name__, [
        ("alphas", _common.format_coords(self.alphas)),
        ("losses", _common.format_array(self.losses, max_items=0)),
        ("aux", _common.format_tree(self.aux)),
    ])


class LossSurface(NamedTuple):
  """A 2-D loss slice, from :func:`loss_slice_2d`.

  Attributes:
    xs: coordinates along the first direction, shape ``(nx,)``.
    ys: coordinates along the second direction, shape ``(ny,)``.
    losses: the loss on the grid, shape ``(ny, nx)``: row ``i``, column ``j``
      is the point ``xs[j], ys[i]``, the layout
      ``matplotlib.pyplot.contour(xs, ys, losses)`` expects.
    aux: the ``aux`` output of ``loss_fn`` on the grid (leading axes
      ``(ny, nx)``), or ``None``.
  """

  xs: jax.Array
  ys: jax.Array
  losses: jax.Array
  aux: Any = None

  def __repr__(self) -> str:
    return _common.summary_repr(type(self).__name__, [
        ("xs", _common.format_coords(self.xs)),
        ("ys", _common.format_coords(self.ys)),
        ("losses", _common.format_array(self.losses, max_items=0)),
        ("aux", _common.format_tree(self.aux)),
    ])


def filter_normalize(
    direction: PyTree,
    params: PyTree,
    *,
    normalization: Optional[str] = "filter",
    one_d: str = "zero",
    filter_axis: int = -1,
    eps: float = 1e-10,
) -> PyTree:
  r"""Rescales a direction filter by filter to the norms of the weights.

  Filter normalization (Li et al., 2018) makes loss-landscape pictures of
  different networks comparable despite the scale invariance of ReLU
  networks. For every leaf with two or more dimensions and every filter
  :math:`j` (an index along ``filter_axis``: one output unit of a Dense
  kernel of shape ``(in, out)``, one output channel of a Conv kernel of
  shape ``(..., in, out)``),

  .. math::

    d_j \leftarrow \frac{d_j}{\|d_j\| + \mathrm{eps}}\, \|w_j\|,

  so :math:`\|d_j\| = \|w_j\|`, norms taken over all other axes. With
  ``normalization="layer"`` the whole leaf is one filter; with ``None`` the
  multi-dimensional leaves are left unchanged. Leaves with at most one
  dimension (biases, normalization scales, scalars) follow ``one_d``:

  * ``"zero"`` (Li et al.'s default): the direction is 0 there, so those
    parameters stay fixed;
  * ``"weights"``: the direction equals the weights (the alternative in Li
    et al.'s code), so it has their norm;
  * ``"keep"``: the direction is left unchanged.

  Args:
    direction: a pytree like ``params``.
    params: the weights whose filter norms are matched.
    normalization: ``"filter"``, ``"layer"`` or ``None``.
    one_d: ``"zero"``, ``"weights"`` or ``"keep"``.
    filter_axis: the axis indexing filters in multi-dimensional leaves;
      ``-1`` for Flax/JAX kernels, ``0`` for PyTorch-style ``(out, in, ...)``
      layouts.
    eps: added to each direction filter's norm.

  Returns:
    The normalized direction, a pytree like ``direction``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> params = {"w": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "b": jnp.ones(2)}
    >>> direction = {"w": jnp.array([[1.0, 2.0], [0.0, 0.0]]), "b": jnp.ones(2)}
    >>> d = sharpness.filter_normalize(direction, params)
    >>> d["w"].tolist(), d["b"].tolist()
    ([[5.0, 1.0], [0.0, 0.0]], [0.0, 0.0])

  References:
    Li, Xu, Taylor, Studer, Goldstein, *Visualizing the Loss Landscape of
    Neural Nets*, NeurIPS 2018. https://arxiv.org/abs/1712.09913
  """
  caller = "filter_normalize"
  _common.check_choice(caller, "normalization", normalization, _NORMALIZATIONS)
  _common.check_choice(caller, "one_d", one_d, _ONE_D)
  closure.check_same_tree(caller, direction, params, "`direction`", "params")
  if not isinstance(filter_axis, (int, np.integer)) or isinstance(filter_axis, bool):
    raise ValueError(
        f"`{caller}`: `filter_axis` must be an integer axis, got"
        f" filter_axis={filter_axis!r}."
    )

  return _filter_normalize(
      direction, params, normalization=normalization, one_d=one_d,
      filter_axis=int(filter_axis), eps=float(eps),
  )


@functools.partial(
    jax.jit, static_argnames=("normalization", "one_d", "filter_axis", "eps")
)
def _filter_normalize(direction, params, *, normalization, one_d, filter_axis, eps):
  caller = "filter_normalize"

  def leaf(d, w):
    if jnp.ndim(w) <= 1:
      if one_d == "zero":
        return jnp.zeros_like(d)
      if one_d == "weights":
        return jnp.asarray(w).astype(d.dtype)
      return d
    if normalization is None:
      return d
    if normalization == "layer":
      axes = None
    else:
      if not -w.ndim <= filter_axis < w.ndim:
        raise ValueError(
            f"`{caller}`: `filter_axis` must lie in [{-w.ndim}, {w.ndim - 1}]"
            f" for a leaf of shape {w.shape}; got filter_axis={filter_axis}."
        )
      keep = filter_axis % w.ndim
      axes = tuple(a for a in range(w.ndim) if a != keep)
    wide = _common.loss_dtype(d)
    d_norm = jnp.sqrt(jnp.sum(jnp.square(d.astype(wide)), axis=axes, keepdims=True))
    w_norm = jnp.sqrt(jnp.sum(jnp.square(w.astype(wide)), axis=axes, keepdims=True))
    return (d.astype(wide) * (w_norm / (d_norm + eps))).astype(d.dtype)

  return jax.tree.map(leaf, direction, params)


def random_direction(
    key: jax.Array,
    params: PyTree,
    *,
    normalization: Optional[str] = "filter",
    one_d: str = "zero",
    filter_axis: int = -1,
) -> PyTree:
  """A Gaussian random direction, filter-normalized to ``params``.

  Draws :math:`d \\sim \\mathcal N(0, I)` with the shapes of ``params`` (in
  float32 or wider) and applies :func:`filter_normalize`.

  Args:
    key: a ``jax.random`` key.
    params: the weights the direction is normalized to.
    normalization, one_d, filter_axis: as in :func:`filter_normalize`.

  Returns:
    A pytree like ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    >>> d = sharpness.random_direction(jax.random.key(0), params)
    >>> jnp.linalg.norm(d["w"], axis=0).round(4).tolist(), d["b"].tolist()
    ([1.7321, 1.7321, 1.7321, 1.7321], [0.0, 0.0, 0.0, 0.0])
  """
  _common.check_float_leaves("random_direction", params)
  caller = "random_direction"
  _common.check_choice(caller, "normalization", normalization, _NORMALIZATIONS)
  _common.check_choice(caller, "one_d", one_d, _ONE_D)
  return _random_direction(
      key, params, normalization=normalization, one_d=one_d,
      filter_axis=filter_axis,
  )


@functools.partial(
    jax.jit, static_argnames=("normalization", "one_d", "filter_axis")
)
def _random_direction(key, params, *, normalization, one_d, filter_axis):
  return filter_normalize(
      _common.normal_like(key, params), params, normalization=normalization,
      one_d=one_d, filter_axis=filter_axis,
  )


def _coords(caller: str, name: str, values: Any, num_points: int, extent: Any):
  if values is None:
    num_points = _common.check_int(caller, "num_points", num_points, low=2)
    lo, hi = extent
    return np.linspace(lo, hi, num_points)
  arr = np.asarray(values)
  if (
      arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.number)
      or not np.all(np.isfinite(arr))
  ):
    raise ValueError(
        f"`{caller}`: `{name}` must be a non-empty 1-D array of finite"
        f" coordinates, got {values!r}."
    )
  return arr


def _extent(caller: str, extent: Any) -> tuple[float, float]:
  """``extent`` as ``(lo, hi)``: a number ``e`` means ``(-e, e)``."""
  arr = np.asarray(extent, dtype=float)
  if arr.shape == ():
    lo, hi = -float(arr), float(arr)
  elif arr.shape == (2,):
    lo, hi = float(arr[0]), float(arr[1])
  else:
    lo, hi = np.nan, np.nan
  if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
    raise ValueError(
        f"`{caller}`: `extent` must be a positive number e (for [-e, e]) or a"
        f" pair (lo, hi) with lo < hi; got extent={extent!r}."
    )
  return lo, hi


def _check_batch_size(caller: str, batch_size: Optional[int]) -> Optional[int]:
  if batch_size is None:
    return None
  return _common.check_int(caller, "batch_size", batch_size, low=1)


@functools.partial(jax.jit, static_argnames=("loss_fn", "caller", "batch_size"))
def _evaluate(loss_fn, origin, directions, coords, *, caller, batch_size):
  """The loss at ``origin + Σ_i c_i directions[i]`` for each row ``c`` of ``coords``."""
  fn = _common.loss_and_aux(caller, loss_fn)
  dtype = _common.loss_dtype(origin)

  def one(c):
    delta = jax.tree.map(
        lambda *ds: sum(ci.astype(d.dtype) * d for ci, d in zip(c, ds, strict=True)),
        *directions,
    )
    loss, aux = fn(_common.add_tree(origin, delta))
    return loss.astype(dtype), aux

  return jax.lax.map(one, coords, batch_size=batch_size)


def _wide(tree):
  return jax.tree.map(lambda x: x.astype(_common.loss_dtype(x)), tree)


def linear_interpolation(
    loss_fn: _common.LossFn,
    params_a: PyTree,
    params_b: PyTree,
    *,
    alphas: Optional[Sequence[float]] = None,
    num_points: int = 25,
    extent: Any = (-0.5, 1.5),
    batch_size: Optional[int] = 8,
) -> LossCurve:
  r"""The loss along the straight line between two parameter sets.

  .. math::

    \alpha \mapsto L\big((1 - \alpha)\, w_a + \alpha\, w_b\big),

  so :math:`\alpha = 0` is ``params_a`` and :math:`\alpha = 1` is
  ``params_b`` (Goodfellow et al., 2015). A barrier between two solutions,
  or the width of the basin around each, shows up directly. The points are
  evaluated with ``jax.lax.map``, ``batch_size`` at a time under ``vmap``.

  Args:
    loss_fn: ``params -> loss`` or ``params -> (loss, aux)``; an ``aux``
      (for example an accuracy) is returned for every point.
    params_a: the parameters at :math:`\alpha = 0`.
    params_b: the parameters at :math:`\alpha = 1`, a pytree like
      ``params_a``.
    alphas: the coordinates; by default ``num_points`` evenly spaced over
      ``extent``.
    num_points: number of default coordinates, at least 2.
    extent: ``(lo, hi)`` of the default coordinates, or ``e`` for
      ``(-e, e)``.
    batch_size: points evaluated at once; ``None`` evaluates them one after
      another (least memory).

  Returns:
    A :class:`LossCurve`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: jnp.sum(w ** 2)
    >>> curve = sharpness.linear_interpolation(
    ...     loss_fn, jnp.array([-1.0, 0.0]), jnp.array([1.0, 0.0]),
    ...     alphas=[0.0, 0.25, 0.5, 1.0])
    >>> curve.losses.tolist()
    [1.0, 0.25, 0.0, 1.0]

  References:
    Goodfellow, Vinyals, Saxe, *Qualitatively Characterizing Neural Network
    Optimization Problems*, ICLR 2015. https://arxiv.org/abs/1412.6544
  """
  caller = "linear_interpolation"
  _common.check_loss_fn(caller, loss_fn)
  _common.check_float_leaves(caller, params_a, "params_a")
  closure.check_same_tree(caller, params_b, params_a, "`params_b`", "params_a")
  alphas = _coords(caller, "alphas", alphas, num_points, _extent(caller, extent))
  batch_size = _check_batch_size(caller, batch_size)
  diff = jax.tree.map(lambda b, a: b - a, _wide(params_b), _wide(params_a))
  dtype = _common.loss_dtype(params_a)
  coords = jnp.asarray(alphas, dtype)
  losses, aux = _evaluate(
      loss_fn, params_a, (diff,), coords[:, None], caller=caller,
      batch_size=batch_size,
  )
  return LossCurve(coords, losses, aux)


def _directions(caller, params, given, key, count, normalization, one_d, filter_axis):
  if (given is None) == (key is None):
    what = "direction" if count == 1 else "directions"
    raise ValueError(
        f"`{caller}`: pass exactly one of `{what}` (explicit) and `key` (random,"
        " filter-normalized); got "
        + ("both." if key is not None else "neither.")
    )
  if given is None:
    keys = [key] if count == 1 else list(jax.random.split(key, count))
    return tuple(
        random_direction(
            k, params, normalization=normalization, one_d=one_d,
            filter_axis=filter_axis,
        )
        for k in keys
    )
  given = (given,) if count == 1 else tuple(given)
  if len(given) != count:
    raise ValueError(
        f"`{caller}`: `directions` must be a pair (d_x, d_y) of pytrees like"
        f" params; got {len(given)} of them."
    )
  for i, d in enumerate(given):
    name = "`direction`" if count == 1 else f"`directions[{i}]`"
    closure.check_same_tree(caller, d, params, name, "params")
  return tuple(_wide(d) for d in given)


def loss_slice_1d(
    loss_fn: _common.LossFn,
    params: PyTree,
    direction: Optional[PyTree] = None,
    *,
    key: Optional[jax.Array] = None,
    alphas: Optional[Sequence[float]] = None,
    num_points: int = 25,
    extent: Any = 1.0,
    normalization: Optional[str] = "filter",
    one_d: str = "zero",
    filter_axis: int = -1,
    batch_size: Optional[int] = 8,
) -> LossCurve:
  r"""The loss along one direction: :math:`\alpha \mapsto L(w + \alpha d)`.

  Give the direction :math:`d` explicitly, or a ``key`` to draw
  ``random_direction(key, params, ...)`` (filter-normalized by default, so
  :math:`\alpha = 1` moves every filter by its own norm). The points are
  evaluated with ``jax.lax.map``, ``batch_size`` at a time under ``vmap``.

  Args:
    loss_fn: ``params -> loss`` or ``params -> (loss, aux)``; an ``aux`` is
      returned for every point.
    params: the centre :math:`w`.
    direction: :math:`d`, a pytree like ``params``, used as given.
    key: a ``jax.random`` key, instead of ``direction``.
    alphas: the coordinates; by default ``num_points`` evenly spaced over
      ``extent``.
    num_points: number of default coordinates, at least 2.
    extent: ``e`` for ``[-e, e]``, or ``(lo, hi)``.
    normalization, one_d, filter_axis: for the random direction, see
      :func:`filter_normalize`.
    batch_size: points evaluated at once; ``None`` evaluates them one after
      another.

  Returns:
    A :class:`LossCurve`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: jnp.sum(w ** 2)
    >>> curve = sharpness.loss_slice_1d(
    ...     loss_fn, jnp.zeros(2), jnp.array([1.0, 1.0]), num_points=5)
    >>> curve.alphas.tolist(), curve.losses.tolist()
    ([-1.0, -0.5, 0.0, 0.5, 1.0], [2.0, 0.5, 0.0, 0.5, 2.0])

  References:
    Li, Xu, Taylor, Studer, Goldstein, *Visualizing the Loss Landscape of
    Neural Nets*, NeurIPS 2018. https://arxiv.org/abs/1712.09913
  """
  caller = "loss_slice_1d"
  _common.check_loss_fn(caller, loss_fn)
  _common.check_float_leaves(caller, params)
  alphas = _coords(caller, "alphas", alphas, num_points, _extent(caller, extent))
  batch_size = _check_batch_size(caller, batch_size)
  dirs = _directions(
      caller, params, direction, key, 1, normalization, one_d, filter_axis
  )
  coords = jnp.asarray(alphas, _common.loss_dtype(params))
  losses, aux = _evaluate(
      loss_fn, params, dirs, coords[:, None], caller=caller, batch_size=batch_size
  )
  return LossCurve(coords, losses, aux)


def loss_slice_2d(
    loss_fn: _common.LossFn,
    params: PyTree,
    directions: Optional[tuple[PyTree, PyTree]] = None,
    *,
    key: Optional[jax.Array] = None,
    xs: Optional[Sequence[float]] = None,
    ys: Optional[Sequence[float]] = None,
    num_points: int = 21,
    extent: Any = 1.0,
    normalization: Optional[str] = "filter",
    one_d: str = "zero",
    filter_axis: int = -1,
    batch_size: Optional[int] = 8,
) -> LossSurface:
  r"""The loss on a plane: :math:`(x, y) \mapsto L(w + x\, d_x + y\, d_y)`.

  Give the two directions explicitly, or a ``key``: then
  ``k_x, k_y = jax.random.split(key)`` and each direction is
  ``random_direction(k, params, ...)``, filter-normalized by default (Li et
  al., 2018). In high dimension two random directions are nearly
  orthogonal. The ``nx * ny`` points are evaluated with ``jax.lax.map``,
  ``batch_size`` at a time under ``vmap``.

  Args:
    loss_fn: ``params -> loss`` or ``params -> (loss, aux)``; an ``aux`` is
      returned for every point.
    params: the centre :math:`w`.
    directions: ``(d_x, d_y)``, pytrees like ``params``, used as given.
    key: a ``jax.random`` key, instead of ``directions``.
    xs, ys: the coordinates along each direction; by default ``num_points``
      evenly spaced over ``extent``.
    num_points: number of default coordinates per axis, at least 2.
    extent: ``e`` for ``[-e, e]``, or ``(lo, hi)``, for both axes.
    normalization, one_d, filter_axis: for random directions, see
      :func:`filter_normalize`.
    batch_size: points evaluated at once; ``None`` evaluates them one after
      another.

  Returns:
    A :class:`LossSurface` with ``losses`` of shape ``(ny, nx)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: w[0] ** 2 + 4.0 * w[1] ** 2
    >>> surface = sharpness.loss_slice_2d(
    ...     loss_fn, jnp.zeros(2), (jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])),
    ...     xs=[-1.0, 0.0, 1.0], ys=[0.0, 0.5])
    >>> surface.losses.tolist()
    [[1.0, 0.0, 1.0], [2.0, 1.0, 2.0]]

  References:
    Li, Xu, Taylor, Studer, Goldstein, *Visualizing the Loss Landscape of
    Neural Nets*, NeurIPS 2018. https://arxiv.org/abs/1712.09913
  """
  caller = "loss_slice_2d"
  _common.check_loss_fn(caller, loss_fn)
  _common.check_float_leaves(caller, params)
  ext = _extent(caller, extent)
  xs = _coords(caller, "xs", xs, num_points, ext)
  ys = _coords(caller, "ys", ys, num_points, ext)
  batch_size = _check_batch_size(caller, batch_size)
  dirs = _directions(
      caller, params, directions, key, 2, normalization, one_d, filter_axis
  )
  dtype = _common.loss_dtype(params)
  gx, gy = np.meshgrid(xs, ys)
  coords = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], axis=1), dtype)
  losses, aux = _evaluate(
      loss_fn, params, dirs, coords, caller=caller, batch_size=batch_size
  )
  shape = (len(ys), len(xs))
  aux = jax.tree.map(lambda a: a.reshape(shape + a.shape[1:]), aux)
  return LossSurface(
      jnp.asarray(xs, dtype), jnp.asarray(ys, dtype), losses.reshape(shape), aux
  )
