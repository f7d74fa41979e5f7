"""The radius in force: a number or schedule, ``rho="auto"``, or a guarded rho.

Both controllers read one signal that every sharpness-aware step yields
without an extra pass, the *gradient change*

.. math::

  c = \\frac{\\|g_p - g\\|}{\\|g\\|}, \\qquad g = \\nabla L(w), \\quad
  g_p = \\nabla L(w + \\epsilon),

dimensionless and the same whatever the geometry of ``ε`` (SAM's, ASAM's or
any other perturbation). For small radii ``c`` grows linearly with ``rho``.
A run heading for collapse to a constant predictor (every ReLU dead at the
perturbed point) shows a large ``c`` early: on the benchmarks of this
package, MLPs that collapsed measured ``c > 1`` from their first steps and
CNNs collapsed with ``c`` held near 1, while no run held at ``c <= 0.5``
collapsed at SGD's learning rate.

* :func:`auto_rho` (``rho="auto"``) holds ``c`` at a target by adapting
  ``log rho``: the first measurements are averaged (gain ``1/n``), then an
  integral controller (gain ``gain``) tracks the target as training moves.
* :func:`guarded` keeps the user's radius (a number or a schedule) and
  scales it by a factor in ``(0, 1]``.

Both back off like dynamic loss scaling: where ``c`` exceeds ``threshold``,
or the perturbed gradient is not finite, the radius is multiplied by
``backoff``. The guarded factor then grows back by ``1 + recovery`` per step.
The state is a few scalars; with an axis name the signal is averaged over the
axis first, so every member keeps the same radius.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import validation

ScalarOrSchedule = Any


class AutoRho(NamedTuple):
  """``rho="auto"``: the radius that holds the gradient change at ``target``.

  Build it with :func:`sam_optax.auto_rho`; ``"auto"`` is ``auto_rho()``.
  """

  target: float = 0.2
  threshold: float = 0.5
  backoff: float = 0.5
  gain: float = 0.05
  init: float = 1e-3


class GuardedRho(NamedTuple):
  """A radius (number or schedule) with the collapse guard.

  Build it with :func:`sam_optax.guarded`.
  """

  rho: ScalarOrSchedule
  threshold: float = 0.5
  backoff: float = 0.5
  recovery: float = 0.01


Controller = Union[AutoRho, GuardedRho]


class RadiusState(NamedTuple):
  """The state of a radius controller (``SAMState.radius``).

  Attributes:
    log_scale: ``log rho`` in force (``rho="auto"``), or the log of the
      guard's factor, at most 0 (:func:`~sam_optax.guarded`); float32.
    measured: number of steps whose gradient change was measured (int32).
    backoffs: number of back-offs so far (int32).
    auto: True for ``rho="auto"`` (``log_scale`` is ``log rho``), False for
      :func:`~sam_optax.guarded` (a boolean scalar, constant).
  """

  log_scale: jax.Array
  measured: jax.Array
  backoffs: jax.Array
  auto: jax.Array


def _number(x: Any) -> Any:
  """A Python float, or a traced value as it is (under a sweep's ``vmap``)."""
  return x if isinstance(x, jax.core.Tracer) else float(x)


def _check_shared(caller: str, threshold: Any, backoff: Any) -> None:
  validation.check_scalar(
      caller, "threshold", threshold, low=0.0, low_inclusive=False
  )
  validation.check_scalar(
      caller, "backoff", backoff, low=0.0, high=1.0, low_inclusive=False,
      high_inclusive=False,
  )


def auto_rho(
    target: float = 0.2,
    *,
    threshold: float = 0.5,
    backoff: float = 0.5,
    gain: float = 0.05,
    init: float = 1e-3,
) -> AutoRho:
  r"""A radius chosen and adapted by the training itself (``rho="auto"``).

  Every sharpness-aware step measures the gradient change
  :math:`c = \|g_p - g\| / \|g\|` between the perturbed and the clean
  gradient, and ``log rho`` moves toward the radius where :math:`c` equals
  ``target``: :math:`\log\rho \mathrel{+}= k\,(\log c^* - \log c)`, with
  gain :math:`k = \max(\text{gain}, 1/n)` on the :math:`n`-th measurement
  (the first steps average their estimates, later ones track). Where
  :math:`c > \text{threshold}`, or the perturbed gradient is not finite,
  the radius is also multiplied by ``backoff`` (the collapse guard).

  The signal is dimensionless and measured in the transform's own geometry,
  so the same ``target`` serves SAM, ASAM and every other perturbation: the
  radius settles at each geometry's own scale. It costs no extra pass and a
  few scalar operations; the clean gradient is kept through the perturbed
  pass to measure :math:`c` (one parameter-sized buffer more than a fixed
  ``rho`` with SAM's own rule).

  The radius in force is ``sam_stats(state).rho``, the measured change
  ``grad_change`` and the number of back-offs ``backoffs``.

  Args:
    target: the gradient change held, ``> 0``. A target at or above
      ``threshold`` grows the radius until the guard backs off: the largest
      radius the guard allows.
    threshold: the change above which the radius backs off.
    backoff: factor applied on a back-off, in ``(0, 1)``.
    gain: the tracking gain of ``log rho`` per step, in ``(0, 1]``.
    init: the radius of the first step, before anything is measured.

  Returns:
    An :class:`AutoRho` to pass as ``rho``.

  Examples:
    >>> import optax, sam_optax
    >>> tx = optax.chain(sam_optax.sam(rho="auto"), optax.sgd(0.1))
    >>> tx = optax.chain(
    ...     sam_optax.asam(rho=sam_optax.auto_rho(target=0.3)), optax.sgd(0.1))
  """
  caller = "auto_rho"
  _check_shared(caller, threshold, backoff)
  validation.check_scalar(caller, "target", target, low=0.0, low_inclusive=False)
  validation.check_scalar(
      caller, "gain", gain, low=0.0, high=1.0, low_inclusive=False
  )
  validation.check_scalar(caller, "init", init, low=0.0, low_inclusive=False)
  return AutoRho(*map(_number, (target, threshold, backoff, gain, init)))


def guarded(
    rho: ScalarOrSchedule,
    *,
    threshold: float = 0.5,
    backoff: float = 0.5,
    recovery: float = 0.01,
) -> GuardedRho:
  r"""A fixed or scheduled radius with the collapse guard.

  The radius in force is ``rho`` (at the step count, for a schedule) times a
  factor :math:`f \in (0, 1]`, 1 at the start. Where the gradient change
  :math:`c = \|g_p - g\| / \|g\|` exceeds ``threshold``, or the perturbed
  gradient is not finite, :math:`f` is multiplied by ``backoff``; otherwise
  it grows back by ``1 + recovery`` per step, up to 1. A run whose ``rho``
  is safe never sees :math:`c` reach the threshold and trains exactly as
  with ``rho`` itself.

  Args:
    rho: the radius, a number or a schedule of the step count.
    threshold: the gradient change above which the radius backs off.
    backoff: factor applied on a back-off, in ``(0, 1)``.
    recovery: growth of the factor per step after a back-off, ``>= 0``.

  Returns:
    A :class:`GuardedRho` to pass as ``rho``.

  Examples:
    >>> import optax, sam_optax
    >>> tx = optax.chain(sam_optax.sam(rho=sam_optax.guarded(0.5)),
    ...                  optax.sgd(0.1))
  """
  caller = "guarded"
  if isinstance(rho, (str, AutoRho, GuardedRho)):
    raise ValueError(
        f"`{caller}`: `rho` must be a number or a schedule; got rho={rho!r}."
        ' `rho="auto"` already includes the guard.'
    )
  validation.check_scalar(caller, "rho", rho, low=0.0, allow_schedule=True)
  _check_shared(caller, threshold, backoff)
  validation.check_scalar(caller, "recovery", recovery, low=0.0)
  return GuardedRho(rho, *map(_number, (threshold, backoff, recovery)))


def is_controlled(rho: Any) -> bool:
  """Whether ``rho`` asks for a controller (``"auto"``, auto_rho, guarded)."""
  return (isinstance(rho, str) and rho == "auto") or isinstance(
      rho, (AutoRho, GuardedRho)
  )


def resolve(
    caller: str, rho: Any
) -> tuple[ScalarOrSchedule, Optional[Controller]]:
  """``(base radius, controller)`` of a transform's ``rho`` argument."""
  if isinstance(rho, str):
    if rho != "auto":
      raise ValueError(
          f'`{caller}`: `rho` must be a number, a schedule, "auto",'
          " `sam_optax.auto_rho(...)` or `sam_optax.guarded(...)`; got"
          f" rho={rho!r}."
      )
    rho = auto_rho()
  if isinstance(rho, AutoRho):
    return None, rho
  if isinstance(rho, GuardedRho):
    return rho.rho, rho
  return rho, None


def init(controller: Optional[Controller]) -> Any:
  """The controller's initial state (``optax.EmptyState()`` without one)."""
  if controller is None:
    return optax.EmptyState()
  auto = isinstance(controller, AutoRho)
  start = jnp.log(controller.init) if auto else 0.0
  return RadiusState(
      log_scale=jnp.asarray(start, jnp.float32),
      measured=jnp.zeros((), jnp.int32),
      backoffs=jnp.zeros((), jnp.int32),
      auto=jnp.asarray(auto),
  )


def in_force(
    controller: Optional[Controller], state: Any, base: Optional[jax.Array]
) -> jax.Array:
  """The radius used at this step."""
  if controller is None:
    return base
  scale = jnp.exp(state.log_scale)
  if isinstance(controller, AutoRho):
    return scale
  return base * scale.astype(base.dtype)


def adapt(
    controller: Controller,
    state: RadiusState,
    change: jax.Array,
    measured: jax.Array,
    bad: jax.Array,
    finite: jax.Array,
) -> RadiusState:
  """The state after this step (``backoffs`` counts a back-off).

  Args:
    controller: the :class:`AutoRho` or :class:`GuardedRho`.
    state: the state before this step.
    change: the gradient change ``c`` of this step (agreed over the axis).
    measured: whether ``c`` was measured (a finite step with a pass).
    bad: whether the perturbed gradient was not finite.
    finite: whether the clean gradient was finite (else nothing changes).
  """
  s = state.log_scale
  measured = measured & finite
  fire = finite & (bad | (measured & (change > controller.threshold)))
  down = jnp.log(jnp.asarray(controller.backoff, jnp.float32))
  if isinstance(controller, AutoRho):
    gain = jnp.maximum(
        jnp.asarray(controller.gain, jnp.float32),
        1.0 / (state.measured + 1).astype(jnp.float32),
    )
    c = jnp.maximum(jnp.where(measured, change, 1.0), 1e-12)
    err = jnp.log(jnp.asarray(controller.target, jnp.float32)) - jnp.log(c)
    tracked = jnp.where(measured, s + gain * err, s)
    new = jnp.where(fire, jnp.minimum(tracked, s) + down, tracked)
  else:
    recovery = jnp.asarray(controller.recovery, jnp.float32)
    grown = jnp.minimum(0.0, s + jnp.log1p(recovery))
    new = jnp.where(fire, s + down, jnp.where(finite, grown, s))
  new = jnp.clip(new, -80.0, 80.0).astype(jnp.float32)
  return RadiusState(
      log_scale=new,
      measured=state.measured + measured.astype(jnp.int32),
      backoffs=state.backoffs + fire.astype(jnp.int32),
      auto=state.auto,
  )
