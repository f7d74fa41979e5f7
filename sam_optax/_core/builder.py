"""The update pipeline shared by every sharpness-aware transform.

A variant is described by a :class:`Rule`: where to perturb the weights,
how to form the output from the clean and the perturbed gradient, and when
the perturbed pass runs (``sam_optax._parts`` assembles rules from
interchangeable parts). :func:`build` wires a rule into an
``optax.GradientTransformationExtraArgs`` whose ``update`` runs the stages of
``sam_optax._core.stages`` from top to bottom.

No conditional is compiled on the path of a transform without a policy: a
traced or scheduled ``rho`` runs the pass on every step (a ``rho`` of 0
evaluates the gradient at ``w`` itself), and a non-finite gradient is
handled by selects. Unless the rule's ``combine`` reads it, the clean
gradient is dead once the perturbed point is formed, so its buffer is reused
during the pass.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._core import checks, closure, collectives, radius, stages, validation
from sam_optax._core.stats import SAMStats

PyTree = Any
NONFINITE_POLICIES = ("skip", "fallback", "propagate")
ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], Any]]


class SAMState(NamedTuple):
  """State of every sharpness-aware transform in this package.

  Attributes:
    count: number of ``update`` calls so far (int32); a ``rho`` schedule is
      evaluated at this count, starting at 0.
    stats: diagnostics of the last step, see :class:`SAMStats`.
    nonfinite_count: number of steps (int32) whose perturbed gradient was
      not finite (handled by the transform's ``nonfinite`` policy).
    variant: the variant's own state (``optax.EmptyState()`` for plain SAM).
    radius: the state of ``rho="auto"`` or :func:`~sam_optax.guarded`, a
      :class:`~sam_optax.RadiusState`; ``optax.EmptyState()`` for a number
      or a schedule.
  """

  count: jax.Array
  stats: SAMStats
  nonfinite_count: jax.Array
  variant: PyTree = optax.EmptyState()
  radius: PyTree = optax.EmptyState()


def _keep_clean(g, params, state):
  del params
  return g, state


class Rule(NamedTuple):
  """What makes a variant: its perturbation, and optionally more.

  Attributes:
    init: ``params -> variant_state``.
    direction: ``(g, params, variant_state, count) -> (d, variant_state)``.
      The perturbation is ``ε = rho * d``; ``d`` is computed in at least
      float32. For SAM, ``d = g / (‖g‖ + eps)``. With several ascent steps
      it is called again with the gradient at each intermediate point, and
      the state it returns then is discarded.
    prepare: ``None`` or ``(g, params, variant_state, count) -> variant_state``,
      run once per step on the clean gradient before ``direction``; every
      ascent step sees the state it returns (a Fisher mask refreshed here,
      for example).
    combine: ``None`` (hand on the perturbed gradient ``g_p``, SAM's rule) or
      ``(g, g_p, params, variant_state) -> (out, variant_state)``, which
      turns the clean gradient ``g`` and the perturbed one ``g_p`` into the
      direction handed on. ``None`` also tells the pipeline that ``g`` is
      not needed after the pass, so its buffer is freed before it.
    gate: ``None`` (always take the perturbed pass) or
      ``(g, params, variant_state, count) -> (take, variant_state)`` with a
      boolean scalar ``take``; steps where it is false skip the pass.
    fallback: ``(g, params, variant_state) -> (out, variant_state)``, the
      output on steps the gate skips. Default: ``g``.
    points: further points evaluated in order after the perturbed pass (GAM
      takes three gradients beyond the clean one), each
      ``(g, grads, directions, params, variant_state) -> d_k``: ``grads``
      holds the gradients at the earlier perturbed points (``g_p`` first),
      ``directions`` their unit-radius offsets (``direction``'s ``d``
      first), and the next point is ``w + rho * d_k``. With points,
      ``combine`` is required and receives as ``g_p`` the tuple of the
      gradients at every perturbed point, in order; one ascent step only.
    companion: ``None`` or ``(params, variant_state, count) -> point``, a
      second point (absolute, not scaled by ``rho``) whose gradient does not
      depend on the perturbed pass (SAMPa's extrapolated ``y``). Its
      gradient comes from ``loss_fn``/``grad_fn``; ``combine`` is required
      and receives ``(g_p, g_c)`` as ``g_p``. Not with ``points``; one
      ascent step only.
    parallel: with a companion, evaluate both gradients in one ``jax.vmap``
      over the two points (both must then come from the same closure).
    pass_closure: ``None`` or the names ``(loss_name, grad_name)`` of two
      optional keywords of ``update``; a closure given under one of them
      evaluates the perturbed pass instead of ``loss_fn``/``grad_fn``
      (SAMPa's previous batch).
    reads_clean: ``False`` for a rule that never reads the clean gradient
      (SAMPa ascends along a stored one): its functions receive zeros in its
      place, the statistics record a ``grad_norm`` of 0, and the gradient
      handed to ``update`` is dead code under ``jit`` (no pass is spent on
      it). ``nonfinite="fallback"`` is then refused.
  """

  init: Callable[[PyTree], PyTree]
  direction: Callable[..., tuple[PyTree, PyTree]]
  prepare: Optional[Callable[..., PyTree]] = None
  combine: Optional[Callable[..., tuple[PyTree, PyTree]]] = None
  gate: Optional[Callable[..., tuple[jax.Array, PyTree]]] = None
  fallback: Callable[..., tuple[PyTree, PyTree]] = _keep_clean
  points: tuple[Callable[..., PyTree], ...] = ()
  companion: Optional[Callable[..., PyTree]] = None
  parallel: bool = False
  pass_closure: Optional[tuple[str, str]] = None
  reads_clean: bool = True


def _static_number(value: Any) -> Optional[float]:
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return float(value)
  return None


def check_common(
    caller: str, rho: Any, eps: Any, num_ascent_steps: Any, renormalize: Any
) -> None:
  """Construction-time checks of the options every transform shares.

  ``rho`` is the base radius (``None`` for ``rho="auto"``).
  """
  if rho is not None:
    validation.check_scalar(caller, "rho", rho, low=0.0, allow_schedule=True)
  validation.check_scalar(caller, "eps", eps, low=0.0, low_inclusive=False)
  validation.check_int(caller, "num_ascent_steps", num_ascent_steps, low=1)
  if not isinstance(renormalize, bool):
    raise ValueError(
        f"`{caller}`: `renormalize` must be True or False; got"
        f" renormalize={renormalize!r}."
    )


def _check_points(caller: str, rule: Rule, num_ascent_steps: Any) -> None:
  """A rule with further points needs ``combine`` and one ascent step."""
  if rule.combine is None:
    raise ValueError(
        f"`{caller}`: a rule with further `points` needs a `combine` (the"
        " gradients at its points reach it as a tuple)."
    )
  if isinstance(num_ascent_steps, jax.core.Tracer) or int(
      np.asarray(num_ascent_steps)
  ) != 1:
    raise ValueError(
        f"`{caller}`: `num_ascent_steps` must be 1 (or None) for a variant"
        " that evaluates further points after the perturbed pass; got"
        f" num_ascent_steps={num_ascent_steps!r}."
    )


def build(
    caller: str,
    rho: ScalarOrSchedule,
    rule: Rule,
    *,
    eps: float = 1e-12,
    num_ascent_steps: Optional[int] = 1,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[collectives.AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  """Assembles a sharpness-aware transform from its rule (see module doc).

  ``num_ascent_steps=None`` means one step; it is the factories' default so
  that ``optax.inject_hyperparams`` does not turn the number of passes into
  a traced value (which would need a loop).
  """
  if num_ascent_steps is None:
    num_ascent_steps = 1
  rho, controller = radius.resolve(caller, rho)
  check_common(caller, rho, eps, num_ascent_steps, renormalize)
  validation.check_option(caller, "nonfinite", nonfinite, NONFINITE_POLICIES)
  collectives.check_options(caller, axis_name, sync_perturbation, group_size)
  if rule.points:
    _check_points(caller, rule, num_ascent_steps)
  if not rule.reads_clean and nonfinite == "fallback":
    raise ValueError(
        f"`{caller}`: nonfinite='fallback' hands on the clean gradient, which"
        f" `{caller}` does not compute from; use 'skip' (a zero gradient) or"
        " 'propagate'."
    )
  if rule.companion is not None:
    if rule.points:
      raise ValueError(f"`{caller}`: a rule takes `points` or a `companion`, not both.")
    _check_points(caller, rule, num_ascent_steps)
  cfg = stages.Config(
      caller=caller,
      rule=rule,
      rho=rho,
      static_rho=None if controller is not None else _static_number(rho),
      controller=controller,
      num_ascent_steps=num_ascent_steps,
      static_steps=(
          None
          if isinstance(num_ascent_steps, jax.core.Tracer)
          else int(np.asarray(num_ascent_steps))
      ),
      eps=eps,
      renormalize=renormalize,
      nonfinite=nonfinite,
      axis=collectives.Axis(axis_name, sync_perturbation, group_size),
  )

  def init_fn(params: PyTree) -> SAMState:
    closure.check_floating(cfg.caller, params, "`params`")
    return SAMState(
        count=jnp.zeros((), jnp.int32),
        stats=SAMStats.zeros(),
        nonfinite_count=jnp.zeros((), jnp.int32),
        variant=rule.init(params),
        radius=radius.init(controller),
    )

  def update_fn(
      updates: PyTree,
      state: SAMState,
      params: Optional[PyTree] = None,
      *,
      loss_fn: Optional[Callable[..., Any]] = None,
      grad_fn: Optional[Callable[[PyTree], PyTree]] = None,
      loss_scale: Optional[Any] = None,
      sam_pass: Optional[bool] = None,
      **extra_args: Any,
  ) -> tuple[PyTree, SAMState]:
    checks.reject_wrappers(cfg.caller)
    oracle, local = stages.gradient_closure(
        cfg, updates, params, loss_fn, grad_fn, loss_scale
    )
    pass_oracle = stages.pass_oracle(
        cfg, oracle, updates, params, loss_scale, extra_args
    )
    del extra_args
    count = state.count
    if not rule.reads_clean:  # the caller's gradient is left dead
      clean = stages.unread_clean(local)
    else:
      if checks.active():  # opt-in: compiled only while the checks are on
        checks.compare(cfg.caller, oracle, local, params, count)
      clean = stages.clean_gradient(cfg, local)
    rho_t = stages.radius(cfg, count, state.radius)
    direction, prepared, variant = stages.ascent_direction(
        cfg, clean, params, state.variant, count
    )
    take, variant = stages.gate(cfg, clean, params, variant, count, sam_pass)

    def perturbed(variant):
      return stages.perturbed_step(
          cfg, pass_oracle, clean, params, direction, prepared, variant, rho_t,
          count, companion_oracle=oracle,
      )

    def skipped(variant):
      return stages.skipped_step(cfg, clean, params, variant)

    if take is False:  # the caller skips the pass at this step
      outcome = skipped(variant)
    elif cfg.static_rho == 0.0 and rule.companion is None:  # no pass compiled
      outcome = stages.no_pass(clean, variant)
    elif take is None or take is True:  # the pass runs, unconditionally
      outcome = perturbed(variant)
    else:  # the rule's policy decides at run time
      outcome = stages.switch(cfg, take, skipped, perturbed, variant, updates)
    out, stats, nonfinite_count, variant, radius_state = stages.finish(
        cfg, outcome, clean, state, rho_t, updates
    )
    return out, SAMState(
        count=optax.safe_increment(state.count),
        stats=stats,
        nonfinite_count=nonfinite_count,
        variant=variant,
        radius=radius_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


