"""Weighted SAM (WSAM): sharpness as a weighted regularization term."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import validation
from sam_optax._core.builder import SAMState, ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._parts import directions, perturbations
from sam_optax._parts.compose import sharpness_aware

__all__ = ("WSAMDecoupledState", "wsam", "wsam_decoupled")


def _transform(
    caller, rho, gamma, decoupled, max_norm, eps, num_ascent_steps,
    nonfinite, axis_name, sync_perturbation, group_size,
):
  return sharpness_aware(
      rho,
      perturbation=perturbations.l2(eps),
      direction=directions.weighted(gamma, decoupled=decoupled, max_norm=max_norm),
      eps=eps,
      num_ascent_steps=num_ascent_steps,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name=caller,
  )


@validation.reported_as("wsam")
def wsam(
    rho: ScalarOrSchedule = 0.05,
    gamma: float = 0.88,
    *,
    max_norm: Optional[float] = None,
    eps: float = 1e-12,
    num_ascent_steps: Optional[int] = None,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Weighted SAM, coupled form: the sharpness term inside the base optimizer.

  WSAM minimizes the loss plus the sharpness weighted by
  :math:`\gamma / (1 - \gamma)`,

  .. math::

    L^{\mathrm{WSAM}}(w) = L(w) + \frac{\gamma}{1-\gamma}
    \bigl(L(w + \hat\epsilon) - L(w)\bigr), \qquad
    \hat\epsilon = \rho \frac{g}{\|g\|_2 + \mathrm{eps}},

  whose gradient, with :math:`\alpha = \gamma/(1-\gamma)` and
  :math:`g_p = \nabla L(w + \hat\epsilon)`, is handed on:

  .. math::

    u = g + \alpha\,(g_p - g) = \alpha\, g_p + (1 - \alpha)\, g .

  :math:`\gamma = 1/2` is SAM, :math:`\gamma = 0` the clean gradient; the
  default :math:`\gamma = 0.88` gives :math:`\alpha \approx 7.3`, a
  sharpness term about 7 times SAM's. Chain a base optimizer after it.
  Cost: +1 forward/backward pass, no buffer.

  This is the *coupled* form (``decouple=False`` in the authors' code): the
  sharpness term goes through the base optimizer's preconditioning and
  momentum. The authors' default is the *decoupled* form, in which the base
  optimizer steps with :math:`g` alone and the sharpness term is applied as
  a plain SGD step :math:`-\eta \alpha (g_p - g)` beside it; a transform
  placed in front of the base optimizer cannot do that, so it is
  :func:`sam_optax.wsam_decoupled`, which wraps the base optimizer.

  What is verified: the rule is transcribed from ``WeightedSAM``
  (``atorch/optimizers/wsam.py`` in ``intelligent-machine-learning/dlrover``,
  the authors' code; also in ``kozistr/pytorch_optimizer``, with
  ``gamma=0.9`` and no clipping by default): ε from the raw clean
  gradient, then both gradients clipped by
  ``torch.nn.utils.clip_grad_norm_(max_norm)`` before they are combined,
  with ``max_norm=1.0`` by default there. Here ``max_norm=None`` by
  default, since clipping is the training recipe's choice; ``max_norm=1.0``
  reproduces the authors' default (``g`` and :math:`g_p` each scaled by
  :math:`\min(1, c / (\|\cdot\| + 10^{-6}))`), on steps that take the pass.
  Their ``adaptive`` option (ASAM's operator with :math:`\eta = 0`) is
  ``sharpness_aware(perturbation=perturbations.adaptive(0.0),
  direction=directions.weighted(gamma))``.

  Choosing rho: SAM's scale; the perturbation is SAM's. The authors' code
  defaults to ρ = 0.05 with γ = 0.88 (Yue et al., KDD 2023); since
  :math:`\alpha` multiplies the sharpness, lower γ (or ρ) if training is
  unstable: at γ = 0.5 it is SAM's update with SAM's ρ (Foret et al., 2021).

  Args:
    rho: perturbation radius (a number or a schedule of the step count).
    gamma: :math:`\gamma \in [0, 1)`; the sharpness weight is
      :math:`\gamma/(1-\gamma)`.
    max_norm: clip ``g`` and :math:`g_p` each to this global norm before
      combining them (the authors' code: 1.0); ``None`` (default) does not.
    eps: added to the norm in the denominator of :math:`\hat\epsilon`.
    num_ascent_steps: see :func:`sam_optax.sam`.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` takes
    ``loss_fn=`` or ``grad_fn=``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = {"w": jnp.array([[2.0, -0.5], [0.1, 0.3]]), "b": jnp.zeros(2)}
    >>> loss_fn = lambda p: jnp.sum((jnp.ones(2) @ p["w"] + p["b"] - 1.0) ** 2)
    >>> tx = optax.chain(sam_optax.wsam(rho=0.05, gamma=0.88), optax.sgd(0.02))
    >>> state = tx.init(params)
    >>> start = loss_fn(params)
    >>> for _ in range(30):
    ...   grads = jax.grad(loss_fn)(params)
    ...   updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params) < 0.1 * start)
    True

  References:
    Yue, Jiang, Ye, Gao, Liu, Zhang, *Sharpness-Aware Minimization
    Revisited: Weighted Sharpness as a Regularization Term*, KDD 2023.
    https://arxiv.org/abs/2305.15817
  """
  return _transform(
      "wsam", rho, gamma, False, max_norm, eps, num_ascent_steps,
      nonfinite, axis_name, sync_perturbation, group_size,
  )


class WSAMDecoupledState(NamedTuple):
  """State of :func:`wsam_decoupled`.

  Attributes:
    sam: the state of the WSAM transform (a :class:`~sam_optax.SAMState`;
      its ``variant.direction.sharpness`` is the last :math:`g_p - g`).
    base: the state of the wrapped base optimizer.
  """

  sam: SAMState
  base: optax.OptState


@validation.reported_as("wsam_decoupled")
def wsam_decoupled(
    base_optimizer: optax.GradientTransformation,
    learning_rate: Union[float, Callable[[jax.Array], Any]],
    rho: ScalarOrSchedule = 0.05,
    gamma: float = 0.88,
    *,
    max_norm: Optional[float] = None,
    eps: float = 1e-12,
    num_ascent_steps: Optional[int] = None,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Weighted SAM, decoupled form (the authors' default): a full optimizer.

  The base optimizer steps with the clean gradient alone, and the weighted
  sharpness term is added beside it as a plain SGD step:

  .. math::

    \Delta w = \mathrm{base}(g) - \eta_t\, \alpha\, (g_p - g), \qquad
    \alpha = \frac{\gamma}{1-\gamma}, \quad
    g_p = \nabla L\Bigl(w + \rho \frac{g}{\|g\|_2 + \mathrm{eps}}\Bigr),

  with :math:`\eta_t` the base optimizer's learning rate (``learning_rate``,
  a number or the same schedule, evaluated at the step count from 0). With
  SGD without momentum both forms agree; with momentum or Adam the
  sharpness term here bypasses the momentum and the preconditioning, which
  is the point of decoupling (as for AdamW's weight decay). See
  :func:`sam_optax.wsam` for the coupled form, a chainable transform.

  This wraps ``base_optimizer`` rather than sitting in front of it, because
  the sharpness step must not pass through it; the result is a complete
  optimizer (its ``update`` returns the parameter update: apply it, do not
  chain another optimizer after it). Cost: +1 forward/backward pass and
  one buffer (the sharpness :math:`g_p - g`, kept between the pass and the
  step). ``update`` takes ``loss_fn=`` or ``grad_fn=`` as :func:`sam_optax.sam`
  does; other keyword arguments go to the base optimizer.

  What is verified: transcribed from ``WeightedSAM.second_step`` in
  ``atorch/optimizers/wsam.py`` (dlrover): ``sharpness = g_p - g`` (both
  clipped when ``max_norm`` is set), the base optimizer steps with ``g``,
  then ``p -= lr * alpha * sharpness`` with the parameter group's current
  ``lr``. ``max_norm`` is as in :func:`sam_optax.wsam` (the authors'
  default 1.0, here ``None``).

  Choosing rho: as :func:`sam_optax.wsam`: SAM's scale, ρ = 0.05 with
  γ = 0.88 in the authors' code (Yue et al., KDD 2023); γ = 0.5 weighs the
  sharpness as SAM's update does (Foret et al., 2021).

  Args:
    base_optimizer: the optimizer that steps with the clean gradient (for
      example ``optax.sgd(lr, momentum=0.9)``).
    learning_rate: its learning rate, a number or a schedule, which scales
      the sharpness step.
    rho: perturbation radius (a number or a schedule).
    gamma: :math:`\gamma \in [0, 1)`.
    max_norm: see :func:`sam_optax.wsam`.
    eps, num_ascent_steps, nonfinite: see :func:`sam_optax.sam`.
    axis_name, sync_perturbation, group_size: see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`WSAMDecoupledState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = {"w": jnp.array([[2.0, -0.5], [0.1, 0.3]]), "b": jnp.zeros(2)}
    >>> loss_fn = lambda p: jnp.sum((jnp.ones(2) @ p["w"] + p["b"] - 1.0) ** 2)
    >>> lr = 0.02
    >>> tx = sam_optax.wsam_decoupled(optax.sgd(lr, momentum=0.9), lr, rho=0.05)
    >>> state = tx.init(params)
    >>> start = loss_fn(params)
    >>> for _ in range(30):
    ...   grads = jax.grad(loss_fn)(params)
    ...   updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params) < 0.1 * start)
    True

  References:
    Yue, Jiang, Ye, Gao, Liu, Zhang, *Sharpness-Aware Minimization
    Revisited: Weighted Sharpness as a Regularization Term*, KDD 2023.
    https://arxiv.org/abs/2305.15817
  """
  caller = "wsam_decoupled"
  if not isinstance(base_optimizer, optax.GradientTransformation):
    raise TypeError(
        f"`{caller}`: `base_optimizer` must be an optax GradientTransformation"
        f" (for example `optax.sgd(lr)`); got {type(base_optimizer).__name__}."
    )
  validation.check_scalar(caller, "learning_rate", learning_rate, low=0.0,
                          allow_schedule=True)
  inner = _transform(
      caller, rho, gamma, True, max_norm, eps, num_ascent_steps,
      nonfinite, axis_name, sync_perturbation, group_size,
  )
  base = optax.with_extra_args_support(base_optimizer)
  alpha = gamma / (1.0 - gamma)

  def init_fn(params):
    return WSAMDecoupledState(sam=inner.init(params), base=base.init(params))

  def update_fn(updates, state, params=None, *, loss_fn=None, grad_fn=None,
                loss_scale=None, **extra_args):
    count = state.sam.count
    clean, sam_state = inner.update(
        updates, state.sam, params, loss_fn=loss_fn, grad_fn=grad_fn,
        loss_scale=loss_scale,
    )
    step, base_state = base.update(clean, state.base, params, **extra_args)
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    # The sharpness of this step's pass; 0 where none ran (rho = 0, a
    # non-finite perturbed gradient skipped).
    took = sam_state.stats.pass_taken > 0
    scale = jnp.where(took, -jnp.asarray(lr, jnp.float32) * alpha, 0.0)
    sharp = sam_state.variant.direction.sharpness
    out = jax.tree.map(
        lambda u, s: (u.astype(s.dtype) + scale.astype(s.dtype) * s).astype(u.dtype),
        step, sharp,
    )
    return out, WSAMDecoupledState(sam=sam_state, base=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
