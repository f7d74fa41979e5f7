"""Unnormalized SAM (USAM)."""

from __future__ import annotations

from typing import Optional

import optax

from sam_optax._core import validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._parts import perturbations
from sam_optax._parts.compose import sharpness_aware

__all__ = ("usam",)


@validation.reported_as("usam")
def usam(
    rho: ScalarOrSchedule = 0.01,
    *,
    num_ascent_steps: int = 1,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Unnormalized SAM: the perturbation is the raw gradient step.

  .. math::

    u = \nabla L(w + \rho \, \nabla L(w)).

  Without the normalization, ρ is a step size rather than a radius: the
  perturbation shrinks with the gradient near a minimum, which makes USAM's
  dynamics easier to analyse (and more stable at high learning rates).

  Choosing rho: ρ is a step size, not a radius: the perturbation
  :math:`\rho \nabla L(w)` has length :math:`\rho \|g\|`. It matches SAM with
  radius :math:`\rho_{\mathrm{SAM}}` on steps where :math:`\rho =
  \rho_{\mathrm{SAM}} / \|g\|`, so divide SAM's ρ (0.05, Foret et al., 2021)
  by a typical clean gradient norm (``sam_stats(state).grad_norm`` of a short
  run); the perturbation then shrinks with the gradient near a minimum
  (Andriushchenko and Flammarion, 2022).

  Args:
    rho: ascent step size (a number or a schedule of the step count).
    num_ascent_steps: number of ascent steps of size ``rho / n`` each.
    renormalize: see :func:`sam_optax.sam`.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` takes
    ``loss_fn=`` or ``grad_fn=``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w: jnp.sum(w ** 2)
    >>> params = jnp.array([1.0, -2.0])
    >>> tx = sam_optax.usam(rho=0.1)
    >>> u, _ = tx.update(jax.grad(loss_fn)(params), tx.init(params), params,
    ...                  loss_fn=loss_fn)
    >>> [round(float(x), 4) for x in u]  # 2 (w + 0.1 * 2w) = 2.4 w
    [2.4, -4.8]

  References:
    Andriushchenko, Flammarion, *Towards Understanding Sharpness-Aware
    Minimization*, ICML 2022. https://arxiv.org/abs/2206.06232
  """

  return sharpness_aware(
      rho,
      perturbation=perturbations.unnormalized(),
      num_ascent_steps=num_ascent_steps,
      renormalize=renormalize,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="usam",
  )
