"""Perturbations: how the ascent direction ``d`` (ε = ρ·d) is built from g and w.

Each factory returns a :class:`Perturbation` for
:func:`sam_optax.sharpness_aware`. ``direction(g, params, state, count)``
returns ``(d, state)`` with ``d`` in at least float32.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._core import masking, tree, validation
from sam_optax._core.prng import PRNG, KeyLike, RandomKeyState

__all__ = (
    "FisherMaskState",
    "FriendlySAMState",
    "Perturbation",
    "RandomKeyState",
    "RandomMaskState",
    "VaSSOState",
    "adaptive",
    "centralized",
    "fisher",
    "fisher_mask",
    "friendly",
    "l2",
    "masked",
    "outlier_normalized",
    "random",
    "random_mask",
    "unnormalized",
    "vasso",
)

PyTree = Any


class Perturbation(NamedTuple):
  """Builds the ascent direction.

  Attributes:
    init: ``params -> state``.
    direction: ``(g, params, state, count) -> (d, state)``; ε = ρ·d.
    prepare: ``None`` or ``(g, params, state, count) -> state``, run once per
      step on the clean gradient before ``direction``; with several ascent
      steps, each sees the prepared state.
  """

  init: Callable[[PyTree], PyTree]
  direction: Callable[..., tuple[PyTree, PyTree]]
  prepare: Optional[Callable[..., PyTree]] = None


def _stateless(fn: Callable[[PyTree, PyTree], PyTree]) -> Perturbation:
  def direction(g, params, state, count):
    del count
    return fn(g, params), state

  return Perturbation(lambda params: optax.EmptyState(), direction)


def l2(eps: float = 1e-12) -> Perturbation:
  r"""SAM's direction :math:`d = g / (\|g\|_2 + \mathrm{eps})` (global norm)."""
  validation.check_scalar("l2", "eps", eps, low=0.0, low_inclusive=False)
  return _stateless(
      lambda g, params: tree.scale_wide(g, 1.0 / (tree.global_norm(g) + eps))
  )


def unnormalized() -> Perturbation:
  r"""USAM's direction :math:`d = g` (ρ becomes a step size)."""
  return _stateless(lambda g, params: tree.widen(g))


def _elementwise(
    caller: str,
    scale: Callable[[jax.Array], jax.Array],
    mask: masking.MaskOrFn,
    eps: float,
) -> Perturbation:
  r"""The direction :math:`d = T^2 g / (\|T g\|_2 + \mathrm{eps})` of an
  element-wise operator :math:`T`: ``scale(w)`` (``w`` in at least float32)
  on the leaves selected by ``mask``, 1 on the others."""

  def direction(g, params):
    selected = masking.resolve(caller, "mask", mask, params)
    t = jax.tree.map(lambda p: scale(p.astype(tree.wide_dtype(p.dtype))), params)
    t = masking.select(selected, t, jax.tree.map(jnp.ones_like, t))
    tg = jax.tree.map(lambda ti, gi: ti * gi.astype(ti.dtype), t, g)
    factor = 1.0 / (tree.global_norm(tg) + eps)
    return jax.tree.map(lambda ti, x: ti * x * factor, t, tg)

  def init(params):
    masking.resolve(caller, "mask", mask, params)  # fail early on a bad mask
    return optax.EmptyState()

  return Perturbation(init, _stateless(direction).direction)


def adaptive(
    eta: float = 0.01, *, mask: masking.MaskOrFn = None, eps: float = 1e-12
) -> Perturbation:
  r"""ASAM's direction :math:`d = T_w^2 g / (\|T_w g\|_2 + \mathrm{eps})`.

  :math:`T_w = |w| + \eta` element-wise on the leaves selected by ``mask``
  (all by default), 1 on the others.
  """
  validation.check_scalar("adaptive", "eta", eta, low=0.0)
  validation.check_scalar("adaptive", "eps", eps, low=0.0, low_inclusive=False)
  return _elementwise("asam", lambda w: jnp.abs(w) + eta, mask, eps)


_LEAF_NORMS = {
    "max": lambda a: jnp.max(a, initial=0.0),
    "l2": lambda a: jnp.sqrt(jnp.sum(a * a)),
}


def outlier_normalized(
    eta: float = 0.01,
    *,
    norm: str = "max",
    mask: masking.MaskOrFn = None,
    eps: float = 1e-12,
) -> Perturbation:
  r"""SAMSON's direction: ASAM's operator divided by a norm of the whole leaf.

  :math:`T_w = (|w| + \eta) / \|W\|` element-wise, where :math:`W` is the
  whole leaf that contains :math:`w` (a layer's kernel) and the norm is
  ``"max"`` (the default, :math:`\max |W|`, the layer's largest weight: a
  layer with outliers has its typical weights perturbed less) or ``"l2"``
  (:math:`\|W\|_2`). ``d = T² g / (‖T g‖₂ + eps)`` as for :func:`adaptive`.
  A leaf whose norm is 0 (all zeros, such as freshly initialized biases)
  gets :math:`T = 1`, as do the leaves outside ``mask``.
  """
  validation.check_scalar("outlier_normalized", "eta", eta, low=0.0)
  validation.check_option("outlier_normalized", "norm", norm, tuple(_LEAF_NORMS))
  validation.check_scalar(
      "outlier_normalized", "eps", eps, low=0.0, low_inclusive=False
  )
  leaf_norm = _LEAF_NORMS[norm]

  def scale(w):
    a = jnp.abs(w)
    n = leaf_norm(a)
    return jnp.where(n > 0, (a + eta) / jnp.where(n > 0, n, 1.0), 1.0)

  return _elementwise("samson", scale, mask, eps)


def masked(
    inner: Perturbation, mask: masking.MaskOrFn, *, mask_gradient: bool = True
) -> Perturbation:
  r"""Restricts any perturbation to the leaves (or entries) selected by ``mask``.

  With ``mask_gradient=True`` the gradient is masked *before* ``inner`` sees
  it, so norms are taken over the selected entries only (SAM-ON):
  for ``l2``, :math:`d = M \odot g / \|M \odot g\|`. With ``False`` the
  direction of ``inner`` is masked afterwards (Fisher-mask SAM and SSAM in
  their official code): :math:`d = M \odot g / \|g\|`.

  ``mask`` is a pytree of booleans (Python bools or boolean arrays of the
  leaves' shapes) with the structure of ``params``, or a callable
  ``params -> mask``. Unselected entries are never perturbed.
  """

  def direction(g, params, state, count):
    selected = masking.resolve("masked", "mask", mask, params)
    if mask_gradient:
      g = masking.select(selected, g, jax.tree.map(jnp.zeros_like, g))
    d, state = inner.direction(g, params, state, count)
    d = masking.select(selected, d, jax.tree.map(jnp.zeros_like, d))
    return d, state

  def init(params):
    masking.resolve("masked", "mask", mask, params)
    return inner.init(params)

  return Perturbation(init, direction, inner.prepare)


def fisher(eta: float = 1.0, *, eps: float = 1e-12) -> Perturbation:
  r"""Fisher SAM's direction :math:`d = F^{-1} g / \sqrt{g^\top F^{-1} g}` with
  the diagonal :math:`F = 1 + \eta g^2`, so that :math:`\epsilon^\top F
  \epsilon = \rho^2`."""
  validation.check_scalar("fisher_sam", "eta", eta, low=0.0)

  def direction(g, params):
    del params
    g = tree.widen(g)
    u = jax.tree.map(
        lambda x: x / (1 + jnp.asarray(eta).astype(x.dtype) * x * x), g
    )
    return tree.scale_wide(u, 1.0 / (jnp.sqrt(tree.vdot(g, u)) + eps))

  return _stateless(direction)


def _moving_average(new_weight: Callable[[], Any]) -> Callable[..., Any]:
  """``m ← (1 − a) m + a g`` leaf-wise (``m = g`` at step 0), kept wide."""

  def update(grads, average, count):
    first = count == 0

    def leaf(g, m):
      g = g.astype(m.dtype)
      a = jnp.asarray(new_weight()).astype(m.dtype)
      return jnp.where(first, g, (1 - a) * m + a * g).astype(m.dtype)

    return jax.tree.map(leaf, grads, average)

  return update


class VaSSOState(NamedTuple):
  """The moving average :math:`d_t` of the clean gradients (float32 or wider)."""

  d: Any


def vasso(theta: float = 0.9, *, eps: float = 1e-12) -> Perturbation:
  r"""VaSSO's direction :math:`d_t / \|d_t\|` with
  :math:`d_t = (1-\theta) d_{t-1} + \theta g_t` and :math:`d_0 = g_0`."""
  validation.check_scalar("vasso", "theta", theta, low=0.0, high=1.0)
  average = _moving_average(lambda: theta)

  def init(params):
    return VaSSOState(d=tree.widen(optax.tree.zeros_like(params)))

  def direction(g, params, state, count):
    del params
    d = average(g, state.d, count)
    return tree.scale_wide(d, 1.0 / (tree.global_norm(d) + eps)), VaSSOState(d)

  return Perturbation(init, direction)


class FriendlySAMState(NamedTuple):
  """The moving average :math:`m` of the clean gradients (float32 or wider)."""

  momentum: Any


def friendly(
    sigma: float = 1.0, lam: float = 0.6, *, eps: float = 1e-12
) -> Perturbation:
  r"""F-SAM's direction :math:`d/\|d\|` with :math:`d = g_t - \sigma m_{t-1}`,
  :math:`m_t = \lambda m_{t-1} + (1-\lambda) g_t` (:math:`d = m = g` at step 0)."""
  validation.check_scalar("friendly_sam", "sigma", sigma, low=0.0)
  validation.check_scalar("friendly_sam", "lam", lam, low=0.0, high=1.0)
  average = _moving_average(lambda: 1 - jnp.asarray(lam))

  def init(params):
    return FriendlySAMState(momentum=tree.widen(optax.tree.zeros_like(params)))

  def direction(g, params, state, count):
    del params
    first = count == 0

    def diff(gi, m):
      gi = gi.astype(m.dtype)
      return jnp.where(first, gi, gi - jnp.asarray(sigma).astype(m.dtype) * m)

    d = jax.tree.map(diff, g, state.momentum)
    momentum = average(g, state.momentum, count)
    d = tree.scale_wide(d, 1.0 / (tree.global_norm(d) + eps))
    return d, FriendlySAMState(momentum=momentum)

  return Perturbation(init, direction)


class FisherMaskState(NamedTuple):
  """The state of :func:`sam_optax.perturbations.fisher_mask`.

  Attributes:
    mask: boolean arrays shaped like the parameters: the entries perturbed
      until the next refresh (all ``False`` before the first step).
    score: with ``score="accumulated"``, the squared clean gradients summed
      since the last refresh (float32 or wider); ``()`` with ``"current"``.
  """

  mask: Any
  score: Any


def _exempt_leaves(caller: str, exempt: masking.MaskOrFn, params: Any) -> list:
  """``exempt`` resolved against ``params``: one Python bool per leaf."""
  n = len(jax.tree.leaves(params))
  if exempt is None:
    return [False] * n
  resolved = masking.resolve(caller, "exempt", exempt, params)
  out = []
  for path, e in jax.tree_util.tree_flatten_with_path(resolved)[0]:
    if not isinstance(e, (bool, np.bool_)):
      raise ValueError(
          f"`{caller}`: `exempt` leaves must be Python bools (whole"
          f" parameters are exempt or not); got {e!r} at"
          f" {jax.tree_util.keystr(path)!r}."
      )
    out.append(bool(e))
  return out


def fisher_mask(
    sparsity: float = 0.9,
    refresh_every: int = 100,
    *,
    score: str = "accumulated",
    normalize: str = "full",
    eps: float = 1e-12,
    exempt: masking.MaskOrFn = None,
    count: str = "round",
) -> Perturbation:
  r"""SAM's direction restricted to a mask of the largest Fisher scores.

  On steps 0, N, 2N, ... (N = ``refresh_every``) the mask is recomputed,
  before that step's perturbation, as the global top ``1 - sparsity``
  fraction of the score (squared clean gradients, summed since the last
  refresh or of the current step only) over the parameters not in
  ``exempt``; the refresh runs inside ``jax.lax.cond``. ``exempt`` (``None``,
  a pytree of Python bools with the parameters' structure, or a callable
  ``params -> such a tree``) names whole parameters that are left out of
  the ranking and always selected, so they get SAM's full perturbation (as
  biases, embeddings and BatchNorm parameters in Zhong et al.'s code).
  ``count`` is ``"round"`` (``round(fraction * n)``, at least one) or
  ``"floor"`` (``floor(fraction * n)``, as Zhong et al.'s ``int(n *
  keep_ratio)``), ``n`` the number of entries ranked. The direction is
  :math:`M \odot g / \|g\|` (``normalize="full"``) or :math:`M \odot g /
  \|M \odot g\|` (``"masked"``). See :func:`sam_optax.fisher_masked_sam`.
  """
  caller = "fisher_masked_sam"
  validation.check_scalar(caller, "sparsity", sparsity, low=0.0, high=1.0)
  validation.check_int(caller, "refresh_every", refresh_every, low=1)
  validation.check_option(caller, "score", score, ("accumulated", "current"))
  validation.check_option(caller, "normalize", normalize, ("masked", "full"))
  validation.check_option(caller, "count", count, ("round", "floor"))
  accumulate = score == "accumulated"
  inner = l2(eps)
  static_sparsity = validation.concrete_float(sparsity)

  def keep_fraction():
    if count == "floor" and static_sparsity is not None:
      # In Python float64, rounded so that sparsity=0.9 keeps exactly the
      # Python float 0.1 (the authors' keep_ratio), not 0.09999999999999998.
      return round(1.0 - static_sparsity, 12)
    fraction = 1 - jnp.asarray(sparsity)
    if count == "floor":  # the same rounding for a traced sparsity
      fraction = jnp.round(fraction * 1e12) / 1e12
    return fraction

  def init(params):
    # zeros_like keeps each parameter's sharding, which the refreshed mask
    # (resharded like its score) has too: under explicit sharding the two
    # branches of the refresh conditional must agree.
    if masking.is_placeholder(params):  # see `masking.is_placeholder`
      ex = None
    else:
      ex = _exempt_leaves(caller, exempt, params)
    leaves, treedef = jax.tree.flatten(params)
    mask = jax.tree.unflatten(treedef, [
        jnp.ones_like(p, jnp.bool_) if ex and ex[i] else jnp.zeros_like(p, jnp.bool_)
        for i, p in enumerate(leaves)
    ])
    acc = tree.widen(optax.tree.zeros_like(params)) if accumulate else ()
    return FisherMaskState(mask=mask, score=acc)

  def prepare(g, params, state, count_):
    ex = _exempt_leaves(caller, exempt, params)
    if accumulate:
      acc = jax.tree.map(
          lambda s, gi: s + jnp.square(gi.astype(s.dtype)), state.score, g
      )
    else:
      acc = jax.tree.map(lambda gi: jnp.square(tree.widen(gi)), g)

    def refresh(acc):
      scores, treedef = jax.tree.flatten(acc)
      old = jax.tree.leaves(state.mask)
      ranked = masking.top_fraction(
          [s for s, e in zip(scores, ex) if not e], keep_fraction(), count
      )
      ranked = iter(ranked)
      # Exempt leaves keep their all-True mask from `init`.
      new = [m if e else next(ranked) for m, e in zip(old, ex)]
      new = jax.tree.unflatten(jax.tree.structure(state.mask), new)
      return new, jax.tree.map(jnp.zeros_like, acc) if accumulate else ()

    def keep(acc):
      return state.mask, acc if accumulate else ()

    due = count_ % jnp.asarray(refresh_every, count_.dtype) == 0
    mask, acc = jax.lax.cond(due, refresh, keep, acc)
    return FisherMaskState(mask=mask, score=acc)

  def direction(g, params, state, count_):
    sub = masked(inner, state.mask, mask_gradient=normalize == "masked")
    d, _ = sub.direction(g, params, optax.EmptyState(), count_)
    return d, state

  return Perturbation(init, direction, prepare)


FILTER_AXES = {"last": -1, "first": 0}


def check_filter_axis(caller: str, filter_axis: Any) -> None:
  """Raises ``ValueError`` unless ``filter_axis`` is ``"last"`` or ``"first"``."""
  if not isinstance(filter_axis, str) or filter_axis not in FILTER_AXES:
    raise ValueError(
        f"`{caller}`: `filter_axis` must be \"last\" (Flax layout, kernels"
        " (..., in, out)) or \"first\" (PyTorch layout, (out, in, ...)); got"
        f" filter_axis={filter_axis!r}."
    )


def _filter_norm(w: jax.Array, filter_axis: str) -> jax.Array:
  """The norm of each element's filter (of the whole leaf below 2-D), wide."""
  wide = w.astype(tree.wide_dtype(w.dtype))
  if wide.ndim < 2:
    return jnp.sqrt(jnp.sum(jnp.square(wide)))
  axis = FILTER_AXES[filter_axis] % wide.ndim
  others = tuple(a for a in range(wide.ndim) if a != axis)
  return jnp.sqrt(jnp.sum(jnp.square(wide), axis=others, keepdims=True))


def gaussian_noise(
    keys: jax.Array, params: PyTree, filter_axis: str = "last",
    relative: bool = True,
) -> PyTree:
  """``z * ‖filter‖`` (``relative``) or ``z``, ``z ~ N(0, 1)`` shaped like ``params``.

  Leaf ``i`` uses ``keys[i]``; the result is in at least float32.
  """
  leaves, treedef = jax.tree.flatten(params)
  noise = []
  for k, w in zip(keys, leaves, strict=True):
    z = jax.random.normal(k, jnp.shape(w), tree.wide_dtype(w.dtype))
    noise.append(z * _filter_norm(w, filter_axis) if relative else z)
  return jax.tree.unflatten(treedef, noise)


def random(
    key: KeyLike = 0, *, filter_axis: str = "last", relative: bool = True
) -> Perturbation:
  r"""RWP's random direction: Gaussian noise, independent of the gradient.

  With ``relative=True`` (RWP), the noise of each filter :math:`W_i` of a
  leaf is scaled by the filter's norm, so that
  :math:`\epsilon_{W,i} = \rho d_{W,i} \sim \mathcal{N}(0, \rho^2
  \|W_i\|_2^2 I)`. The filters of a leaf with two or more dimensions are
  its slices along ``filter_axis`` (``"last"``: the output columns and
  channels of Flax kernels; ``"first"``: the PyTorch layout); leaves with
  fewer dimensions use the norm of the whole leaf. With ``relative=False``,
  :math:`d \sim \mathcal{N}(0, I)`.

  A fresh draw is made at every step from the key in the part's state (a
  :class:`RandomKeyState`); with several ascent steps, each adds the same
  draw. The direction does not vanish with the gradient. See
  :func:`sam_optax.rwp`.

  Examples:
    RWP's noise with SAM's output (the perturbed gradient), the pass every
    third step:

    >>> import sam_optax
    >>> tx = sam_optax.sharpness_aware(
    ...     rho=0.01,
    ...     perturbation=sam_optax.perturbations.random(key=0),
    ...     policy=sam_optax.policies.every(3),
    ... )
  """
  check_filter_axis("random", filter_axis)
  if not isinstance(relative, bool):
    raise ValueError(
        f"`random`: `relative` must be True or False; got relative={relative!r}."
    )
  prng = PRNG.of("random", key)

  def direction(g, params, state, count):
    del g, count
    state, keys = prng.split(state, len(jax.tree.leaves(params)))
    return gaussian_noise(keys, params, filter_axis, relative), state

  return Perturbation(lambda params: prng.init(), direction)


class RandomMaskState(NamedTuple):
  """The state of :func:`random_mask`.

  Attributes:
    key: raw ``uint32`` data of the PRNG key for the next step's mask (see
      :class:`RandomKeyState`).
    inner: the state of the wrapped perturbation.
  """

  key: jax.Array
  inner: Any


def random_mask(
    beta: float = 0.6,
    key: KeyLike = 0,
    *,
    inner: Optional[Perturbation] = None,
    mask_gradient: bool = True,
) -> Perturbation:
  r"""ESAM's stochastic weight perturbation: a fresh random subset of leaves.

  Every step, each leaf of the parameter tree (one weight tensor) is kept
  with probability :math:`\beta`, independently; with :math:`M` that mask,
  the direction is that of :func:`masked` ``(inner, M)`` scaled by
  :math:`1/\beta`. For ``inner = l2()`` (the default) and
  ``mask_gradient=True`` this is ESAM's

  .. math::

    d = \frac{1}{\beta} \, \frac{M \odot g}{\|M \odot g\|_2 + \mathrm{eps}} .

  The mask is drawn from the key in the part's state, which advances every
  step; several ascent steps within a step share one mask. ``beta = 1``
  keeps every leaf and is ``inner`` itself.

  Args:
    beta: probability :math:`\beta \in (0, 1]` that a leaf is perturbed.
    key: a non-negative int seed or a JAX PRNG key.
    inner: the perturbation restricted to the mask (default :func:`l2`).
    mask_gradient: as in :func:`masked`: mask the gradient before ``inner``
      sees it (norms over the kept leaves), or only its direction after.

  Examples:
    ESAM's random masks with GSAM's output, the pass every other step:

    >>> import jax.numpy as jnp, sam_optax
    >>> tx = sam_optax.sharpness_aware(
    ...     rho=0.05,
    ...     perturbation=sam_optax.perturbations.random_mask(beta=0.5, key=0),
    ...     direction=sam_optax.directions.gsam(alpha=0.1),
    ...     policy=sam_optax.policies.every(2),
    ... )
    >>> params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> type(state.variant.perturbation).__name__
    'RandomMaskState'
  """
  validation.check_scalar(
      "random_mask", "beta", beta, low=0.0, high=1.0, low_inclusive=False
  )
  prng = PRNG.of("random_mask", key)
  inner = l2() if inner is None else inner

  def init(params):
    return RandomMaskState(key=prng.init().key, inner=inner.init(params))

  def direction(g, params, state, count):
    leaves, treedef = jax.tree.flatten(params)
    advanced, keys = prng.split(RandomKeyState(state.key), len(leaves))
    p = jnp.asarray(beta, jnp.float32)
    kept = jax.tree.unflatten(
        treedef, [jax.random.bernoulli(k, p) for k in keys]
    )
    sub = masked(inner, kept, mask_gradient=mask_gradient)
    d, inner_state = sub.direction(g, params, state.inner, count)
    d = tree.scale_wide(d, 1.0 / p)
    return d, RandomMaskState(key=advanced.key, inner=inner_state)

  prepare = None
  if inner.prepare is not None:

    def prepare(g, params, state, count):
      return state._replace(inner=inner.prepare(g, params, state.inner, count))

  return Perturbation(init, direction, prepare)


def centralize(g: jax.Array, filter_axis: str = "last") -> jax.Array:
  """Gradient centralization of one leaf: below 2-D the leaf itself; else the
  mean over every axis but the filter axis subtracted (Yong et al., 2020)."""
  if g.ndim < 2:
    return g
  axis = FILTER_AXES[filter_axis] % g.ndim
  others = tuple(a for a in range(g.ndim) if a != axis)
  return g - jnp.mean(g, axis=others, keepdims=True)


_CENTRALIZED_NORMS = ("raw", "centralized")


def centralized(
    filter_axis: str = "last", *, norm: str = "raw", eps: float = 1e-12
) -> Perturbation:
  r"""GCSAM's direction: SAM's with each kernel's gradient centralized.

  :math:`d = \Phi(g) / (\|g\|_2 + \mathrm{eps})` (``norm="raw"``, the
  global norm of the gradient before centralizing, so that
  :math:`\|\epsilon\| \le \rho`) or :math:`\Phi(g) / (\|\Phi(g)\|_2 +
  \mathrm{eps})` (``norm="centralized"``, :math:`\|\epsilon\| = \rho`).
  :math:`\Phi` subtracts from every leaf with two or more dimensions its
  mean over all axes but ``filter_axis`` (one mean per output column or
  channel: ``"last"`` for Flax kernels ``(..., in, out)``, ``"first"`` for
  the PyTorch layout ``(out, in, ...)``); leaves with fewer dimensions
  (biases, scales) are left as they are. See :func:`sam_optax.gcsam`.
  """
  check_filter_axis("gcsam", filter_axis)
  validation.check_option("gcsam", "norm", norm, _CENTRALIZED_NORMS)
  validation.check_scalar("gcsam", "eps", eps, low=0.0, low_inclusive=False)

  def direction(g, params):
    del params
    g = tree.widen(g)
    c = jax.tree.map(lambda x: centralize(x, filter_axis), g)
    n = tree.global_norm(g if norm == "raw" else c)
    return tree.scale_wide(c, 1.0 / (n + eps))

  return _stateless(direction)
