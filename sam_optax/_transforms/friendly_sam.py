"""Friendly SAM (F-SAM): perturb along the batch-specific part of the gradient."""

from __future__ import annotations

from typing import Optional

import optax

from sam_optax._core import validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._parts import perturbations
from sam_optax._parts.compose import sharpness_aware
from sam_optax._parts.perturbations import FriendlySAMState

__all__ = ("FriendlySAMState", "friendly_sam")


@validation.reported_as("friendly_sam")
def friendly_sam(
    rho: ScalarOrSchedule = 0.05,
    sigma: float = 1.0,
    lam: float = 0.6,
    *,
    eps: float = 1e-12,
    num_ascent_steps: Optional[int] = None,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Friendly SAM (F-SAM): remove the full-gradient component from the ascent.

  F-SAM argues that the component of the mini-batch gradient shared with the
  full-batch gradient does not help generalization, and estimates that
  component by an exponential moving average :math:`m` of past clean
  gradients. With :math:`g_t` the clean gradient at step :math:`t`,

  .. math::

    d_t = g_t - \sigma \, m_{t-1}, \qquad
    m_t = \lambda \, m_{t-1} + (1 - \lambda) \, g_t, \qquad
    \hat\epsilon = \rho \, \frac{d_t}{\|d_t\|_2 + \mathrm{eps}}, \qquad
    u = \nabla L(w + \hat\epsilon),

  and on the first step :math:`d_0 = g_0`, :math:`m_0 = g_0`. The moving
  average is fed with the clean gradients (never the perturbed ones) and is
  updated on every step, including steps where ``rho`` is 0. Norms are global
  over the whole tree. ``sigma=0`` is SAM.

  This is the authors' code, which subtracts the average before updating it.
  Written with the updated average, :math:`g_t - \sigma' m_t`, the direction
  is the same for :math:`\sigma = \sigma'\lambda / (1 - \sigma'(1 -
  \lambda))`; at :math:`\sigma = \sigma' = 1` the two forms coincide.

  Cost: one extra forward/backward pass, like :func:`sam_optax.sam`, plus one
  parameter-sized float32 buffer.

  Choosing rho: SAM's scale: the perturbation has length ρ, as SAM's, and
  only its direction differs. The authors' optimizer defaults to 0.05 and
  their CIFAR-100 ResNet-18 script uses 0.2 (Li et al., 2024, official code).

  Args:
    rho: perturbation radius or schedule (see "Choosing rho" above).
    sigma: weight :math:`\sigma \ge 0` of the subtracted moving average.
    lam: decay :math:`\lambda \in [0, 1]` of the moving average. The
      authors' scripts use 0.6 and 0.95; their optimizer's default is 0.9.
    eps: added to the norm of :math:`d_t`.
    num_ascent_steps: see :func:`sam_optax.sam`. Later ascent steps use
      :math:`g_k - \sigma m_{t-1}` with :math:`g_k` the gradient at the
      intermediate point; the moving average is updated once per step, with
      the clean gradient.
    renormalize: see :func:`sam_optax.sam`.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` takes
    ``loss_fn=`` or ``grad_fn=``) whose state is a
    :class:`~sam_optax.SAMState` holding a :class:`FriendlySAMState`.

  Raises:
    ValueError: if ``sigma`` is negative or ``lam`` lies outside [0, 1],
      besides the checks of :func:`sam_optax.sam`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * w ** 2)
    >>> params = jnp.array([1.0, 1.0])
    >>> tx = optax.chain(sam_optax.friendly_sam(rho=0.1, sigma=1.0, lam=0.6),
    ...                  optax.sgd(0.05))
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   grads = jax.grad(loss_fn)(params)
    ...   updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> [round(float(x), 4) for x in params]
    [0.857, 0.1876]

  References:
    Li, Zhou, He, Cheng, Huang, *Friendly Sharpness-Aware Minimization*,
    CVPR 2024. https://arxiv.org/abs/2403.12350 (official code:
    https://github.com/nblt/F-SAM, ``utils.py``, class ``FriendlySAM``).
  """
  return sharpness_aware(
      rho,
      perturbation=perturbations.friendly(sigma, lam, eps=eps),
      eps=eps,
      num_ascent_steps=num_ascent_steps,
      renormalize=renormalize,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="friendly_sam",
  )
