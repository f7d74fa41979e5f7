"""Gradient norm Aware Minimization (GAM): first-order flatness."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import optax

from sam_optax._core import radius, tree, validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._parts import directions, perturbations
from sam_optax._parts.compose import sharpness_aware

__all__ = ("gam",)


def _scaled_l2(ratio, eps) -> perturbations.Perturbation:
  """SAM's direction times ``ratio``: ``ε = ρ · ratio · g/(‖g‖ + eps)``."""
  l2 = perturbations.l2(eps)

  def direction(g, params, state, count):
    d, state = l2.direction(g, params, state, count)
    return tree.scale_wide(d, jnp.asarray(ratio)), state

  return perturbations.Perturbation(l2.init, direction)


@validation.reported_as("gam")
def gam(
    rho: ScalarOrSchedule = 0.2,
    rho_prime_ratio: float = 0.1,
    beta0: float = 0.5,
    beta1: float = 0.6,
    gamma: float = 0.03,
    *,
    eps: float = 1e-12,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GAM: SAM's descent plus an ascent-free step on the gradient norm's sharpness.

  GAM penalizes the *first-order* flatness
  :math:`\rho \max_{\|\delta\| \le \rho} \|\nabla L(w + \delta)\|`, the
  largest gradient norm within the radius, beside SAM's loss. The gradient
  of :math:`\|\nabla L\|` is taken by finite differences (the authors'
  accelerated GAM), with :math:`\rho' = \texttt{rho\_prime\_ratio}\cdot\rho`
  and :math:`\hat v = v / (\|v\|_2 + \mathrm{eps})`:

  .. math::

    g_0 &= \nabla L(w), \qquad g_1 = \nabla L(w + \rho' \hat g_0), \qquad
    d = g_1 - g_0, \\
    g_2 &= \nabla L(w + \rho \hat d), \qquad
    g_3 = \nabla L(w + \rho \hat d + \rho' \hat g_2), \\
    u &= \beta_1 g_1 + (1 - \beta_1)\, g_3, \qquad
    m = g_0 + (1 - \beta_0)\, g_2, \\
    m_\perp &= m - \frac{m\cdot u}{\|u\|\,\|m\| + \mathrm{eps}}\,\|m\|\,
      \frac{u}{\|u\| + \mathrm{eps}}, \qquad
    \text{out} = u - \gamma\, m_\perp .

  :math:`u` mixes the gradient at SAM's point (radius :math:`\rho'`) with
  the gradient, at :math:`w + \rho\hat d`, of SAM's loss there (the
  gradient-norm ascent); the part of :math:`m` orthogonal to :math:`u` is
  subtracted as GSAM does with the clean gradient. Chain a base optimizer
  after it. Cost: 4 forward/backward passes per step (the clean one the
  caller passes in and 3 more; SAM takes 2), and :math:`g_0, g_1, g_2`
  held through the passes. ``sam_stats(state).perturbed_loss`` is the loss
  at the first perturbed point :math:`w + \rho'\hat g_0`. ``rho=0`` gives
  the clean gradient: exactly for the Python number 0 (no pass is
  compiled), up to the float rounding of :math:`\gamma m_\perp` (a few
  ulps of each entry) for a traced or scheduled zero.

  What is verified: the rule is transcribed from the authors' code,
  ``gam/gam.py`` of ``xxgege/GAM`` (commit ``694133d9``), ``GAM.step``:
  ``perturb_weights(0)``, ``grad_norm_ascent``, ``perturb_weights(1)`` and
  ``gradient_decompose`` give the four points, the norms (all global L2,
  ``perturb_eps = 1e-12`` added to each norm in a denominator, and to
  :math:`\|u\|\|m\|` in the cosine) and the output above; the third point
  keeps the second's offset. The CIFAR script ``main_cifar.py`` sets
  ``grad_beta_2 = 1 - grad_beta_0`` and ``grad_beta_3 = 1 - grad_beta_1``;
  ``gradient_decompose`` weighs :math:`g_2` by ``abs(grad_beta_2)``, kept
  here (:math:`|1 - \beta_0|`, the same for :math:`\beta_0 \in [0, 1]`, the
  range accepted). Their radii follow the learning rate through a
  ``ProportionScheduler`` whose bounds are equal in ``optimizer_helper.py``
  (constant radii); pass a schedule as ``rho`` to vary both. Not copied:
  ``adaptive=True`` (off in the script; ASAM's :math:`w^2` scaling, whose
  third point reads the already perturbed weights), the distributed
  ``grad_reduce='sum'`` option (here the output is averaged over
  ``axis_name``, their default ``'mean'``, with per-device perturbations as
  under their ``no_sync``), and the BatchNorm momentum set to 0 for the
  extra passes (discard ``aux`` in ``loss_fn``, see :func:`sam_optax.sam`).
  ρ' is given as a ratio of ρ, so that a ρ schedule (or ``rho=0``) scales
  both radii together. ``rho="auto"`` and the radius controllers are not
  supported: they measure a single perturbed gradient.

  Choosing rho: ρ is the gradient-norm radius (0.2 in every setting of
  ``main_cifar.py``, four times SAM's 0.05), ρ' = ``rho_prime_ratio`` · ρ is
  SAM's radius at the first and last points. The script's
  (ρ, ρ', β0, β1, γ), with SGD (momentum 0.9, weight decay 5e-4, lr 0.1,
  cosine) and label smoothing 0.1: CIFAR-100 ResNet (0.2, 0.02, 0.5, 0.6,
  0.03), the defaults here (``rho_prime_ratio=0.1``); CIFAR-100 PyramidNet
  (0.2, 0.04, 0.3, 0.5, 0.05); CIFAR-10 ResNet (0.2, 0.03, 0.1, 0.1, 0.05);
  CIFAR-10 PyramidNet (0.2, 0.03, 0.1, 0.1, 0.03) (Zhang et al., CVPR
  2023). The authors call GAM robust to these values.

  Args:
    rho: the gradient-norm radius ρ (a number or a schedule of the step
      count, ``grad_norm_rho`` in the authors' code).
    rho_prime_ratio: ρ'/ρ ≥ 0, ρ' being SAM's radius (``grad_rho``).
    beta0: β0 ∈ [0, 1] (``grad_beta_0``; β in the paper): :math:`g_2`
      enters :math:`m` with weight :math:`1 - \beta_0`.
    beta1: β1 ∈ [0, 1] (``grad_beta_1``; α in the paper), the weight of
      :math:`g_1` in :math:`u`.
    gamma: γ ≥ 0 (``grad_gamma``), the weight of :math:`m_\perp`.
    eps: added to every norm in a denominator.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam` (with ``sync_perturbation`` every point is
      built from gradients averaged over the axis).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` takes
    ``loss_fn=`` or ``grad_fn=``).

  Raises:
    ValueError: for ``rho="auto"``, :func:`sam_optax.auto_rho` or
      :func:`sam_optax.guarded`, or a hyperparameter out of range.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = {"w": jnp.array([[2.0, -0.5], [0.1, 0.3]]), "b": jnp.zeros(2)}
    >>> loss_fn = lambda p: jnp.sum((jnp.ones(2) @ p["w"] + p["b"] - 1.0) ** 2)
    >>> tx = optax.chain(sam_optax.gam(rho=0.2), optax.sgd(0.02, momentum=0.9))
    >>> state = tx.init(params)
    >>> start = loss_fn(params)
    >>> for _ in range(30):
    ...   grads = jax.grad(loss_fn)(params)
    ...   updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params) < 0.1 * start)
    True

  References:
    Zhang, Xu, Yu, Zou, Cui, *Gradient Norm Aware Minimization Seeks
    First-Order Flatness and Improves Generalization*, CVPR 2023.
    https://arxiv.org/abs/2303.03108 (code: https://github.com/xxgege/GAM)
  """
  if radius.is_controlled(rho):
    raise ValueError(
        "`gam`: `rho` must be a real number or a schedule; got"
        f" rho={rho!r}. GAM does not support rho='auto',"
        " `sam_optax.auto_rho` or `sam_optax.guarded`: their controllers"
        " measure one perturbed gradient, GAM takes three."
    )
  return sharpness_aware(
      rho,
      perturbation=_scaled_l2(rho_prime_ratio, eps),
      direction=directions.gam(rho_prime_ratio, beta0, beta1, gamma, eps=eps),
      eps=eps,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="gam",
  )
