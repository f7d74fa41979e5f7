"""AE-SAM: take the SAM step only where the gradient norm says the region is sharp."""

from __future__ import annotations

from typing import Optional

import optax

from sam_optax._core import validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._parts import perturbations, policies
from sam_optax._parts.compose import sharpness_aware
from sam_optax._parts.policies import AESAMState, ae_sam_threshold_coefficient

__all__ = ("AESAMState", "ae_sam", "ae_sam_threshold_coefficient")


@validation.reported_as("ae_sam")
def ae_sam(
    rho: ScalarOrSchedule = 0.05,
    delta: float = 0.9,
    lambda_start: float = 1.0,
    lambda_end: float = -1.0,
    *,
    total_steps: int,
    eps: float = 1e-12,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AE-SAM: an adaptive policy that takes the SAM step only in sharp regions.

  The squared norm of the clean gradient is modelled as a normal variable
  whose mean and variance are tracked by exponential moving averages,

  .. math::

    \mu_t = \delta \mu_{t-1} + (1 - \delta) \|g_t\|^2, \qquad
    \sigma^2_t = \delta \sigma^2_{t-1} + (1 - \delta)
      \left(\|g_t\|^2 - \mu_t\right)^2,

  from :math:`\mu_{-1} = \sigma^2_{-1} = 0`. A large gradient norm
  signals a sharp region, where the SAM step is taken; elsewhere the clean
  gradient is returned and the second pass is skipped:

  .. math::

    u_t = \begin{cases}
      \nabla L\!\left(w + \rho \, g_t / \|g_t\|\right)
        & \text{if } \|g_t\|^2 \ge \mu_t + c_t \sigma_t, \\
      g_t & \text{otherwise,}
    \end{cases}
    \qquad
    c_t = c_{\text{start}} + (c_{\text{end}} - c_{\text{start}})
      \min(t / T, 1),

  with :math:`T` = ``total_steps``. The paper writes the schedule as
  :math:`c_t = \frac{t}{T}\lambda_1 + (1 - \frac{t}{T})\lambda_2`, so
  ``lambda_start`` is its :math:`\lambda_2` and ``lambda_end`` its
  :math:`\lambda_1`. The default lowers :math:`c_t` from 1 to -1: the
  threshold falls, so SAM steps become more frequent as training proceeds
  and the iterate approaches a minimum; the statistics are float32
  scalars. Only the branch taken runs (``jax.lax.switch``);
  ``sam_stats(state).pass_taken`` records the decision, so its mean is the
  fraction of SAM steps.

  Choosing rho: SAM's values: the steps that take the pass are SAM steps of
  radius ρ and the others ignore it, so start from SAM's 0.05 (Foret et al.,
  2021). The policy only decides how often SAM runs; the values of ρ, δ and
  the λs in Jiang et al. (2023) are not checked here.

  Args:
    rho: SAM's perturbation radius, or a schedule of the step count. With
      ``rho == 0`` every step returns ``g`` (the moving averages still
      advance).
    delta: EMA factor :math:`\delta \in [0, 1)` of both moving averages.
    lambda_start: :math:`c_0` (the paper's :math:`\lambda_2`), the
      threshold coefficient at step 0.
    lambda_end: :math:`c_T` (the paper's :math:`\lambda_1`), the
      coefficient from step ``total_steps`` on.
    total_steps: :math:`T`, the number of steps over which the coefficient
      moves (usually the length of training), an int >= 1.
    eps: added to the gradient norm in SAM's perturbation.
    renormalize: see :func:`sam_optax.sam`; applies on the SAM steps.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes
    ``loss_fn=`` or ``grad_fn=`` on every step and uses it on the SAM
    steps. The state's ``variant`` is an :class:`AESAMState`.

  Raises:
    ValueError: if ``rho`` is negative, ``delta`` outside ``[0, 1)``,
      ``lambda_start`` or ``lambda_end`` not finite numbers, or
      ``total_steps`` not an int >= 1.

  Examples:
    Once the statistics have settled, ordinary steps skip the second pass
    and a gradient much larger than usual takes it (here with a constant
    coefficient :math:`c_t = 1`):

    >>> import jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w: 0.5 * jnp.sum(w ** 2)
    >>> tx = sam_optax.ae_sam(rho=0.05, lambda_start=1.0, lambda_end=1.0,
    ...                       total_steps=1)
    >>> params = jnp.ones(3)
    >>> state = tx.init(params)
    >>> for scale in [1.0] * 8 + [3.0, 1.0]:
    ...   _, state = tx.update(scale * params, state, params, loss_fn=loss_fn)
    ...   print(int(sam_optax.sam_stats(state).pass_taken), end=" ")
    1 1 1 1 1 1 1 0 1 0

    In training, with the default threshold falling from 1 to -1 over the
    run:

    >>> tx = optax.chain(
    ...     sam_optax.ae_sam(rho=0.05, delta=0.9, total_steps=10_000),
    ...     optax.sgd(0.1, momentum=0.9))

  References:
    Jiang, Yang, Zhang, Kwok, *An Adaptive Policy to Employ Sharpness-Aware
    Minimization*, ICLR 2023. https://arxiv.org/abs/2304.14647
  """
  return sharpness_aware(
      rho,
      perturbation=perturbations.l2(eps),
      policy=policies.adaptive(
          delta, lambda_start, lambda_end, total_steps=total_steps
      ),
      eps=eps,
      renormalize=renormalize,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="ae_sam",
  )
