"""Variance-suppressed sharpness-aware optimization (VaSSO)."""

from __future__ import annotations

from typing import Optional

import optax

from sam_optax._core import validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._parts import perturbations
from sam_optax._parts.compose import sharpness_aware
from sam_optax._parts.perturbations import VaSSOState

__all__ = ("VaSSOState", "vasso")


@validation.reported_as("vasso")
def vasso(
    rho: ScalarOrSchedule = 0.05,
    theta: float = 0.9,
    *,
    eps: float = 1e-12,
    num_ascent_steps: Optional[int] = None,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""VaSSO: perturb along a moving average of the gradient.

  SAM's perturbation follows the gradient of one mini-batch, a noisy estimate
  of the worst direction. VaSSO suppresses its variance with an exponential
  moving average of the clean gradients:

  .. math::

    d_t = (1 - \theta) \, d_{t-1} + \theta \, g_t \quad (d_0 = g_0), \qquad
    \hat\epsilon = \rho \, \frac{d_t}{\|d_t\|_2 + \mathrm{eps}}, \qquad
    u = \nabla L(w + \hat\epsilon).

  The average is updated on every step with the clean gradient, including
  steps where ``rho`` is 0. Norms are global over the whole tree. ``theta=1``
  is SAM.

  Cost: one extra forward/backward pass, like :func:`sam_optax.sam`, plus one
  parameter-sized float32 buffer.

  Choosing rho: SAM's scale: :math:`\hat\epsilon` has length ρ, as in SAM,
  and only its direction is averaged. The official script (Li and Giannakis,
  2023) trains a WideResNet-28-10 on CIFAR-100 with ρ = 0.2 and θ = 0.9.

  Args:
    rho: perturbation radius or schedule (see "Choosing rho" above).
    theta: weight :math:`\theta \in [0, 1]` of the newest gradient; the
      paper's and the official scripts' value is 0.9.
    eps: added to the norm of :math:`d_t` (the official code uses 1e-7).
    num_ascent_steps: see :func:`sam_optax.sam`. Later ascent steps use
      :math:`(1-\theta) d_{t-1} + \theta g_k` with :math:`g_k` the gradient at
      the intermediate point; :math:`d` itself is updated once per step, with
      the clean gradient.
    renormalize: see :func:`sam_optax.sam`.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` takes
    ``loss_fn=`` or ``grad_fn=``) whose state is a
    :class:`~sam_optax.SAMState` holding a :class:`VaSSOState`.

  Raises:
    ValueError: if ``theta`` lies outside [0, 1], besides the checks of
      :func:`sam_optax.sam`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * w ** 2)
    >>> params = jnp.array([1.0, 1.0])
    >>> tx = optax.chain(sam_optax.vasso(rho=0.1, theta=0.9), optax.sgd(0.05))
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   grads = jax.grad(loss_fn)(params)
    ...   updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> [round(float(x), 4) for x in params]
    [0.8541, 0.0421]

  References:
    Li, Giannakis, *Enhancing Sharpness-Aware Optimization Through Variance
    Suppression*, NeurIPS 2023. https://arxiv.org/abs/2309.15639 (official
    code: https://github.com/BingcongLi/VaSSO, ``solver/vasso.py``).
  """
  return sharpness_aware(
      rho,
      perturbation=perturbations.vasso(theta, eps=eps),
      eps=eps,
      num_ascent_steps=num_ascent_steps,
      renormalize=renormalize,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="vasso",
  )
