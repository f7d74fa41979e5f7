"""LookSAM: the SAM pass every k steps, its orthogonal part reused in between."""

from __future__ import annotations

from typing import Optional

import optax

from sam_optax._core import validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._parts import directions, perturbations, policies
from sam_optax._parts.compose import sharpness_aware
from sam_optax._parts.directions import LookSAMState

__all__ = ("LookSAMState", "looksam")


@validation.reported_as("looksam")
def looksam(
    rho: ScalarOrSchedule = 0.05,
    k: int = 5,
    alpha: float = 0.7,
    *,
    eps: float = 1e-12,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM: exact SAM every ``k`` steps, a cheap correction in between.

  On steps :math:`t \equiv 0 \pmod k` (steps 0, k, 2k, ...) it takes the SAM
  gradient :math:`g_s = \nabla L(w + \rho g/\|g\|)` and stores its component
  orthogonal to the clean gradient,

  .. math::

    g_v = g_s - \frac{g_s \cdot g}{\|g\|^2}\, g
        = g_s - \|g_s\| \cos(g, g_s) \frac{g}{\|g\|}.

  On the other steps it skips the second pass (``jax.lax.switch`` runs one
  branch; or, with ``sam_pass`` from the training loop, two compiled
  programs and no conditional, see :func:`sam_optax.sam`) and returns

  .. math::

    u = g + \alpha \frac{\|g\|}{\|g_v\|} g_v .

  Norms and inner products are global over the whole parameter tree. ``k=1``
  is SAM. Cost: :math:`1 + 1/k` forward/backward passes per step, plus one
  parameter-sized float32 buffer.

  **Warning: the reused component.** Between two exact steps LookSAM adds
  the stored :math:`g_v`, the part of the *last exact step's* SAM gradient
  orthogonal to *that step's* clean gradient, rescaled to length
  :math:`\alpha \|g\|`. Two things can make it wrong:

  * its length does not depend on ρ. SAM's own correction
    :math:`g_s - g` shrinks with ρ, the reused one does not: wherever
    SAM's correction is small next to :math:`\|g\|` (a small ρ; on small
    models, as the benchmark below shows) the in-between steps are
    dominated by a direction SAM would hardly add, and ρ → 0 does not turn
    LookSAM into the base optimizer. In this library's generalization benchmark (the
    documentation's "Generalization" page: a small MLP and a 1-D CNN on MNIST-1D, ρ tuned over
    0.1 and 0.3) LookSAM with the paper's ``k=5``, ``alpha=0.7`` ended 5 to
    23 accuracy points behind tuned SGD, where SAM stayed within one point
    of it or ahead.
  * it is stale: it was measured up to ``k - 1`` steps ago, at other
    weights and on another batch. When the weights move quickly (a large
    learning rate, early training) or ``k`` is large, it need not be
    orthogonal to the current gradient, nor point where SAM would now.

  So treat ``alpha`` as a hyperparameter to tune together with ``rho``
  rather than keep the paper's 0.7: lower it (``alpha=0`` hands on the clean
  gradient between exact steps, SAM on every k-th step only), or shorten
  ``k``, and compare with :func:`sam_optax.sam` at the same ``rho`` before
  relying on the savings.

  Choosing rho: ρ acts only on the exact steps, which are SAM steps, so start
  from SAM's ρ (0.05, Foret et al., 2021); Liu et al. (2022) use ``k=5`` and
  α ≈ 0.7. ρ does not set the size of the reused component (see the warning
  above): a smaller ρ does not make the in-between steps gentler, a smaller
  ``alpha`` does.

  Args:
    rho: perturbation radius or schedule.
    k: period of the exact SAM steps (an int >= 1).
    alpha: weight :math:`\alpha \ge 0` of the reused orthogonal component.
    eps: added to norms in denominators.
    renormalize: see :func:`sam_optax.sam`; applies on the exact steps.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` takes
    ``loss_fn=`` or ``grad_fn=`` on every step, and uses it on every k-th).

  Examples:
    >>> import optax, sam_optax
    >>> tx = optax.chain(sam_optax.looksam(rho=0.05, k=5, alpha=0.7),
    ...                  optax.sgd(0.1, momentum=0.9))

  References:
    Liu, Mai, Chen, Hsieh, You, *Towards Efficient and Scalable
    Sharpness-Aware Minimization*, CVPR 2022.
    https://arxiv.org/abs/2203.02714
  """
  return sharpness_aware(
      rho,
      perturbation=perturbations.l2(eps),
      direction=directions.looksam(alpha, eps=eps),
      policy=policies.every(k),
      eps=eps,
      renormalize=renormalize,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="looksam",
  )
