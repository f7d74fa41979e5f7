"""The stages of one sharpness-aware ``update``, in the order they run.

:func:`sam_optax._core.builder.build` calls them; each receives the
transform's static :class:`Config` and what the earlier stages produced:

1. :func:`gradient_closure`: check the closure and the gradient tree, undo
   a loss scale; gives the gradient oracle ``point -> (grads, loss)``.
2. :func:`clean_gradient`: the gradient the perturbation is built from
   (local, group or axis mean), its norm, and whether it is finite.
3. :func:`radius`: ``rho`` at this step (a number, an array or a schedule).
4. :func:`ascent_direction`: the rule's ``prepare`` and ``direction``.
5. :func:`gate`: whether the pass runs: always (no conditional), never
   (``rho`` is the Python number 0), by the caller's static ``sam_pass``,
   or by the rule's policy (:func:`switch` between two branches).
6. :func:`perturbed_step`: the ascent (:func:`ascent_offset`), the
   perturbed pass, the rule's further points if any
   (:func:`further_points`), the rule's ``combine``, the optional renormalization and
   the non-finite guard (:func:`guard`); or :func:`skipped_step`, the
   rule's fallback; or :func:`no_pass`.
7. :func:`finish`: a non-finite clean gradient handed on as NaN, the
   average over the data-parallel axis, the statistics and the new state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._core import closure as closure_lib
from sam_optax._core import collectives, tree
from sam_optax._core import radius as radius_lib
from sam_optax._core.stats import SAMStats

if TYPE_CHECKING:
  from sam_optax._core.builder import Rule, SAMState

PyTree = Any
Oracle = Callable[[PyTree], tuple[PyTree, jax.Array]]


class Config(NamedTuple):
  """What a transform fixes at construction (static under ``jit``)."""

  caller: str
  rule: "Rule"
  rho: Any  # a number, an array or a schedule; None for rho="auto"
  static_rho: Optional[float]  # rho as a Python number, else None
  num_ascent_steps: Any  # a Python int, or traced (inject_hyperparams)
  static_steps: Optional[int]
  eps: Any
  renormalize: bool
  nonfinite: str
  axis: collectives.Axis
  controller: Optional[radius_lib.Controller] = None


class Clean(NamedTuple):
  """The clean gradient the perturbation is built from.

  ``g`` is local, the mean over a group, or the mean over the axis
  (per-device, ``group_size`` or ``sync_perturbation``); ``finite`` is
  agreed over the axis, so every member takes the same path. ``local`` is
  this member's own clean gradient (``g`` itself without an axis), which a
  radius controller compares with the perturbed one.
  """

  g: PyTree
  norm: jax.Array
  finite: jax.Array
  local: PyTree = None


class Outcome(NamedTuple):
  """What the pass (or its absence) produced at this step."""

  out: PyTree  # the direction handed on, before the axis average
  loss: jax.Array  # the perturbed loss, 0 where no pass ran
  variant: PyTree
  took: jax.Array  # 1.0 where the pass ran and gave a finite gradient
  bad: jax.Array  # 1.0 where the perturbed gradient was not finite
  out_norm: jax.Array
  change: jax.Array  # ‖g_p - g‖ / ‖g‖ for a radius controller, else 0


def gradient_closure(
    cfg: Config,
    updates: PyTree,
    params: Optional[PyTree],
    loss_fn: Optional[Callable[..., Any]],
    grad_fn: Optional[Callable[[PyTree], PyTree]],
    loss_scale: Optional[Any],
) -> tuple[Oracle, PyTree]:
  """Checks the call and returns the gradient oracle and the local gradient.

  The oracle maps a point to ``(local gradient, loss)`` at that point, with
  the loss scale undone and the point marked varying over the axis (so its
  gradient stays local under ``shard_map``). The local gradient is
  ``updates`` with the loss scale undone.
  """
  raw_oracle = closure_lib.gradient_oracle(cfg.caller, params, loss_fn, grad_fn)
  closure_lib.check_same_tree(
      cfg.caller, updates, params, "`updates` (the clean gradient)", "params"
  )
  if cfg.axis.active:
    cfg.axis.check_local(cfg.caller, updates)
  unscale = unscaler(cfg.caller, loss_scale)
  divisor = 1.0 if loss_scale is None else loss_scale

  def oracle(point: PyTree) -> tuple[PyTree, jax.Array]:
    grads, loss = raw_oracle(cfg.axis.to_varying(point))
    return unscale(grads), loss / divisor

  return oracle, unscale(updates)


def clean_gradient(cfg: Config, local: PyTree) -> Clean:
  """The perturbation's gradient (see :class:`Clean`) from the local one."""
  g = cfg.axis.perturbation_gradient(local)
  norm = tree.global_norm(g)
  finite = jnp.isfinite(norm)
  if cfg.axis.active:
    finite = jnp.logical_not(cfg.axis.any(jnp.logical_not(finite)))
  return Clean(g, norm, finite, local)


def unread_clean(local: PyTree) -> Clean:
  """The stand-in for a rule that does not read the clean gradient: zeros,
  finite, of norm 0, none of it computed from ``local``."""
  zeros = jax.tree.map(jnp.zeros_like, local)
  norm = tree.global_norm(zeros)  # a constant, in the dtype the stages expect
  return Clean(zeros, norm, jnp.isfinite(norm), zeros)


def radius(cfg: Config, count: jax.Array, state: Any) -> jax.Array:
  """``rho`` in force at step ``count``.

  A traced or scheduled value is clipped at 0; a controller
  (``rho="auto"``, :func:`~sam_optax.guarded`) sets or scales it from its
  ``state``.
  """
  base = None
  if cfg.rho is not None:
    base = jnp.asarray(cfg.rho(count) if callable(cfg.rho) else cfg.rho)
    if cfg.static_rho is None:  # a Python number was checked at construction
      base = jnp.maximum(base, 0)
  return radius_lib.in_force(cfg.controller, state, base)


def ascent_direction(
    cfg: Config, clean: Clean, params: PyTree, variant: PyTree, count: jax.Array
) -> tuple[PyTree, PyTree, PyTree]:
  """The rule's ``prepare`` and ``direction`` on the clean gradient.

  Returns the unit-radius direction ``d`` (``ε = rho * d``), the state that
  ``prepare`` left (seen by every later ascent step) and the variant state
  after ``direction``.
  """
  prepared = variant
  if cfg.rule.prepare is not None:
    prepared = cfg.rule.prepare(clean.g, params, prepared, count)
  direction, variant = cfg.rule.direction(clean.g, params, prepared, count)
  return direction, prepared, variant


def gate(
    cfg: Config,
    clean: Clean,
    params: PyTree,
    variant: PyTree,
    count: jax.Array,
    sam_pass: Any,
) -> tuple[Union[None, bool, jax.Array], PyTree]:
  """Whether the pass runs: ``None`` (always), a Python bool, or a traced one.

  A static ``sam_pass`` from the caller overrides the rule's policy, whose
  state is still advanced.
  """
  if sam_pass is not None:
    sam_pass = check_sam_pass(cfg.caller, sam_pass)
  if cfg.rule.gate is None:
    return sam_pass, variant
  take, variant = cfg.rule.gate(clean.g, params, variant, count)
  if sam_pass is not None:
    return sam_pass, variant
  if cfg.axis.active:  # one decision for every member
    take = cfg.axis.any(take)
  return take, variant


def perturbed_step(
    cfg: Config,
    oracle: Oracle,
    clean: Clean,
    params: PyTree,
    direction: PyTree,
    prepared: PyTree,
    variant: PyTree,
    rho_t: jax.Array,
    count: jax.Array,
    companion_oracle: Optional[Oracle] = None,
) -> Outcome:
  """The step with the perturbed pass: ascend, evaluate, combine, guard.

  ``oracle`` evaluates the pass (see :func:`pass_oracle`);
  ``companion_oracle`` the rule's companion point, if it has one.
  """
  offset = ascent_offset(
      cfg, oracle, clean, params, direction, prepared, rho_t, count
  )
  point = tree.add_scaled(params, offset, jnp.ones((), rho_t.dtype))
  g_c = None
  if cfg.rule.companion is None:
    g_adv, loss = oracle(point)
  else:  # a second gradient, independent of the pass (SAMPa's y)
    g_adv, loss, g_c = companion_pass(
        cfg, oracle, companion_oracle, point, params, variant, count
    )
  change = jnp.zeros((), jnp.float32)
  if cfg.controller is not None:
    change = gradient_change(cfg, clean, g_adv)
  if cfg.rule.points:  # the rule's further points; combine gets every gradient
    g_adv = further_points(cfg, oracle, clean, params, direction, g_adv, variant, rho_t)
  if g_c is not None:
    g_adv = (g_adv, g_c)
  if cfg.rule.combine is None:
    out, new_variant = g_adv, variant
  else:
    out, new_variant = cfg.rule.combine(clean.g, g_adv, params, variant)
  # One norm of the output serves the stats, the renormalization and the
  # finiteness check (with g finite, out is finite iff g_adv is).
  out_norm = tree.global_norm(out)
  if cfg.renormalize:  # back to the clean gradient's norm (StableSAM)
    ratio = clean.norm / jnp.maximum(out_norm, cfg.eps)
    out, out_norm = tree.scale_wide(out, ratio), out_norm * ratio
  return guard(cfg, clean, out, out_norm, loss, new_variant, variant)._replace(
      change=change
  )


def gradient_change(cfg: Config, clean: Clean, g_adv: PyTree) -> jax.Array:
  """``‖g_p - g‖ / ‖g‖`` of this member's local gradients, in float32."""
  local = clean.local
  local_norm = clean.norm if local is clean.g else tree.global_norm(local)
  diff = jax.tree.map(
      lambda a, b: a.astype(tree.wide_dtype(a.dtype))
      - b.astype(tree.wide_dtype(b.dtype)),
      g_adv,
      local,
  )
  change = tree.global_norm(diff) / jnp.maximum(local_norm, cfg.eps)
  return change.astype(jnp.float32)


def pass_oracle(
    cfg: Config,
    oracle: Oracle,
    updates: PyTree,
    params: Optional[PyTree],
    loss_scale: Optional[Any],
    extra_args: dict[str, Any],
) -> Oracle:
  """The perturbed pass's oracle: ``oracle`` unless the rule names a
  ``pass_closure`` and the caller gave a closure under one of its names."""
  if cfg.rule.pass_closure is None:
    return oracle
  loss_name, grad_name = cfg.rule.pass_closure
  loss_fn, grad_fn = extra_args.get(loss_name), extra_args.get(grad_name)
  if loss_fn is None and grad_fn is None:
    return oracle
  if loss_fn is not None and grad_fn is not None:
    raise ValueError(
        f"`{cfg.caller}`: pass either `{loss_name}` or `{grad_name}` to"
        " `update`, not both."
    )
  for name, fn in ((loss_name, loss_fn), (grad_name, grad_fn)):
    if fn is not None and not callable(fn):
      raise TypeError(
          f"`{cfg.caller}`: `{name}` must be callable, got {type(fn).__name__}."
      )
  other, _ = gradient_closure(cfg, updates, params, loss_fn, grad_fn, loss_scale)
  return other


def companion_pass(
    cfg: Config,
    oracle: Oracle,
    companion_oracle: Oracle,
    point: PyTree,
    params: PyTree,
    variant: PyTree,
    count: jax.Array,
) -> tuple[PyTree, jax.Array, PyTree]:
  """The gradient at the perturbed ``point`` (by ``oracle``), its loss, and
  the gradient at the rule's companion point (by ``companion_oracle``).

  The companion point does not depend on the pass, so with
  ``Rule.parallel`` both gradients come from one ``jax.vmap`` over the two
  points, which needs one closure for both.
  """
  other = tree.cast_like(cfg.rule.companion(params, variant, count), params)
  if not cfg.rule.parallel:
    g_adv, loss = oracle(point)
    g_c, _ = companion_oracle(other)
    return g_adv, loss, g_c
  if oracle is not companion_oracle:
    raise ValueError(
        f"`{cfg.caller}`: the parallel form evaluates both gradients in one"
        " `jax.vmap` over the two points, with one closure; it cannot take"
        " the perturbed pass on another closure. Drop that closure, or build"
        " the transform with `parallel=False`."
    )
  both = jax.tree.map(lambda a, b: jnp.stack([a, b]), point, other)
  grads, losses = jax.vmap(oracle)(both)
  g_adv = jax.tree.map(lambda x: x[0], grads)
  g_c = jax.tree.map(lambda x: x[1], grads)
  return g_adv, losses[0], g_c


def further_points(
    cfg: Config,
    oracle: Oracle,
    clean: Clean,
    params: PyTree,
    direction: PyTree,
    g_adv: PyTree,
    variant: PyTree,
    rho_t: jax.Array,
) -> tuple[PyTree, ...]:
  """The gradients at the perturbed point and at each of ``Rule.points``.

  Each point's unit-radius offset comes from the gradients before it (the
  perturbation's mean over a group or the axis, as for the ascent steps);
  the tuple returned holds the local gradients. An offset that is not
  finite (an earlier gradient was not) is replaced by zero, so the closure
  never sees a non-finite point; the guard then handles the output.
  """
  def finite_or_zero(d, ok):
    return jax.tree.map(lambda x: jnp.where(ok, x, jnp.zeros_like(x)), d)

  local, seen = (g_adv,), ()
  offsets = (finite_or_zero(direction, clean.finite),)
  step = rho_t.astype(clean.norm.dtype)
  one = jnp.ones((), step.dtype)
  for point in cfg.rule.points:
    seen += (cfg.axis.perturbation_gradient(local[-1]),)
    d = point(clean.g, seen, offsets, params, variant)
    d = finite_or_zero(d, jnp.isfinite(tree.global_norm(d)))
    g_k, _ = oracle(
        tree.add_scaled(params, jax.tree.map(lambda x: step * x, d), one)
    )
    local += (g_k,)
    offsets += (d,)
  return local


def ascent_offset(
    cfg: Config,
    oracle: Oracle,
    clean: Clean,
    params: PyTree,
    direction: PyTree,
    prepared: PyTree,
    rho_t: jax.Array,
    count: jax.Array,
) -> PyTree:
  """``ε``: ``num_ascent_steps`` steps of size ``rho / num_ascent_steps``.

  Each further step re-evaluates the direction at the point reached. A
  non-finite clean gradient perturbs by zero, so the closure never sees a
  non-finite point.
  """
  step = rho_t.astype(clean.norm.dtype) / jnp.asarray(
      cfg.num_ascent_steps, clean.norm.dtype
  )
  one = jnp.ones((), step.dtype)
  offset = jax.tree.map(
      lambda d: jnp.where(clean.finite, step * d, 0), direction
  )
  if cfg.static_steps == 1:
    return offset

  def ascend(_, off):
    g_k, _ = oracle(tree.add_scaled(params, off, one))
    d_k, _ = cfg.rule.direction(
        cfg.axis.perturbation_gradient(g_k), params, prepared, count
    )
    return jax.tree.map(lambda o, d: o + step * d, off, d_k)

  if cfg.static_steps is None:  # traced count (inject_hyperparams)
    return jax.lax.fori_loop(0, cfg.num_ascent_steps - 1, ascend, offset)
  # Unrolled: the passes stay at the top level of the program, where XLA:CPU
  # lowers convolution gradients to its fast kernels.
  for k in range(cfg.static_steps - 1):
    offset = ascend(k, offset)
  return offset


def guard(
    cfg: Config,
    clean: Clean,
    out: PyTree,
    out_norm: jax.Array,
    loss: jax.Array,
    new_variant: PyTree,
    variant: PyTree,
) -> Outcome:
  """The ``nonfinite`` policy on the perturbed step's output.

  Where the output is not finite, the variant state keeps its last finite
  value and the step is counted; the output becomes a zero gradient
  (``"skip"``), the clean gradient (``"fallback"``, which keeps ``g`` alive
  through the pass) or stays as it is (``"propagate"``). Selects only: no
  conditional, and ``"skip"`` and ``"propagate"`` hold nothing extra.
  """
  ok = jnp.isfinite(out_norm)
  one = jnp.ones((), jnp.float32)
  bad = jnp.where(ok, 0 * one, one)
  variant = tree.select(
      ok, cfg.axis.to_varying(new_variant), cfg.axis.to_varying(variant)
  )
  zero = jnp.zeros((), jnp.float32)
  if cfg.nonfinite == "propagate":
    return Outcome(out, loss, variant, one, bad, out_norm, zero)
  if cfg.nonfinite == "fallback":
    out = tree.select(ok, out, clean.g)
    out_norm = jnp.where(ok, out_norm, clean.norm)
  else:
    out = jax.tree.map(lambda o: jnp.where(ok, o, jnp.zeros_like(o)), out)
    out_norm = jnp.where(ok, out_norm, jnp.zeros_like(out_norm))
  loss = jnp.where(ok, loss, jnp.zeros_like(loss))
  return Outcome(out, loss, variant, 1 - bad, bad, out_norm, zero)


def skipped_step(
    cfg: Config, clean: Clean, params: PyTree, variant: PyTree
) -> Outcome:
  """A step without the pass, on the rule's fallback (LookSAM's reuse)."""
  out, variant = cfg.rule.fallback(clean.g, params, variant)
  zero = jnp.zeros((), jnp.float32)
  return Outcome(out, zero, variant, zero, zero, tree.global_norm(out), zero)


def switch(
    cfg: Config,
    take: jax.Array,
    skipped: Callable[[PyTree], Outcome],
    perturbed: Callable[[PyTree], Outcome],
    variant: PyTree,
    updates: PyTree,
) -> Outcome:
  """Runs one of the two steps, by the policy's traced ``take``.

  Both branches hand on the dtypes of ``updates`` and values typed alike
  over the axis, as ``jax.lax.switch`` needs.
  """

  def branch(step):
    def run(v):
      outcome = step(v)
      out = tree.cast_like(outcome.out, updates)
      return cfg.axis.to_varying(outcome._replace(out=out))

    return run

  return jax.lax.switch(
      take.astype(jnp.int32),
      (branch(skipped), branch(perturbed)),
      cfg.axis.to_varying(variant),
  )


def no_pass(clean: Clean, variant: PyTree) -> Outcome:
  """``rho`` is the Python number 0: the clean gradient, no pass compiled."""
  zero = jnp.zeros((), jnp.float32)
  return Outcome(clean.g, zero, variant, zero, zero, clean.norm, zero)


def finish(
    cfg: Config,
    outcome: Outcome,
    clean: Clean,
    state: "SAMState",  # the state before this step
    rho_t: jax.Array,
    updates: PyTree,
) -> tuple[PyTree, SAMStats, jax.Array, PyTree, PyTree]:
  """The output, the statistics, the non-finite count and the new states.

  Where the clean gradient is not finite, the output is NaN (the states are
  kept and nothing is counted), so that ``optax.apply_if_finite`` around the
  chain skips the step; the output is then averaged over the axis, the
  radius controller (if any) adapted and the statistics recorded.
  """
  out, loss, variant, took, bad, out_norm, change = outcome
  if cfg.static_rho != 0.0 or cfg.rule.companion is not None:
    # with rho = 0 (no companion) the clean gradient is handed on
    out = jax.tree.map(lambda o: jnp.where(clean.finite, o, jnp.nan), out)
    out_norm = jnp.where(clean.finite, out_norm, jnp.nan)
  zero = jnp.zeros((), jnp.float32)
  sam_step = clean.finite & (rho_t > 0)  # a zero rho is no SAM step
  loss, took = jnp.where(sam_step, loss, zero), jnp.where(sam_step, took, zero)
  bad = jnp.where(clean.finite, bad, zero)
  change = jnp.where(took > 0, change, zero)
  variant = tree.select(
      clean.finite,
      cfg.axis.to_varying(variant),
      cfg.axis.to_varying(state.variant),
  )
  if cfg.axis.active:
    out = cfg.axis.mean(out)
  radius_state, backoffs = state.radius, zero
  if cfg.controller is not None:
    measured, any_bad = took > 0, bad > 0
    if cfg.axis.active:  # one radius for every member
      change = cfg.axis.mean(change)
      measured = cfg.axis.any(measured)
      any_bad = cfg.axis.any(any_bad)
    radius_state = radius_lib.adapt(
        cfg.controller, state.radius, change, measured, any_bad, clean.finite
    )
    backoffs = radius_state.backoffs
  stats = SAMStats.of(
      grad_norm=clean.norm,
      perturbed_grad_norm=out_norm,
      perturbed_loss=loss,
      rho=rho_t,
      pass_taken=took,
      grad_change=change,
      backoffs=backoffs,
  )
  nonfinite_count = state.nonfinite_count + bad.astype(jnp.int32)
  if cfg.axis.active:
    stats = cfg.axis.mean(stats)
    variant = cfg.axis.agree(variant)
    nonfinite_count = cfg.axis.agree(nonfinite_count)
    radius_state = cfg.axis.agree(radius_state)
  return (
      tree.cast_like(out, updates), stats, nonfinite_count, variant,
      radius_state,
  )


# ------------------------------------------------------------------- helpers


def check_sam_pass(caller: str, sam_pass: Any) -> bool:
  """``sam_pass`` as a Python bool, or a clear error."""
  if isinstance(sam_pass, (bool, np.bool_)):
    return bool(sam_pass)
  raise ValueError(
      f"`{caller}`: `sam_pass` must be None (the transform decides) or a"
      " Python bool fixed when the step is traced, so that each choice"
      f" compiles to its own program; got {type(sam_pass).__name__}. Under"
      " `jax.jit`, mark it static, for example"
      " `jax.jit(train_step, static_argnames='sam_pass')`, and pass"
      " `sam_pass=(step % k == 0)` from the Python loop."
  )


def unscaler(caller: str, loss_scale: Any) -> Callable[[PyTree], PyTree]:
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
