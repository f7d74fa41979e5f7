"""``sharpness_aware``: a transform from a perturbation, a direction and a policy."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import optax

from sam_optax._core import builder, masking
from sam_optax._core.collectives import AxisName
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._parts import directions as directions_lib
from sam_optax._parts import perturbations as perturbations_lib
from sam_optax._parts.directions import Direction
from sam_optax._parts.perturbations import Perturbation
from sam_optax._parts.policies import Policy

__all__ = ("PartsState", "sharpness_aware")


class PartsState(NamedTuple):
  """The states of the three parts (inside ``SAMState.variant``)."""

  perturbation: Any
  direction: Any
  policy: Any


def rule(
    perturbation: Perturbation,
    direction: Direction,
    policy: Optional[Policy],
) -> builder.Rule:
  """The builder rule of the composition."""

  def init(params):
    return PartsState(
        perturbation.init(params),
        direction.init(params),
        optax.EmptyState() if policy is None else policy.init(params),
    )

  def ascent(g, params, state, count):
    d, sub = perturbation.direction(g, params, state.perturbation, count)
    return d, state._replace(perturbation=sub)

  prepare = None
  if perturbation.prepare is not None:

    def prepare(g, params, state, count):
      sub = perturbation.prepare(g, params, state.perturbation, count)
      return state._replace(perturbation=sub)

  combine = None  # SAM's output, g_p: the pipeline frees g before the pass
  if direction.combine is not None:

    def combine(g, g_p, params, state):
      out, sub = direction.combine(g, g_p, params, state.direction)
      return out, state._replace(direction=sub)

  def fallback(g, params, state):
    out, sub = direction.fallback(g, params, state.direction)
    return out, state._replace(direction=sub)

  points = tuple(
      lambda g, grads, ds, params, state, point=point: point(
          g, grads, ds, params, state.direction
      )
      for point in direction.points
  )

  gate = None
  if policy is not None:

    def gate(g, params, state, count):
      take, sub = policy.gate(g, params, state.policy, count)
      return take, state._replace(policy=sub)

  return builder.Rule(
      init=init,
      direction=ascent,
      prepare=prepare,
      combine=combine,
      gate=gate,
      fallback=fallback,
      points=points,
  )


def sharpness_aware(
    rho: ScalarOrSchedule = 0.05,
    *,
    perturbation: Optional[Perturbation] = None,
    direction: Optional[Direction] = None,
    policy: Optional[Policy] = None,
    mask: masking.MaskOrFn = None,
    eps: float = 1e-12,
    num_ascent_steps: Optional[int] = None,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
    name: str = "sharpness_aware",
) -> optax.GradientTransformationExtraArgs:
  r"""A sharpness-aware transform composed from interchangeable parts.

  Every variant in this package differs from SAM in up to three places, each
  a part that can be swapped independently:

  * ``perturbation`` (:mod:`sam_optax.perturbations`): how the ascent
    direction :math:`d` is built from the clean gradient, the weights and
    the part's state; :math:`\epsilon = \rho d`. Default: SAM's
    :math:`g/\|g\|`.
  * ``direction`` (:mod:`sam_optax.directions`): how the clean gradient
    :math:`g` and the perturbed one :math:`g_p = \nabla L(w + \epsilon)`
    become the output. Default: :math:`g_p`.
  * ``policy`` (:mod:`sam_optax.policies`): on which steps the perturbed pass
    runs (skipped steps use the direction's fallback). Default: every step.

  ``mask`` restricts the perturbation to selected leaves or entries (see
  :func:`sam_optax.perturbations.masked`). The named variants
  (:func:`sam_optax.sam`, :func:`sam_optax.asam`, :func:`sam_optax.gsam`,
  :func:`sam_optax.looksam`, :func:`sam_optax.rwp`, :func:`sam_optax.esam`,
  ...) are such compositions.

  Choosing rho: ρ means what the ``perturbation`` part makes of it. With
  ``l2`` (the default), ``vasso``, ``friendly`` or ``fisher_mask`` it is
  SAM's radius (0.05, Foret et al., 2021; ``fisher`` gives a length of at
  most ρ); with ``adaptive`` it is ASAM's, about 10 times larger (0.5 on
  CIFAR-10, Kwon et al., 2021); with ``unnormalized`` a step size (see
  :func:`sam_optax.usam`); with ``random`` RWP's relative noise scale (0.01,
  Li et al., 2022); ``random_mask`` lengthens its inner perturbation by
  1/β and ``masked`` concentrates it (see :func:`sam_optax.masked_sam`). The
  named variants' docstrings give the values their authors use.

  Args:
    rho: perturbation radius or a schedule of the step count; ``"auto"``,
      :func:`sam_optax.auto_rho` or :func:`sam_optax.guarded` for a radius
      adapted during training (see :mod:`sam_optax` ``auto_rho``).
    perturbation: a :class:`~sam_optax.perturbations.Perturbation`.
    direction: a :class:`~sam_optax.directions.Direction`.
    policy: a :class:`~sam_optax.policies.Policy`, or ``None`` (every step).
    mask: optional mask applied to the perturbation (gradient masked first).
    eps: added to norms in denominators (renormalization).
    num_ascent_steps: see :func:`sam_optax.sam`.
    renormalize: see :func:`sam_optax.sam`.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.
    name: the name used in error messages.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with the ``update`` protocol
    of :func:`sam_optax.sam`.

  Examples:
    Adaptive (ASAM) geometry with LookSAM's every-5-steps schedule and reuse:

    >>> import optax, sam_optax
    >>> tx = sam_optax.sharpness_aware(
    ...     rho=0.5,
    ...     perturbation=sam_optax.perturbations.adaptive(eta=0.01),
    ...     direction=sam_optax.directions.looksam(alpha=0.7),
    ...     policy=sam_optax.policies.every(5),
    ... )
    >>> tx = optax.chain(tx, optax.sgd(0.1, momentum=0.9))
  """
  if perturbation is None:
    perturbation = perturbations_lib.l2(eps)
  if direction is None:
    direction = directions_lib.perturbed()
  if mask is not None:
    perturbation = perturbations_lib.masked(perturbation, mask)
  for arg, value, kind in (
      ("perturbation", perturbation, Perturbation),
      ("direction", direction, Direction),
  ):
    if not isinstance(value, kind):
      raise TypeError(
          f"`{name}`: `{arg}` must be a {kind.__name__} from"
          f" `sam_optax.{arg}s`; got {type(value).__name__}."
      )
  if policy is not None and not isinstance(policy, Policy):
    raise TypeError(
        f"`{name}`: `policy` must be a Policy from `sam_optax.policies` or"
        f" None; got {type(policy).__name__}."
    )
  return builder.build(
      name,
      rho,
      rule(perturbation, direction, policy),
      eps=eps,
      num_ascent_steps=num_ascent_steps,
      renormalize=renormalize,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
  )
