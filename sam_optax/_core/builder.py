"""The update pipeline shared by every sharpness-aware transform.

A variant is described by a :class:`Rule`: where to perturb the weights,
how to form the output from the clean and the perturbed gradient, and when
the perturbed pass runs (``sam_optax._parts`` assembles rules from
interchangeable parts). :func:`build` wires a rule into an
``optax.GradientTransformationExtraArgs`` that

1. validates the closure and the gradient tree (``_core.closure``),
2. evaluates ``rho`` (a number, an array or a schedule of the step count),
3. skips the perturbed pass where ``rho == 0`` (statically for Python
   numbers, with ``jax.lax.cond`` otherwise),
4. runs ``num_ascent_steps`` ascent steps of size ``rho / num_ascent_steps``,
5. combines, optionally renormalizes to the clean gradient's norm, and
6. records :class:`SAMStats` and the step count in a :class:`SAMState`.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._core import closure, collectives, tree, validation
from sam_optax._core.stats import SAMStats

PyTree = Any
NONFINITE_POLICIES = ("fallback", "propagate")
ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], Any]]


class SAMState(NamedTuple):
  """State of every sharpness-aware transform in this package.

  Attributes:
    count: number of ``update`` calls so far (int32); a ``rho`` schedule is
      evaluated at this count, starting at 0.
    stats: diagnostics of the last step, see :class:`SAMStats`.
    nonfinite_count: number of steps (int32) whose perturbed gradient was
      not finite, where the clean gradient was handed on instead.
    variant: the variant's own state (``optax.EmptyState()`` for plain SAM).
  """

  count: jax.Array
  stats: SAMStats
  nonfinite_count: jax.Array
  variant: PyTree = optax.EmptyState()


def _keep_perturbed(g, g_p, params, state):
  del g, params
  return g_p, state


def _keep_clean(g, params, state):
  del params
  return g, state


class Rule(NamedTuple):
  """What makes a variant: its perturbation, and optionally more.

  Attributes:
    init: ``params -> variant_state``.
    prepare: ``None`` or ``(g, params, variant_state, count) -> variant_state``,
      run once per step on the clean gradient before ``direction``; every
      ascent step sees the state it returns (a Fisher mask refreshed here,
      for example).
    direction: ``(g, params, variant_state, count) -> (d, variant_state)``.
      The perturbation is ``ε = rho * d``; ``d`` is computed in at least
      float32. For SAM, ``d = g / (‖g‖ + eps)``. With several ascent steps
      it is called again with the gradient at each intermediate point, and
      the state it returns then is discarded.
    combine: ``(g, g_p, params, variant_state) -> (out, variant_state)``:
      turns the clean gradient ``g`` and the perturbed one ``g_p`` into the
      direction handed on. Default: ``g_p``.
    gate: ``None`` (always take the perturbed pass) or
      ``(g, params, variant_state, count) -> (take, variant_state)`` with a
      boolean scalar ``take``; steps where it is false skip the pass.
    fallback: ``(g, params, variant_state) -> (out, variant_state)``, the
      output on steps the gate skips. Default: ``g``.
  """

  init: Callable[[PyTree], PyTree]
  direction: Callable[..., tuple[PyTree, PyTree]]
  prepare: Optional[Callable[..., PyTree]] = None
  combine: Callable[..., tuple[PyTree, PyTree]] = _keep_perturbed
  gate: Optional[Callable[..., tuple[jax.Array, PyTree]]] = None
  fallback: Callable[..., tuple[PyTree, PyTree]] = _keep_clean


def _static_number(value: Any) -> Optional[float]:
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return float(value)
  return None


def check_common(
    caller: str, rho: Any, eps: Any, num_ascent_steps: Any, renormalize: Any
) -> None:
  """Construction-time checks of the options every transform shares."""
  validation.check_scalar(caller, "rho", rho, low=0.0, allow_schedule=True)
  validation.check_scalar(caller, "eps", eps, low=0.0, low_inclusive=False)
  validation.check_int(caller, "num_ascent_steps", num_ascent_steps, low=1)
  if not isinstance(renormalize, bool):
    raise ValueError(
        f"`{caller}`: `renormalize` must be True or False; got"
        f" renormalize={renormalize!r}."
    )


def build(
    caller: str,
    rho: ScalarOrSchedule,
    rule: Rule,
    *,
    eps: float = 1e-12,
    num_ascent_steps: int = 1,
    renormalize: bool = False,
    nonfinite: str = "fallback",
    axis_name: Optional[collectives.AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  """Assembles a sharpness-aware transform from its rule (see module doc)."""
  check_common(caller, rho, eps, num_ascent_steps, renormalize)
  validation.check_option(caller, "nonfinite", nonfinite, NONFINITE_POLICIES)
  collectives.check_options(caller, axis_name, sync_perturbation, group_size)
  axis = collectives.Axis(axis_name, sync_perturbation, group_size)
  static_rho = _static_number(rho)
  static_steps = (
      None
      if isinstance(num_ascent_steps, jax.core.Tracer)
      else int(np.asarray(num_ascent_steps))
  )

  def init_fn(params: PyTree) -> SAMState:
    return SAMState(
        count=jnp.zeros((), jnp.int32),
        stats=SAMStats.zeros(),
        nonfinite_count=jnp.zeros((), jnp.int32),
        variant=rule.init(params),
    )

  def update_fn(
      updates: PyTree,
      state: SAMState,
      params: Optional[PyTree] = None,
      *,
      loss_fn: Optional[Callable[..., Any]] = None,
      grad_fn: Optional[Callable[[PyTree], PyTree]] = None,
      loss_scale: Optional[Any] = None,
      **extra_args: Any,
  ) -> tuple[PyTree, SAMState]:
    del extra_args
    raw_oracle = closure.gradient_oracle(caller, params, loss_fn, grad_fn)
    closure.check_same_tree(
        caller, updates, params, "`updates` (the clean gradient)", "params"
    )
    if axis.active:
      axis.check_local(caller, updates)
    unscale = _unscaler(caller, loss_scale)
    local = unscale(updates)

    def oracle(point):
      g_k, loss_k = raw_oracle(axis.to_varying(point))
      return unscale(g_k), loss_k / (1.0 if loss_scale is None else loss_scale)

    g = axis.perturbation_gradient(local)
    count = state.count
    rho_t = jnp.asarray(rho(count) if callable(rho) else rho)
    if static_rho is None:  # checked at construction otherwise
      rho_t = jnp.maximum(rho_t, 0)
    grad_norm = tree.global_norm(g)
    finite = jnp.isfinite(grad_norm)
    if axis.active:
      finite = jnp.logical_not(axis.any(jnp.logical_not(finite)))
    prepared = state.variant
    if rule.prepare is not None:
      prepared = rule.prepare(g, params, prepared, count)
    direction, variant = rule.direction(g, params, prepared, count)
    step = rho_t.astype(grad_norm.dtype) / jnp.asarray(
        num_ascent_steps, grad_norm.dtype
    )
    one = jnp.ones((), step.dtype)
    zero_loss = jnp.zeros((), jnp.float32)

    def perturbed(variant, guard=None):
      offset = jax.tree.map(lambda d: step * d, direction)
      if guard is not None:  # no switch: a non-finite g perturbs by zero
        offset = jax.tree.map(lambda o: jnp.where(guard, o, 0), offset)
      if static_steps is None or static_steps > 1:

        def ascend(_, off):
          g_k, _ = oracle(tree.add_scaled(params, off, one))
          d_k, _ = rule.direction(
              axis.perturbation_gradient(g_k), params, prepared, count
          )
          return jax.tree.map(lambda o, d: o + step * d, off, d_k)

        if static_steps is None:  # traced count (inject_hyperparams)
          offset = jax.lax.fori_loop(0, num_ascent_steps - 1, ascend, offset)
        else:  # unrolled: the passes stay at the top level of the program,
          # where XLA:CPU lowers convolution gradients to its fast kernels
          for k in range(static_steps - 1):
            offset = ascend(k, offset)
      g_adv, loss = oracle(tree.add_scaled(params, offset, one))
      out, new_variant = rule.combine(g, g_adv, params, variant)
      # One norm of the output serves the stats, the renormalization and
      # the finiteness check (with g finite, out is finite iff g_adv is).
      out_norm = tree.global_norm(out)
      if renormalize:  # the other branches keep the clean norm already
        ratio = grad_norm / jnp.maximum(out_norm, eps)
        out, out_norm = tree.scale_wide(out, ratio), out_norm * ratio
      out = tree.cast_like(out, updates)
      ok = jnp.isfinite(out_norm)
      bad = jnp.where(ok, 0 * one, one)
      # The state keeps its last finite value.
      variant = tree.select(
          ok, axis.to_varying(new_variant), axis.to_varying(variant)
      )
      if nonfinite == "propagate":
        return out, loss, variant, one, bad, out_norm
      out = tree.select(ok, out, g)
      took = jnp.where(ok, one, 0 * one)
      return (
          out,
          jnp.where(ok, loss, zero_loss),
          variant,
          took,
          bad,
          jnp.where(ok, out_norm, grad_norm),
      )

    def skipped(variant):
      out, variant = rule.fallback(g, params, variant)
      out = tree.cast_like(out, updates)
      return out, zero_loss, variant, 0 * one, 0 * one, tree.global_norm(out)

    def clean(variant):
      return g, zero_loss, variant, 0 * one, 0 * one, grad_norm

    if rule.gate is None:
      take = None
    else:
      take, variant = rule.gate(g, params, variant, count)
      if axis.active:
        take = axis.any(take)
    if static_rho == 0.0:
      out, loss, variant, took, bad, out_norm = clean(variant)
    elif static_rho is not None and take is None:
      # The pass always runs: no conditional around the user's closure.
      out, loss, variant, took, bad, out_norm = perturbed(variant, finite)
      # Non-finite g: NaN out (not g itself, which would stay alive).
      out = jax.tree.map(lambda o: jnp.where(finite, o, jnp.nan), out)
      loss, took, bad = loss * finite, took * finite, bad * finite
      out_norm = jnp.where(finite, out_norm, jnp.nan)
    else:
      positive = finite if static_rho is not None else finite & (rho_t > 0)
      index = jnp.where(
          positive, 2 if take is None else jnp.where(take, 2, 1), 0
      ).astype(jnp.int32)
      branches = tuple(
          lambda v, f=f: axis.to_varying(f(v)) for f in (clean, skipped, perturbed)
      )
      out, loss, variant, took, bad, out_norm = jax.lax.switch(
          index, branches, axis.to_varying(variant)
      )
    # Where the clean gradient is not finite it is handed on unchanged (the
    # state too), so that `optax.apply_if_finite` skips the step.
    variant = tree.select(
        finite, axis.to_varying(variant), axis.to_varying(state.variant)
    )
    out = axis.mean(out) if axis.active else out
    stats = SAMStats.of(
        grad_norm=grad_norm,
        perturbed_grad_norm=out_norm,
        perturbed_loss=loss,
        rho=rho_t,
        pass_taken=took,
    )
    nonfinite_count = state.nonfinite_count + bad.astype(jnp.int32)
    if axis.active:
      stats = axis.mean(stats)
      variant = axis.agree(variant)
      nonfinite_count = axis.agree(nonfinite_count)
    return tree.cast_like(out, updates), SAMState(
        count=optax.safe_increment(state.count),
        stats=stats,
        nonfinite_count=nonfinite_count,
        variant=variant,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _unscaler(caller: str, loss_scale: Any) -> Callable[[PyTree], PyTree]:
  """Divides gradients by ``loss_scale`` (identity when it is ``None``)."""
  if loss_scale is None:
    return lambda grads: grads
  if not isinstance(loss_scale, jax.core.Tracer):
    value = np.asarray(loss_scale)
    if value.shape != () or not np.all(np.isfinite(value)) or value <= 0:
      raise ValueError(
          f"`{caller}`: `loss_scale` must be a positive finite scalar (the"
          " factor by which the loss, and so `updates` and every gradient"
          f" of `loss_fn`/`grad_fn`, are multiplied); got {loss_scale!r}."
      )
  inverse = 1.0 / jnp.asarray(loss_scale, jnp.float32)
  return lambda grads: tree.cast_like(tree.scale_wide(grads, inverse), grads)
