"""The closure protocol: how a transform evaluates gradients at other points.

Every sharpness-aware transform in this package receives the clean gradient as
its ``updates`` argument and, as a keyword-only extra argument, one of

* ``loss_fn``: ``params -> loss`` or ``params -> (loss, aux)``. The loss must
  be a real scalar; ``aux`` (for example updated BatchNorm statistics) is
  discarded.
* ``grad_fn``: ``params -> grads``, for callers that build gradients
  themselves (loss scaling, accumulation, code written for
  ``optax.contrib.sam``).

:func:`gradient_oracle` turns whichever was given into a single function
``params -> (grads, loss)`` and produces the error messages for misuse.
:func:`check_same_tree` checks every gradient against the parameters: the
same structure and shapes, and floating-point leaves only (integer and
boolean parameters, and their ``float0`` gradients, are rejected with the
fix in the message).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

PyTree = Any
Oracle = Callable[[PyTree], tuple[PyTree, jax.Array]]

_CALL = """\
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)

where `loss_fn(params)` returns the scalar loss on the current batch (or a
`(loss, aux)` pair). Callers that compute gradients themselves can pass
`grad_fn=` (a function `params -> grads`) instead."""


def gradient_oracle(
    caller: str,
    params: Optional[PyTree],
    loss_fn: Optional[Callable[..., Any]],
    grad_fn: Optional[Callable[[PyTree], PyTree]],
) -> Oracle:
  """Validates the closure arguments of ``caller``'s ``update`` and wraps them.

  Returns a function ``params -> (grads, loss)``; ``loss`` is the float32
  scalar loss, or 0 when only ``grad_fn`` was given.
  """
  if loss_fn is None and grad_fn is None:
    raise TypeError(
        f"`{caller}` needs a loss closure to evaluate the gradient at the"
        " perturbed parameters, but `update` was called without `loss_fn` or"
        " `grad_fn`." + (_caller_hint() or " Pass it as a keyword argument:\n\n" + _CALL)
    )
  if loss_fn is not None and grad_fn is not None:
    raise ValueError(
        f"`{caller}`: pass either `loss_fn` or `grad_fn` to `update`, not"
        " both."
    )
  if params is None:
    raise ValueError(
        f"`{caller}` needs the current parameters: call"
        " `tx.update(grads, opt_state, params, loss_fn=loss_fn)` with"
        " `params`, not `params=None`."
    )
  if loss_fn is not None:
    if not callable(loss_fn):
      raise TypeError(
          f"`{caller}`: `loss_fn` must be callable (params -> loss), got"
          f" {type(loss_fn).__name__}."
      )
    scalar = scalar_loss_fn(caller, loss_fn)
    value_and_grad = jax.value_and_grad(scalar)

    def from_loss(p: PyTree) -> tuple[PyTree, jax.Array]:
      loss, grads = value_and_grad(p)
      check_same_tree(caller, grads, p, "the gradient of `loss_fn`", "params")
      return grads, loss.astype(jnp.float32)

    return from_loss

  if not callable(grad_fn):
    raise TypeError(
        f"`{caller}`: `grad_fn` must be callable (params -> grads), got"
        f" {type(grad_fn).__name__}."
    )

  def from_grad(p: PyTree) -> tuple[PyTree, jax.Array]:
    grads = grad_fn(p)
    check_same_tree(caller, grads, p, "the output of `grad_fn`", "params")
    return grads, jnp.zeros((), jnp.float32)

  return from_grad


_FLAX_TRAIN_STATE = """ It was called by Flax's\
 `flax.training.train_state.TrainState.apply_gradients`, which calls\
 `tx.update` without the closure and treats `loss_fn=` as a field to replace.\
 Use `sam_optax.flax.TrainState`, a drop-in subclass that forwards it:

    state = sam_optax.flax.TrainState.create(apply_fn=model.apply,\
 params=params, tx=tx)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads=grads, loss_fn=loss_fn)

or let `sam_optax.flax.linen_train_step(model_loss)` build the whole step."""

_NNX_OPTIMIZER = """ It was called by `nnx.Optimizer.update`, which\
 forwards keyword arguments to `tx.update`: pass the closure there, built\
 before the clean pass so that both passes draw the same dropout masks:

    closure = sam_optax.flax.nnx_closure(model, model_loss, x, y)
    loss, grads = nnx.value_and_grad(model_loss)(model, x, y)
    optimizer.update(model, grads, loss_fn=closure)

or let `sam_optax.flax.nnx_train_step(model_loss)` build the whole step."""


def caller_frames(depth: int = 200):
  """The frames of the callers of the function that calls this, innermost first.

  Read at trace time only, to name a known wrapper or Flax method in an
  error; nothing is compiled.
  """
  frame = sys._getframe(2)  # pylint: disable=protected-access
  while frame is not None and depth > 0:
    yield frame
    frame, depth = frame.f_back, depth - 1


def _caller_hint() -> Optional[str]:
  """The fix for a missing closure when a known Flax method called ``update``."""
  for frame in caller_frames():
    code = frame.f_code
    if code.co_name == "apply_gradients":
      owner = frame.f_locals.get("self")
      if type(owner).__module__ == "flax.training.train_state":
        return _FLAX_TRAIN_STATE
    if code.co_name == "update" and "flax" in code.co_filename:
      owner = frame.f_locals.get("self")
      if type(owner).__name__ == "Optimizer":
        return _NNX_OPTIMIZER
  return None


def scalar_loss(caller: str, out: Any) -> jax.Array:
  """The loss in ``out``, a real scalar or a ``(loss, aux)`` pair; checked.

  Raises ``TypeError`` naming ``caller`` for a sequence of another length, a
  non-scalar or a non-floating loss.
  """
  if isinstance(out, (tuple, list)):
    if len(out) != 2:
      raise TypeError(
          f"`{caller}`: `loss_fn` returned a sequence of length {len(out)};"
          " it must return a scalar loss or a `(loss, aux)` pair."
      )
    out = out[0]
  if not hasattr(out, "shape") or not hasattr(out, "dtype"):
    try:
      out = jnp.asarray(out)
    except TypeError as err:
      raise TypeError(
          f"`{caller}`: `loss_fn` must return a scalar loss or a"
          f" `(loss, aux)` pair, but it returned a {type(out).__name__}."
          " Return the loss first and anything else as `aux`, e.g."
          " `return loss, {'accuracy': acc}`."
      ) from err
  if out.shape != ():
    raise TypeError(
        f"`{caller}`: `loss_fn` must return a scalar loss, but it returned"
        f" an array of shape {out.shape}. Reduce it, for example with"
        " `.mean()` over the batch."
    )
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(
        f"`{caller}`: `loss_fn` must return a real floating-point loss, got"
        f" dtype {out.dtype}."
    )
  return out


def scalar_loss_fn(caller: str, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps ``loss_fn`` so that it returns a checked real scalar, aux dropped."""
  return lambda p: scalar_loss(caller, loss_fn(p))


def _dtype(x: Any) -> Any:
  """The dtype of a leaf; ``float0`` (which JAX cannot promote) included."""
  dtype = getattr(x, "dtype", None)
  return jnp.result_type(x) if dtype is None else dtype


def _describe(tree: PyTree) -> str:
  shapes = jax.tree.map(lambda x: f"{jnp.shape(x)} {_dtype(x)}", tree)
  text = str(shapes)
  return text if len(text) <= 600 else text[:600] + " ..."


_NOT_FLOATING = """\
Sharpness-aware transforms perturb and differentiate floating-point\
 parameters only. Keep integer and boolean state (step counters, masks,\
 indices) out of the optimized parameters, in a separate collection that\
 `loss_fn` closes over, or apply the transform to the floating-point leaves\
 only with `optax.masked`, whose closure receives the masked tree\
 (`optax.MaskedNode()` in place of the other leaves), so put those leaves\
 back before evaluating the loss:

    mask = jax.tree.map(lambda x: jnp.issubdtype(x.dtype, jnp.inexact), params)
    tx = optax.masked(tx, mask)
    is_masked = lambda x: isinstance(x, optax.MaskedNode)

    def masked_loss_fn(masked_params):
      full = jax.tree.map(lambda m, p: p if is_masked(m) else m,
                          masked_params, params, is_leaf=is_masked)
      return loss_fn(full)

    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=masked_loss_fn)
"""


def check_floating(caller: str, tree: PyTree, tree_name: str) -> None:
  """Raises ``ValueError`` naming the first leaf of ``tree`` that is not floating.

  Integer and boolean leaves, and the ``float0`` gradients that
  ``jax.grad(..., allow_int=True)`` returns for them, cannot be perturbed.
  Complex leaves are accepted.
  """
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = _dtype(x)
    if dtype == jax.dtypes.float0:
      what = (
          "a float0 leaf (the gradient `jax.grad(..., allow_int=True)`"
          " gives an integer parameter)"
      )
    elif jnp.issubdtype(dtype, jnp.inexact):
      continue
    else:
      what = f"a leaf of dtype {dtype}"
    raise ValueError(
        f"`{caller}`: {tree_name} has {what} at"
        f" {jax.tree_util.keystr(path)!r}.\n{_NOT_FLOATING}"
    )


def check_same_tree(
    caller: str, tree: PyTree, ref: PyTree, tree_name: str, ref_name: str
) -> None:
  """Raises ``ValueError`` unless ``tree`` has the structure and shapes of ``ref``.

  Both must have floating-point (or complex) leaves only, see
  :func:`check_floating`; ``ref`` (the parameters) is checked first.
  """
  if jax.tree.structure(tree) != jax.tree.structure(ref):
    raise ValueError(
        f"`{caller}`: {tree_name} does not have the tree structure of"
        f" `{ref_name}`.\n  {tree_name}: {_describe(tree)}\n  {ref_name}:"
        f" {_describe(ref)}"
    )
  check_floating(caller, ref, f"`{ref_name}`")
  check_floating(caller, tree, tree_name)
  with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
  for (path, a), b in zip(with_path, jax.tree.leaves(ref)):
    if jnp.shape(a) != jnp.shape(b):
      where = jax.tree_util.keystr(path)
      raise ValueError(
          f"`{caller}`: {tree_name} has shape {jnp.shape(a)} at {where!r},"
          f" but `{ref_name}` has shape {jnp.shape(b)} there.\n  {tree_name}:"
          f" {_describe(tree)}\n  {ref_name}: {_describe(ref)}"
      )
