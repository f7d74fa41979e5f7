"""Momentum-SAM (MSAM): SAM along the momentum, at the cost of plain SGD."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import closure, radius, tree, validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.stats import SAMStats

__all__ = ("MSAMState", "msam", "msam_unperturbed")


class MSAMState(NamedTuple):
  """State of :func:`msam`.

  Attributes:
    count: number of ``update`` calls so far (int32); a ``rho`` schedule is
      evaluated at this count.
    offset: the perturbation :math:`\\tilde w - w` that the parameters
      currently carry, with the structure and dtypes of the parameters.
    inner_state: the state of the wrapped optimizer.
    stats: diagnostics of the last step, see :class:`~sam_optax.SAMStats`.
      ``grad_norm`` and ``perturbed_grad_norm`` are both the norm of the
      gradient received (taken at the perturbed weights), ``rho`` the radius
      used for the new perturbation, ``perturbed_loss`` and ``pass_taken``
      are 0: MSAM never runs an extra pass.
  """

  count: jax.Array
  offset: Any
  inner_state: optax.OptState
  stats: SAMStats


def _static_number(value: Any) -> Optional[float]:
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return float(value)
  return None


def _find_state(opt_state: Any) -> MSAMState:
  found = [
      leaf
      for leaf in jax.tree.leaves(
          opt_state, is_leaf=lambda x: isinstance(x, MSAMState)
      )
      if isinstance(leaf, MSAMState)
  ]
  if len(found) != 1:
    what = "no" if not found else f"{len(found)}"
    raise ValueError(
        f"`msam_unperturbed`: `opt_state` must contain exactly one"
        f" `MSAMState` (the state of a `sam_optax.msam` optimizer), but it"
        f" contains {what}. Pass the state returned by `tx.init` or"
        " `tx.update` of the optimizer built with `sam_optax.msam`."
    )
  return found[0]


def _is_moment_state(x: Any) -> bool:
  fields = getattr(x, "_fields", None)
  return isinstance(x, tuple) and fields is not None and (
      "mu" in fields or fields == ("trace",)
  )


def _first_moment(inner_state: Any) -> Any:
  """The one first-moment buffer in an optimizer state (``mu`` or ``trace``)."""
  found = [
      leaf
      for leaf in jax.tree.leaves(inner_state, is_leaf=_is_moment_state)
      if _is_moment_state(leaf)
  ]
  if len(found) != 1:
    raise ValueError(
        "`msam`: `direction='momentum'` perturbs along the optimizer's first"
        " moment, so its state must hold exactly one: the `mu` of an"
        " Adam-type state (adam, adamw, lion, ...) or the `trace` of SGD"
        f" momentum. It holds {len(found)}. Use `direction='update'` for"
        " other optimizers."
    )
  state = found[0]
  return state.mu if "mu" in state._fields else state.trace


def _add(a: Any, b: Any, scale: float, like: Any) -> Any:
  """``a + scale * b`` leaf-wise, computed wide, cast to the dtypes of ``like``."""

  def leaf(x, y, z):
    wide = jnp.promote_types(tree.wide_dtype(x.dtype), y.dtype)
    return (x.astype(wide) + scale * y.astype(wide)).astype(z.dtype)

  return jax.tree.map(leaf, a, b, like)


def _move(u: Any, new: Any, old: Any) -> Any:
  """``u + new - old`` computed wide: the update, then the change of offset."""
  wide = tree.wide_dtype(jnp.promote_types(u.dtype, new.dtype))
  moved = u.astype(wide) + new.astype(wide) - old.astype(wide)
  return moved.astype(u.dtype)


def msam_unperturbed(params: Any, opt_state: Any) -> Any:
  """The unperturbed weights :math:`w = \\tilde w - \\text{offset}` of an MSAM run.

  :func:`msam` keeps the parameters at the perturbed point
  :math:`\\tilde w`. Evaluate, export or average the weights returned by this
  function; keep training from ``params`` and ``opt_state`` as they are
  (checkpoint both together, and the run resumes exactly).

  Args:
    params: the parameters being trained with :func:`msam`.
    opt_state: the optimizer state; any wrapper around the MSAM state
      (``optax.inject_hyperparams``, ``optax.MultiSteps``, a chain) works.

  Returns:
    A tree like ``params`` (same dtypes) holding the unperturbed weights.

  Raises:
    ValueError: if ``opt_state`` does not hold exactly one MSAM state, or
      its offset does not match ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w: 0.5 * jnp.sum(w ** 2)
    >>> tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.5)
    >>> params = jnp.array([3.0, 4.0])
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> [round(float(x), 3) for x in sam_optax.msam_unperturbed(params, state)]
    [2.19, 2.92]
  """
  state = _find_state(opt_state)
  closure.check_same_tree(
      "msam_unperturbed", state.offset, params, "the MSAM offset", "params"
  )
  return _add(params, state.offset, -1.0, params)


def msam(
    optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 3.0,
    *,
    eps: float = 1e-12,
    direction: str = "update",
) -> optax.GradientTransformationExtraArgs:
  r"""Momentum-SAM: perturb along the momentum, for one gradient per step.

  SAM needs a second gradient to find its ascent direction; MSAM reuses the
  direction the optimizer is already moving in. With SGD momentum
  (:math:`u_t = -\eta v_{t+1}`) the method of the paper is

  .. math::

    \tilde w_t = w_t - \rho \frac{v_t}{\|v_t\|}, \qquad
    v_{t+1} = \mu v_t + \nabla L(\tilde w_t), \qquad
    w_{t+1} = w_t - \eta v_{t+1},

  with :math:`v_0 = 0` (no perturbation at the first step).

  **Perturbed-parameters convention.** To need a single forward/backward
  pass, the parameters the caller holds *are* the perturbed weights
  :math:`\tilde w_t`, as in the authors' code: compute the gradient at
  ``params`` as usual and call ``update`` without a loss closure. ``update``
  recovers :math:`w_t = \tilde w_t - \text{offset}_t`, runs ``optimizer`` at
  :math:`w_t` to get its update :math:`u_t`, and returns

  .. math::

    u_t + \text{offset}_{t+1} - \text{offset}_t, \qquad
    \text{offset}_{t+1} = \rho_t \frac{u_t}{\|u_t\|_2 + \mathrm{eps}},

  so that ``optax.apply_updates`` lands on
  :math:`\tilde w_{t+1} = w_{t+1} + \text{offset}_{t+1}`. For SGD momentum
  with a positive learning rate, :math:`u_t / \|u_t\| = -v_{t+1} /
  \|v_{t+1}\|`: the perturbation uses the momentum *after* the step, as in
  the official code. For other optimizers the perturbation follows their
  update direction (for Adam, the preconditioned one). With
  ``direction="momentum"`` the perturbation follows the optimizer's first
  moment instead, :math:`\text{offset}_{t+1} = -\rho_t m_{t+1} / \|m_{t+1}\|`
  (``mu`` of Adam-type states, ``trace`` of SGD momentum, not
  bias-corrected), as in the authors' AdamW variant. The norm is global over
  all leaves, in at least float32.

  Where the update is exactly zero (a learning rate of 0 during a warm-up,
  the accumulating micro-steps of an ``optax.MultiSteps`` inside MSAM) it
  has no direction, and the perturbation keeps its own, rescaled to
  :math:`\rho_t` (at a learning rate of 0 the official SGD code would
  follow the momentum, which still moves; the two differ only on such
  steps).

  Use :func:`msam_unperturbed` to get :math:`w_t` for evaluation and export.
  Nothing may transform MSAM's output, since it holds the move back from
  :math:`\tilde w_t`: wrap the whole optimizer, e.g.
  ``msam(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(...)))``.
  Wrappers that hand the update on unchanged or skip it whole
  (``optax.MultiSteps``, ``optax.apply_if_finite``,
  ``optax.inject_hyperparams``) may go around it; for gradient
  accumulation both ``optax.MultiSteps(msam(base), k)`` and
  ``msam(optax.MultiSteps(base, k))`` keep the perturbation fixed over the
  ``k`` micro-batches. Weight decay in ``optimizer`` (e.g.
  ``optax.add_decayed_weights``) acts on the unperturbed :math:`w_t`; the
  official SGD code decays the perturbed weights instead, a difference of
  order ``weight_decay * rho`` per step.

  The offset is stored, so a changing (scheduled) ``rho`` moves back by
  exactly the amount it moved up. ``rho == 0`` as a Python number gives the
  wrapped optimizer bit for bit; a scheduled or traced zero gives it up to
  the rounding of the extra (zero) terms, a few ulps. Cost: one
  parameter-sized buffer, no extra forward or backward pass.

  Choosing rho: about 15 times SAM's. The authors' example commands (Becker
  et al., 2024) use ρ = 3 for SGD and AdamW on CIFAR-100 and ImageNet, where
  they use 0.2 for SAM.

  Args:
    optimizer: the base optimizer, typically ``optax.sgd(lr, momentum=0.9)``
      (also with weight decay, e.g. through ``optax.add_decayed_weights``),
      or an ``optax.MultiSteps`` around one.
    rho: perturbation radius, or a schedule of the step count; about 15
      times SAM's, see "Choosing rho" above.
    eps: added to the norm of the direction.
    direction: ``"update"`` (default) perturbs along the optimizer's update,
      ``"momentum"`` along its first moment (the authors' AdamW_MSAM); the
      two agree for SGD momentum with a positive learning rate.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with an :class:`MSAMState`.
    ``update(grads, state, params, **extra_args)`` forwards extra arguments
    to ``optimizer``; ``loss_fn`` and ``grad_fn`` are accepted and never
    called.

  Raises:
    TypeError: if ``optimizer`` is not an ``optax.GradientTransformation``.
    ValueError: if ``rho`` is negative, ``eps`` not positive, ``direction``
      unknown, or ``direction="momentum"`` and the optimizer's state does
      not hold exactly one first moment (raised by ``init``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(w):
    ...   return 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * w ** 2)
    >>> tx = sam_optax.msam(optax.sgd(0.05, momentum=0.9), rho=0.1)
    >>> params = jnp.array([1.0, 1.0])
    >>> state = tx.init(params)
    >>> for _ in range(100):
    ...   grads = jax.grad(loss_fn)(params)  # at the perturbed weights
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> w = sam_optax.msam_unperturbed(params, state)  # for evaluation
    >>> bool(loss_fn(w) < 2e-3)
    True
    >>> round(float(sam_optax.sam_stats(state).rho), 2)
    0.1

  References:
    Becker, Altrock, Risse, *Momentum-SAM: Sharpness Aware Minimization
    without Computational Overhead*, 2024. https://arxiv.org/abs/2401.12033
  """
  if isinstance(optimizer, optax.MultiSteps):
    optimizer = optimizer.gradient_transformation()
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
        "`msam`: `optimizer` must be an optax.GradientTransformation, for"
        " example `optax.sgd(0.1, momentum=0.9)`; got"
        f" {type(optimizer).__name__}."
    )
  if radius.is_controlled(rho):
    raise ValueError(
        f"`msam`: `rho` must be a number or a schedule; got rho={rho!r}."
        " MSAM perturbs along the optimizer's own update and never compares"
        " a clean with a perturbed gradient, which `rho=\"auto\"` and"
        " `guarded` measure. Use a sharpness-aware transform in front of"
        " the optimizer instead, e.g. `optax.chain(sam_optax.sam(rho=\"auto\"),"
        " base)`."
    )
  validation.check_scalar("msam", "rho", rho, low=0.0, allow_schedule=True)
  validation.check_scalar("msam", "eps", eps, low=0.0, low_inclusive=False)
  validation.check_option("msam", "direction", direction, ("update", "momentum"))
  inner = optax.with_extra_args_support(optimizer)
  static_rho = _static_number(rho)

  def init_fn(params: Any) -> MSAMState:
    closure.check_floating("msam", params, "`params`")
    inner_state = inner.init(params)
    if direction == "momentum":
      _first_moment(inner_state)  # raises unless there is exactly one
    return MSAMState(
        count=jnp.zeros((), jnp.int32),
        offset=optax.tree.zeros_like(params),
        inner_state=inner_state,
        stats=SAMStats.zeros(),
    )

  def update_fn(
      updates: Any,
      state: MSAMState,
      params: Optional[Any] = None,
      **extra_args: Any,
  ) -> tuple[Any, MSAMState]:
    extra_args.pop("loss_fn", None)
    extra_args.pop("grad_fn", None)
    if params is None:
      unperturbed = None
    else:
      closure.check_same_tree(
          "msam", params, state.offset, "params", "the state's offset"
      )
      unperturbed = _add(params, state.offset, -1.0, params)
    step, inner_state = inner.update(
        updates, state.inner_state, unperturbed, **extra_args
    )
    count = state.count
    rho_t = jnp.asarray(rho(count) if callable(rho) else rho)
    if static_rho == 0.0:
      out, offset = step, state.offset
    else:
      if direction == "momentum":  # offset = -rho m / |m|
        source, sign = _first_moment(inner_state), -1.0
        source_norm = tree.global_norm(source)
      else:
        # Where the update is exactly zero (a learning rate of 0, the
        # accumulating micro-steps of an inner `optax.MultiSteps`) it has no
        # direction: the perturbation keeps its own, rescaled to rho_t.
        norm = tree.global_norm(step)
        moving = norm > 0
        source, sign = tree.select(moving, step, state.offset), 1.0
        source_norm = jnp.where(moving, norm, tree.global_norm(state.offset))
      scale = sign * rho_t.astype(source_norm.dtype) / (source_norm + eps)
      offset = tree.cast_like(tree.scale_wide(source, scale), state.offset)
      out = jax.tree.map(_move, step, offset, state.offset)
    grad_norm = tree.global_norm(updates)
    stats = SAMStats.of(
        grad_norm=grad_norm,
        perturbed_grad_norm=grad_norm,
        perturbed_loss=0.0,
        rho=rho_t,
        pass_taken=0.0,
    )
    return out, MSAMState(
        count=optax.safe_increment(count),
        offset=offset,
        inner_state=inner_state,
        stats=stats,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
