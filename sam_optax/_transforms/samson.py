"""SAMSON: ASAM's neighbourhood scaled by each layer's largest weight."""

from __future__ import annotations

from typing import Optional

import optax

from sam_optax._core import masking, validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._parts import perturbations
from sam_optax._parts.compose import sharpness_aware

__all__ = ("samson",)


@validation.reported_as("samson")
def samson(
    rho: ScalarOrSchedule = 0.2,
    eta: float = 0.01,
    *,
    norm: str = "max",
    mask: masking.MaskOrFn = None,
    eps: float = 1e-12,
    num_ascent_steps: Optional[int] = None,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimization Scaled by Outlier Normalization.

  ASAM's element-wise neighbourhood, with each weight's operator divided by
  a norm of its whole layer (by default the layer's largest magnitude):

  .. math::

    T_w = \frac{|w| + \eta}{\|W\|_\infty}, \qquad
    \hat\epsilon = \rho \, \frac{T_w^2 \, g}{\|T_w \, g\|_2 + \mathrm{eps}},
    \qquad u = \nabla L(w + \hat\epsilon),

  where :math:`W` is the leaf (layer kernel) that holds :math:`w`,
  :math:`\|W\|_\infty = \max |W|` (``norm="l2"``: :math:`\|W\|_2`), and the
  norm in the denominator of :math:`\hat\epsilon` is global. A layer with
  large outliers has its ordinary weights perturbed less; the trained
  network is meant to tolerate noise on its weights at inference (analog
  in-memory accelerators). Same cost and ``update`` protocol as
  :func:`sam_optax.sam`; the operator is
  :func:`sam_optax.perturbations.outlier_normalized`, usable with any
  other part in :func:`sam_optax.sharpness_aware`.

  What is verified: the rule above is transcribed from the ``SAMSON`` class
  of the ViT fine-tuning code of Henwood (a first author of the paper,
  ``github.com/sebastienwood/SamsonViT``, ``optimizer_ascending.py``):
  :math:`\eta` added before the division, one norm per parameter tensor,
  the largest magnitude by default and the l2 norm as the ablation, and
  otherwise ASAM's step. That code leaves tensors not named ``weight``
  (biases) at :math:`T = 1`; here ``mask`` selects the normalized leaves
  (all by default) and a leaf whose norm is 0 gets :math:`T = 1`. The
  paper's method section could not be read, so its text was not compared.

  Choosing rho: between SAM's and ASAM's. The authors' ViT-B/16 runs
  (SamsonViT, 2023) use ρ = 0.2 for SAMSON (η = 0.01, both norms) beside
  0.05 for SAM and 0.5 for ASAM. Since :math:`T_w \le 1 + \eta / \max|W|`, the
  perturbation is never longer than about ρ, while ASAM's
  :math:`|w| + \eta` is much smaller than 1 for typical weights: do not copy
  ρ between the two.

  Args:
    rho: neighbourhood radius (a number or a schedule of the step count);
      see "Choosing rho" above.
    eta: offset :math:`\eta \ge 0` added to :math:`|w|` before the division
      (0.01 in the authors' code).
    norm: the norm of a leaf that divides its operator: ``"max"`` (the
      layer's largest magnitude, the paper's default) or ``"l2"``.
    mask: which leaves are normalized: ``None`` (all), a pytree of booleans
      with the structure of ``params``, or a callable ``params -> pytree``;
      the others use :math:`T = 1`. The authors' code normalizes the
      tensors named ``weight`` (kernels and normalization scales) only.
    eps: added to the norm in the denominator of :math:`\hat\epsilon`.
    num_ascent_steps: see :func:`sam_optax.sam`.
    renormalize: see :func:`sam_optax.sam`.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = {"w": jnp.array([[2.0, -0.5], [0.1, 0.3]]), "b": jnp.zeros(2)}
    >>> loss_fn = lambda p: jnp.sum((jnp.ones(2) @ p["w"] + p["b"] - 1.0) ** 2)
    >>> tx = optax.chain(sam_optax.samson(rho=0.2), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> start = loss_fn(params)
    >>> for _ in range(20):
    ...   grads = jax.grad(loss_fn)(params)
    ...   updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params) < 0.1 * start)
    True

  References:
    Mordido, Henwood, Chandar, Leduc-Primeau, *Sharpness-Aware Minimization
    Scaled by Outlier Normalization for Robust DNNs on In-Memory Computing
    Accelerators*, 2023. https://arxiv.org/abs/2211.11561
  """
  return sharpness_aware(
      rho,
      perturbation=perturbations.outlier_normalized(eta, norm=norm, mask=mask, eps=eps),
      eps=eps,
      num_ascent_steps=num_ascent_steps,
      renormalize=renormalize,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="samson",
  )
