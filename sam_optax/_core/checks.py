"""Checks of how a sharpness-aware transform is called.

Two mistakes run without an error unless they are looked for:

* **Structural**, found when ``update`` is traced, at no run-time cost and
  always on: the transform wrapped by ``optax.MultiSteps``
  (:func:`reject_wrappers`).
* **Numerical**, found by comparing the clean gradient handed to ``update``
  with the gradient of the closure at ``params``: a base optimizer chained
  before the transform, a closure on another batch, other dropout keys or
  another BatchNorm mode. This costs one more gradient, so it is opt-in:
  :func:`debug_checks` (or the environment variable ``SAM_OPTAX_CHECKS=1``)
  compiles the comparison into the first step of every sharpness-aware
  transform traced while it is on, and :func:`check_step` runs it once, on
  demand, and raises.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._core import closure, tree

PyTree = Any
Oracle = Callable[[PyTree], tuple[PyTree, jax.Array]]

RTOL = 1e-2  # relative difference at which two gradients disagree


class SetupWarning(UserWarning):
  """A sharpness-aware transform is called in a way that defeats it.

  Emitted by the checks of :func:`sam_optax.debug_checks`. Turn it into an
  error with ``warnings.simplefilter("error", sam_optax.SetupWarning)``, or
  call :func:`sam_optax.check_step`, which raises.
  """


@dataclasses.dataclass(frozen=True)
class GradientCheck:
  """How the clean gradient handed to a transform compares with its closure's.

  Attributes:
    caller: the transform, for example ``"sam"``.
    cosine: cosine between the gradient handed in (``updates``) and the
      gradient of the closure at ``params``.
    norm_ratio: ``‖updates‖ / ‖∇ loss_fn(params)‖``.
    relative_difference: ``‖updates - ∇ loss_fn(params)‖ / ‖∇ loss_fn(params)‖``.
    problem: ``None`` when they agree (relative difference at most the
      tolerance), else what is likely wrong and how to fix it.
  """

  caller: str
  cosine: float
  norm_ratio: float
  relative_difference: float
  problem: Optional[str]

  @property
  def ok(self) -> bool:
    return self.problem is None

  def __str__(self) -> str:
    figures = (
        f"cosine {self.cosine:.3f}, norm ratio {self.norm_ratio:.3g},"
        f" relative difference {self.relative_difference:.3g}"
    )
    if self.ok:
      return f"`{self.caller}`: the clean gradient agrees with `loss_fn` ({figures})."
    return self.problem


_SETTINGS = {
    "enabled": os.environ.get("SAM_OPTAX_CHECKS", "") not in ("", "0"),
    "every_step": False,
    "rtol": RTOL,
    "sink": None,  # None: warn; else a list that collects GradientChecks
}


class debug_checks:  # pylint: disable=invalid-name  (used like a function)
  """Turns the consistency check of every sharpness-aware transform on or off.

  While it is on, every sharpness-aware ``update`` traced (jitted or not)
  compiles a comparison into its first step (``count == 0``): the gradient
  of ``loss_fn`` (or ``grad_fn``) at ``params``, one more pass, against the
  clean gradient handed in. When they differ, a :class:`SetupWarning` names
  the likely cause: a base optimizer chained before the transform, a
  closure on another batch, other dropout keys, BatchNorm in another mode, a
  rescaled gradient. Steps traced while it is off carry no trace of it.

  It is read when ``update`` is traced: turn it on before the training step
  is first jitted (or set ``SAM_OPTAX_CHECKS=1`` in the environment). Call
  it to turn the checks on for the session, or use it as a context manager
  to turn them on for a block::

      with sam_optax.debug_checks():
        state = train_step(state, batch)       # traced and checked here

  Args:
    enabled: whether the check is compiled into steps traced from now on.
  """

  def __init__(self, enabled: bool = True):
    if not isinstance(enabled, bool):
      raise TypeError(
          f"`debug_checks`: `enabled` must be True or False; got {enabled!r}."
      )
    self._previous = _SETTINGS["enabled"]
    _SETTINGS["enabled"] = enabled

  def __enter__(self) -> "debug_checks":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    _SETTINGS["enabled"] = self._previous


def _code(function: Callable[..., Any]) -> Any:
  return getattr(function, "__code__", None)


_MULTISTEPS = _code(optax.MultiSteps.update)


def reject_wrappers(caller: str) -> None:
  """Raises ``ValueError`` when ``update`` is called by ``optax.MultiSteps``.

  Runs when ``update`` is traced; nothing is compiled.
  """
  if _MULTISTEPS is not None and any(
      f.f_code is _MULTISTEPS for f in closure.caller_frames()
  ):
    raise ValueError(
        f"`{caller}` is wrapped by `optax.MultiSteps`. MultiSteps hands it"
        " the running mean of the clean gradients with the *current*"
        " micro-batch's closure and keeps only the last result: every step"
        " would be the last micro-batch's perturbed gradient alone, while"
        " every micro-step pays for a perturbed pass. Accumulate after the"
        " sharpness-aware transform instead, calling `update` once per"
        " micro-batch with that micro-batch's gradient and closure:\n\n"
        f"    tx = optax.chain(sam_optax.{caller}(...),"
        " optax.MultiSteps(base, k).gradient_transformation())\n\n"
        "For exact large-batch SAM, pass the mean clean gradient and a"
        " `grad_fn` that averages the micro-batch gradients at the point it"
        " is given (a `jax.lax.scan` over the micro-batches)."
    )


def diagnose(
    caller: str, cosine: float, norm_ratio: float, rel: float, rtol: float = RTOL
) -> Optional[str]:
  """What is likely wrong, given how ``updates`` and the closure's gradient compare.

  Returns ``None`` when they agree (``rel <= rtol``).
  """
  if not all(map(math.isfinite, (cosine, norm_ratio, rel))):
    return (
        f"`{caller}`: the clean gradient handed to `update` or the gradient"
        " of `loss_fn` at `params` is not finite, so the two cannot be"
        " compared. Check the loss at the initial parameters (a log of 0, a"
        " division by 0, an overflow in low precision)."
    )
  if rel <= rtol:
    return None
  figures = (
      f"(cosine {cosine:.3f}, norm ratio {norm_ratio:.3g}, relative"
      f" difference {rel:.3g})"
  )
  head = (
      f"`{caller}`: the clean gradient handed to `update` differs from the"
      f" gradient of `loss_fn` at `params` {figures}. "
  )
  if cosine < -0.5:
    return head + (
        "It points against it: the transform receives the output of an"
        " optimizer (a descent step), not a gradient. Chain the"
        " sharpness-aware transform first and the base optimizer after it:\n\n"
        f"    tx = optax.chain(sam_optax.{caller}(...), optax.sgd(lr))    # not"
        f" optax.chain(optax.sgd(lr), sam_optax.{caller}(...))\n\n"
        "(or `loss_fn` returns minus the loss the gradient was taken of)."
    )
  # The part of the difference across g's direction: small against the
  # whole difference when the two differ by a scale only.
  across = norm_ratio * math.sqrt(max(0.0, 1.0 - cosine * cosine))
  if cosine > 0 and across <= 0.25 * rel:
    return head + (
        "Same direction, another scale: something between the loss and the"
        " transform rescales the gradient (a transform chained before it,"
        " such as `optax.scale` or clipping; a loss scale not passed as"
        " `loss_scale=`; a closure that sums where the clean loss averages)."
        " The perturbed gradient comes from `loss_fn` unscaled, so the"
        " direction handed on mixes the two. Rescale after the transform, or"
        " differentiate the same loss in both places."
    )
  return head + (
      "The closure does not compute the loss the clean gradient was taken"
      " of. Likely causes:\n"
      "  * another batch: build `loss_fn` on the batch of the clean pass;\n"
      "  * other dropout keys: use the same keys in both passes (Linen:"
      " the same `rngs=`; NNX: build the closure with"
      " `sam_optax.flax.nnx_closure(model, model_loss, *batch)` *before*"
      " the clean pass, which advances the model's RNG streams), or let"
      " `sam_optax.flax.linen_train_step` / `nnx_train_step` build the step;\n"
      "  * BatchNorm in another mode: both passes in training mode (batch"
      " statistics), e.g. `model(x, train=True)` in the closure too;\n"
      "  * a clean gradient changed before the transform (weight decay,"
      " a mask, clipping by value): add such terms after it."
  )


def _report(caller: str, cosine, ratio, rel) -> None:
  # Under `jax.vmap` the figures arrive batched: one check per member.
  for c, r, d in zip(*(np.ravel(np.asarray(x, np.float64)) for x in (cosine, ratio, rel))):
    check = GradientCheck(
        caller, float(c), float(r), float(d),
        diagnose(caller, float(c), float(r), float(d), _SETTINGS["rtol"]),
    )
    sink = _SETTINGS["sink"]
    if sink is not None:
      sink.append(check)
    elif check.problem is not None:
      warnings.warn(check.problem, SetupWarning, stacklevel=2)


def active() -> bool:
  """Whether :func:`compare` is compiled into steps traced now."""
  return bool(_SETTINGS["enabled"] or _SETTINGS["sink"] is not None)


def compare(
    caller: str, oracle: Oracle, local: PyTree, params: PyTree, count: jax.Array
) -> None:
  """Compiles the comparison of ``local`` with ``oracle(params)``'s gradient.

  At ``count == 0`` (at every step under :func:`check_step`) one more pass
  evaluates the closure's gradient at ``params``; the cosine, norm ratio and
  relative difference go to a host callback that warns or records.
  """

  def measure(_):
    g, _ = oracle(params)
    dot = tree.vdot(local, g)
    nu, ng = tree.global_norm(local), tree.global_norm(g)
    diff = tree.global_norm(
        jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32),
                     local, g)
    )
    tiny = jnp.finfo(jnp.float32).tiny
    cosine = dot / jnp.maximum(nu * ng, tiny)
    ratio = nu / jnp.maximum(ng, tiny)
    rel = diff / jnp.maximum(ng, tiny)
    both_zero = (nu == 0) & (ng == 0)
    cosine = jnp.where(both_zero, 1.0, cosine)
    ratio = jnp.where(both_zero, 1.0, ratio)
    jax.debug.callback(
        lambda c, r, d: _report(caller, c, r, d), cosine, ratio, rel
    )

  if _SETTINGS["every_step"]:
    measure(None)
  else:
    jax.lax.cond(count == 0, measure, lambda _: None, None)


def check_step(
    tx: optax.GradientTransformation,
    grads: PyTree,
    opt_state: PyTree,
    params: PyTree,
    *,
    rtol: float = RTOL,
    **extra_args: Any,
) -> list[GradientCheck]:
  """Runs one ``tx.update`` and checks every sharpness-aware transform in it.

  Call it with exactly what the training step hands ``tx.update``, once,
  before training::

      grads = jax.grad(loss_fn)(params)
      sam_optax.check_step(tx, grads, opt_state, params, loss_fn=loss_fn)

  Each sharpness-aware transform in ``tx`` compares the gradient it
  receives with the gradient of the closure at ``params`` (one more pass);
  the update itself is discarded. Catches a base optimizer chained before
  the transform, a closure on another batch or with other dropout keys,
  BatchNorm in another mode, and (at trace time) ``optax.MultiSteps``
  around the transform.

  Args:
    tx: the optimizer, e.g. ``optax.chain(sam_optax.sam(0.05), optax.sgd(0.1))``.
    grads: the clean gradient at ``params``, as the training step computes it.
    opt_state: the optimizer state.
    params: the parameters.
    rtol: the relative difference ``‖updates - ∇loss_fn(params)‖ /
      ‖∇loss_fn(params)‖`` above which the two disagree.
    **extra_args: what the step passes to ``tx.update``: ``loss_fn=`` or
      ``grad_fn=``, and ``loss_scale=`` and so on.

  Returns:
    One :class:`GradientCheck` per sharpness-aware transform in ``tx``, all
    agreeing.

  Raises:
    ValueError: when a transform's gradients disagree (the message names the
      likely cause and the fix), or when ``tx`` contains no sharpness-aware
      transform.
  """
  if not isinstance(rtol, (int, float)) or isinstance(rtol, bool) or not rtol > 0:
    raise ValueError(f"`check_step`: `rtol` must be a positive number; got {rtol!r}.")
  found: list[GradientCheck] = []
  saved = dict(_SETTINGS)
  _SETTINGS.update(sink=found, every_step=True, rtol=float(rtol))
  try:
    if not isinstance(tx, optax.GradientTransformationExtraArgs):
      tx = optax.with_extra_args_support(tx)
    jax.block_until_ready(tx.update(grads, opt_state, params, **extra_args))
    jax.effects_barrier()
  finally:
    _SETTINGS.clear()
    _SETTINGS.update(saved)
  if not found:
    raise ValueError(
        "`check_step`: `tx` contains no sharpness-aware transform (or none"
        " that ran), so there is nothing to check. Chain one first, e.g."
        " `optax.chain(sam_optax.sam(0.05), optax.sgd(0.1))`."
    )
  problems = [str(c) for c in found if not c.ok]
  if problems:
    raise ValueError("\n\n".join(problems))
  return found
