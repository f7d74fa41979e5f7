"""Directions: how the clean gradient g and the perturbed one g_p become the output.

Each factory returns a :class:`Direction` for
:func:`sam_optax.sharpness_aware`. ``combine`` runs on steps that take the
perturbed pass, ``fallback`` on steps a policy skips.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import tree, validation

__all__ = (
    "Direction",
    "LookSAMState",
    "WSAMState",
    "gsam",
    "looksam",
    "mix",
    "perturbed",
    "weighted",
)

PyTree = Any


class Direction(NamedTuple):
  """Forms the output direction.

  Attributes:
    init: ``params -> state``.
    combine: ``(g, g_p, params, state) -> (out, state)``, or ``None`` for
      SAM's output ``g_p`` (the pipeline then frees ``g`` before the pass).
    fallback: ``(g, params, state) -> (out, state)`` on skipped steps.
  """

  init: Callable[[PyTree], PyTree]
  combine: Optional[Callable[..., tuple[PyTree, PyTree]]]
  fallback: Callable[..., tuple[PyTree, PyTree]]


def _clean(g, params, state):
  del params
  return g, state


def perturbed() -> Direction:
  """SAM's output: the perturbed gradient ``g_p``; skipped steps return ``g``."""

  return Direction(lambda params: optax.EmptyState(), None, _clean)


def mix(alpha: float = 0.5) -> Direction:
  r"""RWP's output :math:`\alpha g_p + (1 - \alpha) g`; skipped steps return ``g``.

  ``alpha = 1`` is :func:`perturbed`, ``alpha = 0`` the clean gradient.
  """
  validation.check_scalar("mix", "alpha", alpha, low=0.0, high=1.0)

  def combine(g, g_p, params, state):
    del params

    def leaf(clean, perturbed):
      wide = jnp.promote_types(tree.wide_dtype(clean.dtype), perturbed.dtype)
      a = jnp.asarray(alpha).astype(wide)
      return a * perturbed.astype(wide) + (1 - a) * clean.astype(wide)

    return jax.tree.map(leaf, g, g_p), state

  return Direction(lambda params: optax.EmptyState(), combine, _clean)


def gsam(alpha: float = 0.1, *, eps: float = 1e-12) -> Direction:
  r"""GSAM's output :math:`g_p - \alpha g_\perp`, with :math:`g_\perp` the part of
  the clean gradient orthogonal to :math:`g_p`."""
  validation.check_scalar("gsam", "alpha", alpha, low=0.0)

  def combine(g, g_p, params, state):
    del params
    g_p = tree.widen(g_p)
    unit = tree.scale_wide(g_p, 1.0 / (tree.global_norm(g_p) + eps))
    along = tree.vdot(g, unit)
    out = jax.tree.map(
        lambda gp, gi, ui: gp - alpha * (gi.astype(gp.dtype) - along * ui),
        g_p, g, unit,
    )
    return out, state

  return Direction(lambda params: optax.EmptyState(), combine, _clean)


class LookSAMState(NamedTuple):
  """The component of the last perturbed gradient orthogonal to its clean one."""

  g_v: Any


def looksam(alpha: float = 0.7, *, eps: float = 1e-12) -> Direction:
  r"""LookSAM's reuse: store :math:`g_v = g_p - \frac{g_p\cdot g}{\|g\|^2} g`
  when the pass runs; on skipped steps return
  :math:`g + \alpha \frac{\|g\|}{\|g_v\|} g_v`."""
  validation.check_scalar("looksam", "alpha", alpha, low=0.0)

  def init(params):
    return LookSAMState(g_v=tree.widen(optax.tree.zeros_like(params)))

  def combine(g, g_p, params, state):
    del params
    g_p = tree.widen(g_p)
    coef = tree.vdot(g_p, g) / jnp.maximum(tree.vdot(g, g), eps * eps)
    g_v = jax.tree.map(
        lambda s, gi, old: (s - coef * gi.astype(s.dtype)).astype(old.dtype),
        g_p, g, state.g_v,
    )
    return g_p, LookSAMState(g_v=g_v)

  def fallback(g, params, state):
    del params
    scale = alpha * tree.global_norm(g) / jnp.maximum(
        tree.global_norm(state.g_v), eps
    )
    out = jax.tree.map(
        lambda gi, v: gi.astype(v.dtype) + scale.astype(v.dtype) * v,
        g, state.g_v,
    )
    return out, state

  return Direction(init, combine, fallback)


def clip_like_torch(g: PyTree, max_norm: Optional[float]) -> PyTree:
  """``torch.nn.utils.clip_grad_norm_``: ``g · min(1, c / (‖g‖ + 1e-6))``."""
  if max_norm is None:
    return g
  g = tree.widen(g)
  factor = jnp.minimum(1.0, max_norm / (tree.global_norm(g) + 1e-6))
  return tree.scale_wide(g, factor)


class WSAMState(NamedTuple):
  """The decoupled sharpness term :math:`g_p - g` of the last pass (float32
  or wider); ``()`` in the coupled form."""

  sharpness: Any


def weighted(
    gamma: float = 0.88,
    *,
    decoupled: bool = False,
    max_norm: Optional[float] = None,
) -> Direction:
  r"""WSAM's output with the sharpness weighted by :math:`\alpha = \gamma/(1-\gamma)`.

  Coupled: :math:`g + \alpha (g_p - g)` (:math:`\alpha g_p + (1-\alpha) g`;
  :math:`\gamma = 1/2` is SAM). Decoupled: the output is :math:`g` and the
  state keeps :math:`g_p - g` for a step outside the base optimizer (see
  :func:`sam_optax.wsam_decoupled`). With ``max_norm``, ``g`` and ``g_p``
  are each clipped to that global norm first, as ``torch``'s
  ``clip_grad_norm_`` does. Skipped steps return ``g`` (sharpness 0).
  """
  validation.check_scalar(
      "wsam", "gamma", gamma, low=0.0, high=1.0, high_inclusive=False
  )
  if max_norm is not None:
    validation.check_scalar(
        "wsam", "max_norm", max_norm, low=0.0, low_inclusive=False
    )
  alpha = gamma / (1.0 - gamma)

  def init(params):
    if not decoupled:
      return WSAMState(sharpness=())
    return WSAMState(sharpness=tree.widen(optax.tree.zeros_like(params)))

  def combine(g, g_p, params, state):
    del params
    clean, adv = clip_like_torch(g, max_norm), clip_like_torch(g_p, max_norm)

    def diff(c, a):
      wide = jnp.promote_types(tree.wide_dtype(c.dtype), a.dtype)
      return a.astype(wide) - c.astype(wide)

    sharp = jax.tree.map(diff, clean, adv)
    if decoupled:
      kept = jax.tree.map(lambda x, old: x.astype(old.dtype), sharp, state.sharpness)
      return clean, WSAMState(sharpness=kept)
    out = jax.tree.map(
        lambda c, d: c.astype(d.dtype) + jnp.asarray(alpha, d.dtype) * d,
        clean, sharp,
    )
    return out, state

  def fallback(g, params, state):
    del params
    if decoupled:
      state = WSAMState(jax.tree.map(jnp.zeros_like, state.sharpness))
    return g, state

  return Direction(init, combine, fallback)
