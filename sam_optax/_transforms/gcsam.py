"""GCSAM: SAM's ascent along the centralized gradient."""

from __future__ import annotations

from typing import Optional

import optax

from sam_optax._core import validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._parts import perturbations
from sam_optax._parts.compose import sharpness_aware

__all__ = ("gcsam",)


@validation.reported_as("gcsam")
def gcsam(
    rho: ScalarOrSchedule = 0.05,
    *,
    filter_axis: str = "last",
    norm: str = "raw",
    eps: float = 1e-12,
    num_ascent_steps: Optional[int] = None,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient-Centralized SAM: the ascent along the centralized gradient.

  Gradient centralization :math:`\Phi` (Yong et al., 2020) subtracts from
  each kernel's gradient its mean over all axes but the output axis (one
  mean per output column or filter); leaves with fewer than two dimensions
  (biases, normalization scales) are left as they are. GCSAM takes SAM's
  ascent along the centralized clean gradient and hands on the perturbed
  gradient as it is:

  .. math::

    \hat\epsilon = \rho \, \frac{\Phi(g)}{\|g\|_2 + \mathrm{eps}}, \qquad
    u = \nabla L(w + \hat\epsilon) .

  The norm is that of the raw gradient, so :math:`\|\hat\epsilon\| \le \rho`
  (``norm="centralized"`` divides by :math:`\|\Phi(g)\|` instead, so
  :math:`\|\hat\epsilon\| = \rho`). Same cost and ``update`` protocol as
  :func:`sam_optax.sam` (+1 forward/backward pass, no buffer); the
  direction is :func:`sam_optax.perturbations.centralized`, usable with
  any other part in :func:`sam_optax.sharpness_aware`.

  What is verified: the rule above is transcribed from ``SAM(use_gc=True)``
  of ``kozistr/pytorch_optimizer`` (``optimizer/sam.py``, ``first_step``,
  with ``centralize_gradient(grad, gc_conv_only=False)``), which names
  GCSAM (arXiv 2501.11584): the global norm is taken from the raw gradient,
  then each gradient of two or more dimensions is centralized in place over
  its dimensions ``1..n-1`` (PyTorch layout ``(out, in, ...)``:
  ``filter_axis="first"`` here), ``ε`` is formed from it, and the gradients
  are zeroed, so the descent gradient is not centralized. The authors'
  repository (``mhassann22/GCSAM``) and the paper's algorithm could not be
  read; a third-party summary writes the norm of the centralized gradient
  and centralizes the descent gradient too. Both readings are one option
  away: ``norm="centralized"``, and ``optax.centralize()`` chained after
  this transform (which centralizes over axes ``1..n-1``, the PyTorch
  layout; for Flax kernels ``(..., in, out)`` centralize over axes
  ``0..n-2`` instead).

  Choosing rho: SAM's scale (the perturbation is SAM's with the mean of
  each filter removed, so a little shorter than ρ). The transcribed code's
  default is 0.05, SAM's usual value (Foret et al., 2021); the paper's
  CIFAR values could not be read (arXiv 2501.11584, 2025). Start at 0.05
  and tune over {0.02, 0.05, 0.1, 0.2} as for SAM.

  Args:
    rho: neighbourhood radius (a number or a schedule of the step count).
    filter_axis: the output axis of kernels, kept when centralizing:
      ``"last"`` (Flax, ``(..., in, out)``) or ``"first"`` (PyTorch,
      ``(out, in, ...)``).
    norm: ``"raw"`` (the transcribed code: the norm of the gradient before
      centralizing) or ``"centralized"``.
    eps: added to the norm in the denominator of :math:`\hat\epsilon`.
    num_ascent_steps: see :func:`sam_optax.sam` (each step centralizes the
      gradient at the point reached).
    renormalize: see :func:`sam_optax.sam`.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = {"w": jnp.array([[2.0, -0.5], [0.1, 0.3]]), "b": jnp.zeros(2)}
    >>> loss_fn = lambda p: jnp.sum((jnp.ones(2) @ p["w"] + p["b"] - 1.0) ** 2)
    >>> tx = optax.chain(sam_optax.gcsam(rho=0.05), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> start = loss_fn(params)
    >>> for _ in range(20):
    ...   grads = jax.grad(loss_fn)(params)
    ...   updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params) < 0.1 * start)
    True

  References:
    Hassan, Vakanski, Zhang, Xian, *GCSAM: Gradient Centralized Sharpness
    Aware Minimization*, 2025. https://arxiv.org/abs/2501.11584
  """
  return sharpness_aware(
      rho,
      perturbation=perturbations.centralized(filter_axis, norm=norm, eps=eps),
      eps=eps,
      num_ascent_steps=num_ascent_steps,
      renormalize=renormalize,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="gcsam",
  )
