"""Surrogate-gap guided SAM (GSAM) and its learning-rate-tied ρ schedule."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._parts import directions, perturbations
from sam_optax._parts.compose import sharpness_aware

__all__ = ("gsam", "gsam_rho_schedule")


@validation.reported_as("gsam")
def gsam(
    rho: ScalarOrSchedule = 0.05,
    alpha: float = 0.1,
    *,
    eps: float = 1e-12,
    num_ascent_steps: Optional[int] = None,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GSAM: SAM plus an ascent step on the surrogate gap.

  With :math:`g_p = \nabla L(w + \rho g/\|g\|)` the SAM gradient, split the
  clean gradient into its parts parallel and orthogonal to :math:`g_p`,

  .. math::

    g_\parallel = (g \cdot \hat g_p)\, \hat g_p, \qquad
    g_\perp = g - g_\parallel, \qquad
    u = g_p - \alpha \, g_\perp ,

  where :math:`\hat g_p = g_p / (\|g_p\| + \mathrm{eps})`. Descending along
  ``u`` minimizes the perturbed loss while increasing the clean loss's
  orthogonal component, which shrinks the surrogate gap
  :math:`L(w + \hat\epsilon) - L(w)` without hurting the SAM objective.
  ``alpha = 0`` is SAM. The paper ties ρ to the learning rate; see
  :func:`gsam_rho_schedule`.

  Choosing rho: SAM's scale, since the perturbation is SAM's (length ρ).
  Zhuang et al. (2022) tie ρ to the learning rate
  (:func:`gsam_rho_schedule`); the official big_vision configuration for
  ViT-B/32 decays it from 0.6 to 0.1 with the learning rate, with α = 0.6.
  With a constant ρ, start from SAM's 0.05 (Foret et al., 2021).

  Args:
    rho: perturbation radius or schedule.
    alpha: weight :math:`\alpha \ge 0` of the orthogonal component.
    eps: added to norms in denominators.
    num_ascent_steps: see :func:`sam_optax.sam`.
    renormalize: see :func:`sam_optax.sam`.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` takes
    ``loss_fn=`` or ``grad_fn=``).

  Examples:
    >>> import optax, sam_optax
    >>> lr = optax.cosine_decay_schedule(0.1, decay_steps=1000)
    >>> rho = sam_optax.gsam_rho_schedule(lr, rho_max=0.1, rho_min=0.01,
    ...                                   lr_max=0.1, lr_min=0.0)
    >>> tx = optax.chain(sam_optax.gsam(rho, alpha=0.3),
    ...                  optax.sgd(lr, momentum=0.9))
    >>> round(float(rho(0)), 4), round(float(rho(1000)), 4)
    (0.1, 0.01)

  References:
    Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu,
    *Surrogate Gap Guided Sharpness-Aware Minimization*, ICLR 2022.
    https://arxiv.org/abs/2203.08065
  """
  return sharpness_aware(
      rho,
      perturbation=perturbations.l2(eps),
      direction=directions.gsam(alpha, eps=eps),
      eps=eps,
      num_ascent_steps=num_ascent_steps,
      renormalize=renormalize,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="gsam",
  )


def gsam_rho_schedule(
    learning_rate: Callable[[jax.Array], Any],
    *,
    rho_max: float,
    rho_min: float,
    lr_max: float,
    lr_min: float = 0.0,
) -> Callable[[jax.Array], jax.Array]:
  r"""GSAM's ρ schedule, which follows a learning-rate schedule.

  .. math::

    \rho_t = \rho_{\min} + (\rho_{\max} - \rho_{\min})
    \frac{\mathrm{lr}_t - \mathrm{lr}_{\min}}{\mathrm{lr}_{\max} - \mathrm{lr}_{\min}}.

  Args:
    learning_rate: the learning-rate schedule (a callable of the step count)
      that the optimizer uses.
    rho_max: ρ when the learning rate is ``lr_max``.
    rho_min: ρ when the learning rate is ``lr_min``.
    lr_max: the schedule's peak learning rate.
    lr_min: the schedule's lowest learning rate.

  Returns:
    A schedule ``count -> rho`` to pass as ``rho`` to :func:`gsam` (or to
    any transform of this package).
  """
  if not callable(learning_rate):
    raise ValueError(
        "`gsam_rho_schedule`: `learning_rate` must be a schedule (a callable"
        f" of the step count); got {learning_rate!r}. For a constant learning"
        " rate, use a constant `rho` instead."
    )
  validation.check_scalar("gsam_rho_schedule", "rho_min", rho_min, low=0.0)
  validation.check_scalar("gsam_rho_schedule", "rho_max", rho_max, low=rho_min)
  validation.check_scalar("gsam_rho_schedule", "lr_min", lr_min)
  validation.check_scalar(
      "gsam_rho_schedule", "lr_max", lr_max, low=lr_min, low_inclusive=False
  )

  def schedule(count: jax.Array) -> jax.Array:
    lr = jnp.asarray(learning_rate(count))
    lr = lr.astype(jnp.promote_types(lr.dtype, jnp.float32))
    frac = (lr - lr_min) / (lr_max - lr_min)
    return rho_min + (rho_max - rho_min) * frac

  return schedule
