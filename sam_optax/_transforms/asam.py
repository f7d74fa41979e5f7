"""Adaptive SAM (ASAM): a scale-invariant neighbourhood."""

from __future__ import annotations

from typing import Optional

import optax

from sam_optax._core import masking, validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._parts import perturbations
from sam_optax._parts.compose import sharpness_aware

__all__ = ("asam",)


@validation.reported_as("asam")
def asam(
    rho: ScalarOrSchedule = 0.5,
    eta: float = 0.01,
    *,
    mask: masking.MaskOrFn = None,
    eps: float = 1e-12,
    num_ascent_steps: Optional[int] = None,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive Sharpness-Aware Minimization.

  ASAM measures the neighbourhood relative to the size of each weight, with
  the element-wise operator :math:`T_w = |w| + \eta`, so that rescaling a
  ReLU network's layers does not change its sharpness:

  .. math::

    \hat\epsilon = \rho \, \frac{T_w^2 \, g}{\|T_w \, g\|_2 + \mathrm{eps}},
    \qquad u = \nabla L(w + \hat\epsilon).

  Leaves outside ``mask`` use :math:`T = 1` (the official code treats biases
  so); by default every leaf is adaptive. Costs one extra forward/backward
  pass, like :func:`sam_optax.sam`, and follows the same ``update`` protocol
  (``loss_fn=`` or ``grad_fn=``).

  Choosing rho: about ten times SAM's. Kwon et al. (2021) use ρ = 0.5 on
  CIFAR-10 and 1.0 on CIFAR-100, with η = 0.01; Mordido et al.
  (Lookbehind-SAM, ICML 2024) likewise pair ASAM's 0.5 with SAM's 0.05. The
  radius is measured relative to the weights, :math:`\|T_w^{-1}\hat\epsilon\|
  = \rho`, so :math:`\|\hat\epsilon\| \le \rho \max(|w| + \eta)`: with weights
  well below 1 in magnitude it is much shorter than SAM's at the same ρ.

  Args:
    rho: neighbourhood radius (a number or a schedule of the step count);
      about ten times SAM's, see "Choosing rho" above.
    eta: offset :math:`\eta > 0` that keeps zero weights perturbable
      (0.01 in the official code).
    mask: which leaves are adaptive: ``None`` (all), a pytree of booleans with
      the structure of ``params``, or a callable ``params -> pytree``.
    eps: added to the norm in the denominator.
    num_ascent_steps: see :func:`sam_optax.sam`.
    renormalize: see :func:`sam_optax.sam`.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: if ``eta`` is not positive, besides the checks of
      :func:`sam_optax.sam`. (For :math:`\eta = 0`, exact scale invariance
      with zero weights left unperturbed, compose
      ``sharpness_aware(rho, perturbation=perturbations.adaptive(0.0))``.)

  Examples:
    Biases excluded from the adaptive scaling:

    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = {"w": jnp.array([[2.0, -1.0]]), "b": jnp.array([0.5, 0.0])}
    >>> mask = {"w": True, "b": False}
    >>> tx = optax.chain(sam_optax.asam(rho=0.5, mask=mask), optax.sgd(0.1))
    >>> loss_fn = lambda p: jnp.sum((jnp.ones(1) @ p["w"] + p["b"]) ** 2)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)

  References:
    Kwon, Kim, Park, Choi, *ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks*, ICML 2021.
    https://arxiv.org/abs/2102.11600
  """
  validation.check_scalar("asam", "eta", eta, low=0.0, low_inclusive=False)
  return sharpness_aware(
      rho,
      perturbation=perturbations.adaptive(eta, mask=mask, eps=eps),
      eps=eps,
      num_ascent_steps=num_ascent_steps,
      renormalize=renormalize,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="asam",
  )
