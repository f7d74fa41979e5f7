"""Random weight perturbation (RWP): a filter-wise Gaussian perturbation."""

from __future__ import annotations

from typing import Any, Optional

import jax
import optax

from sam_optax._core import radius, validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._core.prng import PRNG, KeyLike, RandomKeyState
from sam_optax._parts import directions, perturbations
from sam_optax._parts.compose import sharpness_aware

__all__ = ("RandomKeyState", "rwp", "rwp_noise")


def rwp_noise(keys: jax.Array, params: Any, filter_axis: str = "last") -> Any:
  """RWP's noise for unit ``gamma``: ``z * ‖filter‖`` with ``z ~ N(0, 1)``.

  Leaf ``i`` of ``params`` uses ``keys[i]``; the result is in at least
  float32. Multiply by ``gamma`` to get the perturbation.
  """
  return perturbations.gaussian_noise(keys, params, filter_axis)


@validation.reported_as("rwp")
def rwp(
    gamma: ScalarOrSchedule = 0.01,
    alpha: float = 0.5,
    *,
    key: KeyLike = 0,
    filter_axis: str = "last",
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Random weight perturbation: mix a gradient at noisy weights with the clean one.

  RWP replaces SAM's adversarial perturbation by a random one, drawn
  independently for every filter of every weight matrix, with a standard
  deviation proportional to that filter's norm,

  .. math::

    \epsilon_{W,i} \sim \mathcal{N}\!\left(0,\ \gamma^2 \|W_i\|_2^2 \, I\right),
    \qquad
    u = \alpha \, \nabla L(w + \epsilon) + (1 - \alpha) \, g ,

  where :math:`g = \nabla L(w)` is the clean gradient handed to ``update``.
  The filters :math:`W_i` of a leaf with two or more dimensions are its
  slices along ``filter_axis``: with ``"last"`` (Flax and Haiku layouts),
  each output column of a ``(in, out)`` Dense kernel and each output
  channel of a ``(h, w, in, out)`` convolution kernel; ``"first"`` is the
  PyTorch layout ``(out, in, ...)``. Leaves with fewer than two dimensions
  (biases, normalization scales, scalars) get i.i.d. noise with standard
  deviation :math:`\gamma \|w\|_2`, the norm of the whole leaf, as in the
  official implementation.

  A fresh :math:`\epsilon` is drawn at every step from the key in the state.
  The noise does not depend on the gradient, so the perturbation does not
  vanish when ``g = 0``. ``gamma == 0`` as a Python number returns ``g``
  unchanged and compiles no second pass; a scheduled or traced ``gamma``
  runs the pass on every step (no conditional).

  It is the composition :func:`sam_optax.sharpness_aware` ``(gamma,
  perturbation=perturbations.random(key, filter_axis=filter_axis),
  direction=directions.mix(alpha))``: either part combines with other parts
  and policies.

  Cost: one extra forward/backward pass. The two gradients are independent;
  the paper computes them on two different mini-batches, in parallel. Here
  the clean gradient is the caller's; pass a ``loss_fn`` (or ``grad_fn``)
  closed over a second batch to reproduce the two-batch estimator.

  Choosing rho: here ``gamma``, a relative noise scale rather than a radius,
  with no conversion from SAM's ρ: each entry of a filter gets noise of
  standard deviation γ times the filter's norm, so a filter of :math:`n`
  entries moves by about :math:`\gamma \sqrt{n}` times its norm, more in wider
  layers. Li et al. (2022; TMLR 2024) use γ = 0.01 on CIFAR and 0.005 on
  ImageNet, with α = 0.5.

  Args:
    gamma: relative noise scale :math:`\gamma \ge 0`, or a schedule of the
      step count (see "Choosing rho" above). Plays the role of SAM's
      ``rho``; ``sam_stats(state).rho`` records it.
    alpha: weight :math:`\alpha \in [0, 1]` of the perturbed gradient.
    key: a non-negative int seed or a JAX PRNG key (typed, or a legacy
      ``uint32`` key) for the noise.
    filter_axis: ``"last"`` or ``"first"``: the axis that indexes filters in
      leaves with two or more dimensions.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes
    ``loss_fn=`` or ``grad_fn=`` like :func:`sam_optax.sam`. Its state is a
    :class:`~sam_optax.SAMState` whose ``variant.perturbation`` is a
    :class:`RandomKeyState`.

  Raises:
    ValueError: if ``gamma`` is negative, ``alpha`` outside ``[0, 1]``,
      ``key`` not a seed or key, or ``filter_axis`` not ``"last"`` or
      ``"first"``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> loss_fn = lambda p: jnp.sum((jnp.ones(3) @ p["w"] + p["b"] - 1.0) ** 2)
    >>> tx = optax.chain(sam_optax.rwp(gamma=0.01, alpha=0.5, key=0),
    ...                  optax.sgd(0.01, momentum=0.9))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    >>> float(sam_optax.sam_stats(state).pass_taken)
    1.0

  References:
    Li, Zhang, Huang, Yang, Suykens, Huang, *Efficient Generalization
    Improvement Guided by Random Weight Perturbation*, 2022.
    https://arxiv.org/abs/2211.11489

    Li, Huang, Yang, Huang, *Revisiting Random Weight Perturbation for
    Efficiently Improving Generalization*, TMLR 2024.
    https://arxiv.org/abs/2404.00357
  """
  if not radius.is_controlled(gamma):  # "auto" and guarded are checked later
    validation.check_scalar("rwp", "gamma", gamma, low=0.0, allow_schedule=True)
  validation.check_scalar("rwp", "alpha", alpha, low=0.0, high=1.0)
  perturbations.check_filter_axis("rwp", filter_axis)
  PRNG.of("rwp", key)  # a bad key is reported under this name
  return sharpness_aware(
      gamma,
      perturbation=perturbations.random(key, filter_axis=filter_axis),
      direction=directions.mix(alpha),
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="rwp",
  )
