"""Fisher SAM: the neighbourhood is an ellipsoid of a diagonal Fisher metric."""

from __future__ import annotations

from typing import Optional

import optax

from sam_optax._core import validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._parts import perturbations
from sam_optax._parts.compose import sharpness_aware

__all__ = ("fisher_sam",)


@validation.reported_as("fisher_sam")
def fisher_sam(
    rho: ScalarOrSchedule = 0.1,
    eta: float = 1.0,
    *,
    eps: float = 1e-12,
    num_ascent_steps: Optional[int] = None,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Fisher SAM: the worst point of a Fisher-information ellipsoid.

  SAM searches a Euclidean ball. Fisher SAM measures distances with the
  Fisher information instead, :math:`\max_{\epsilon^\top F \epsilon \le
  \rho^2} L(w + \epsilon)`, which to first order is solved by

  .. math::

    \hat\epsilon = \rho \, \frac{F^{-1} g}{\sqrt{g^\top F^{-1} g} +
    \mathrm{eps}}, \qquad u = \nabla L(w + \hat\epsilon),

  (maximize :math:`g^\top \epsilon` on the ellipsoid: the KKT condition gives
  :math:`\epsilon \propto F^{-1} g`, and the constraint fixes the scale, so
  :math:`\hat\epsilon^\top F \hat\epsilon = \rho^2`). The Fisher is
  approximated by a diagonal built from the clean mini-batch gradient,

  .. math::

    F = \mathrm{diag}(1 + \eta \, g \odot g),

  so coordinates with large gradients (high information) move less than in
  SAM, and flat ones more. ``eta = 0`` is SAM. The sums are global over the
  whole tree.

  Cost: one extra forward/backward pass, like :func:`sam_optax.sam`.

  Choosing rho: SAM's scale, from below. Since :math:`F \succeq I`, the
  Euclidean length of :math:`\hat\epsilon` is at most ρ: equal to it where
  :math:`\eta\, g \odot g` is small, shorter where the gradient is large, so
  at the same ρ Fisher SAM never moves further than SAM. Start in SAM's range
  (0.05 to 0.1, Foret et al., 2021; the default is 0.1); the values Kim et al. (2022) use for ρ (their
  γ) and η are not checked here, so tune both per task.

  Args:
    rho: radius :math:`\rho` of the ellipsoid (the paper's :math:`\gamma`), a
      number or a schedule; tune it per task.
    eta: scale :math:`\eta \ge 0` of the squared gradients in the Fisher
      approximation; tune it per task.
    eps: added to :math:`\sqrt{g^\top F^{-1} g}`; a zero gradient gives a zero
      perturbation.
    num_ascent_steps: see :func:`sam_optax.sam`. Each ascent step rebuilds
      :math:`F` from the gradient at the intermediate point.
    renormalize: see :func:`sam_optax.sam`.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` takes
    ``loss_fn=`` or ``grad_fn=``).

  Raises:
    ValueError: if ``eta`` is negative, besides the checks of
      :func:`sam_optax.sam`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * w ** 2)
    >>> params = jnp.array([1.0, 1.0])
    >>> tx = optax.chain(sam_optax.fisher_sam(rho=0.1, eta=1.0), optax.sgd(0.05))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    >>> params = optax.apply_updates(params, updates)
    >>> [round(float(x), 4) for x in params]
    [0.948, 0.4959]

  References:
    Kim, Li, Hu, Hospedales, *Fisher SAM: Information Geometry and Sharpness
    Aware Minimisation*, ICML 2022. https://arxiv.org/abs/2206.04920
  """
  return sharpness_aware(
      rho,
      perturbation=perturbations.fisher(eta, eps=eps),
      eps=eps,
      num_ascent_steps=num_ascent_steps,
      renormalize=renormalize,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="fisher_sam",
  )
