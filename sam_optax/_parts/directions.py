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
    "gam",
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
    points: further points evaluated after the perturbed pass, each
      ``(g, grads, directions, params, state) -> d_k`` (see
      :class:`sam_optax._core.builder.Rule`); with points, ``combine``
      receives the tuple of the gradients at every perturbed point as
      ``g_p``. Default: none.
  """

  init: Callable[[PyTree], PyTree]
  combine: Optional[Callable[..., tuple[PyTree, PyTree]]]
  fallback: Callable[..., tuple[PyTree, PyTree]]
  points: tuple[Callable[..., PyTree], ...] = ()


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
      # g is handed on, but not where the sharpness is not finite: the
      # pipeline's guard must see the non-finite pass (and keep the state).
      out = jax.tree.map(
          lambda c, d: jnp.where(jnp.isfinite(d), c, jnp.asarray(jnp.nan, c.dtype)),
          clean, sharp,
      )
      return out, WSAMState(sharpness=kept)
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


def gam(
    rho_prime_ratio: float = 0.1,
    beta0: float = 0.5,
    beta1: float = 0.6,
    gamma: float = 0.03,
    *,
    eps: float = 1e-12,
) -> Direction:
  r"""GAM's two further points and its output (Zhang et al., CVPR 2023).

  With :math:`g_0 = g` and :math:`g_1 = g_p` (taken at
  :math:`w + \rho' \hat g_0`, :math:`\rho' = ` ``rho_prime_ratio`` :math:`\rho`,
  the perturbation's part), the points are :math:`w + \rho \hat d` with
  :math:`d = g_1 - g_0`, then :math:`w + \rho \hat d + \rho' \hat g_2`, where
  :math:`\hat v = v / (\|v\| + \mathrm{eps})`; with :math:`g_2, g_3` their
  gradients, :math:`u = \beta_1 g_1 + (1-\beta_1) g_3`,
  :math:`m = g_0 + |1-\beta_0|\, g_2` and the output is
  :math:`u - \gamma\,(m - c\,\|m\|\, u / (\|u\| + \mathrm{eps}))` with
  :math:`c = m\cdot u / (\|u\|\|m\| + \mathrm{eps})`. Skipped steps return ``g``.
  """
  for name, value, high in (
      ("rho_prime_ratio", rho_prime_ratio, float("inf")),
      ("beta0", beta0, 1.0),
      ("beta1", beta1, 1.0),
      ("gamma", gamma, float("inf")),
  ):
    validation.check_scalar("gam", name, value, low=0.0, high=high)
  validation.check_scalar("gam", "eps", eps, low=0.0, low_inclusive=False)

  def normalized(v):
    return tree.scale_wide(v, 1.0 / (tree.global_norm(v) + eps))

  def ascent_of_the_gradient_norm(g, grads, ds, params, state):
    del ds, params, state  # w + ρ d/‖d‖, d = g1 − g0
    diff = jax.tree.map(
        lambda a, b: a.astype(tree.wide_dtype(a.dtype)) - b.astype(tree.wide_dtype(b.dtype)),
        grads[0], g,
    )
    return normalized(diff)

  def ascent_from_there(g, grads, ds, params, state):
    del g, params, state  # w + ρ d/‖d‖ + ρ' g2/‖g2‖
    step = normalized(grads[1])
    ratio = jnp.asarray(rho_prime_ratio)
    return jax.tree.map(
        lambda o, s: o + ratio.astype(s.dtype) * s, ds[1], step
    )

  def combine(g, g_p, params, state):
    del params
    g0 = tree.widen(g)
    g1, g2, g3 = (tree.widen(x) for x in g_p)
    b0, b1, c = (jnp.asarray(x) for x in (beta0, beta1, gamma))
    # u = β1 g1 + (1 − β1) g3, written so that g1 = g3 gives g3 exactly.
    u = jax.tree.map(lambda a, b: b + b1.astype(b.dtype) * (a - b), g1, g3)
    weight = jnp.abs(1 - b0)
    m = jax.tree.map(lambda a, b: a + weight.astype(b.dtype) * b, g0, g2)
    u_norm, m_norm = tree.global_norm(u), tree.global_norm(m)
    cosine = tree.vdot(m, u) / (u_norm * m_norm + eps)
    along = cosine * m_norm / (u_norm + eps)
    out = jax.tree.map(
        lambda ui, mi: ui - c.astype(ui.dtype) * (mi - along.astype(ui.dtype) * ui),
        u, m,
    )
    return out, state

  return Direction(
      lambda params: optax.EmptyState(),
      combine,
      _clean,
      points=(ascent_of_the_gradient_norm, ascent_from_there),
  )
