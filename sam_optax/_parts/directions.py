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

__all__ = ("Direction", "LookSAMState", "gsam", "looksam", "mix", "perturbed")

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
