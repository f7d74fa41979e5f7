"""What the Linen and NNX helpers share: the ``model_loss`` argument and hints."""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any, Callable, Optional

import flax.errors

from sam_optax._core.closure import scalar_loss

# First-parameter names that suggest a `loss(params, ...)` function.
_PARAMS_NAMES = ("params", "variables", "weights")

# Errors a `loss(params, ...)` function raises when it gets the model instead.
_AS_PARAMS = (
    r"'{t}' object is not (subscriptable|iterable)",
    r"'{t}' object has no attribute '(items|keys|values|get)'",
    r"operand type\(s\) for .*'{t}'",
    r"type <class '[\w.]*{t}'> is not a valid JAX type",
)

_EXAMPLE = {
    "linen": (
        "`model` is a callable that applies the network: `model(x, ...)` runs"
        ' `apply_fn({"params": params, **model_state}, x, ..., rngs=...)`'
        " and returns its output",
        "`state.apply_gradients(grads=grads, loss_fn=lambda p: loss(p, x, y))`"
        " of a `sam_optax.flax.TrainState`",
    ),
    "nnx": (
        "`model` is the NNX module itself (a copy with the perturbed"
        " parameters in the second pass): `model(x)` calls it",
        "`optimizer.update(model, grads, loss_fn=closure)`, where `closure`"
        " takes the parameters as an `nnx.State`",
    ),
}


def model_loss_arg(
    caller: str,
    model_loss: Optional[Callable[..., Any]],
    loss_fn: Optional[Callable[..., Any]],
    *,
    stacklevel: int = 3,
) -> Callable[..., Any]:
  """``model_loss``, or the deprecated keyword ``loss_fn=`` with a warning.

  Args:
    caller: the public function, for messages.
    model_loss: the model-level loss as given, or ``None``.
    loss_fn: the same under its deprecated keyword, or ``None``.
    stacklevel: ``warnings.warn``'s, pointing at the caller's caller.

  Returns:
    The model-level loss.

  Raises:
    TypeError: if both or neither are given, or the loss is not callable.
  """
  if loss_fn is not None:
    if model_loss is not None:
      raise TypeError(
          f"`{caller}`: got both `model_loss` and `loss_fn`; pass only"
          " `model_loss` (`loss_fn=` is its deprecated name)."
      )
    warnings.warn(
        f"`{caller}(loss_fn=...)` is deprecated: pass the model-level loss as"
        " `model_loss=` (or positionally). `loss_fn` names the"
        " `params -> loss` closure of `tx.update(..., loss_fn=...)`.",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    model_loss = loss_fn
  if model_loss is None:
    raise TypeError(
        f"`{caller}`: missing the model-level loss `model_loss(model, *args)`,"
        " for example `lambda model, x, y: jnp.mean((model(x) - y) ** 2)`."
    )
  if not callable(model_loss):
    raise TypeError(
        f"`{caller}`: `model_loss` must be callable as"
        f" `model_loss(model, *args)`; got {type(model_loss).__name__}."
    )
  return model_loss


def deprecated_name(old: str, new: str) -> None:
  """Warns that ``sam_optax.flax.old`` is now ``sam_optax.flax.new``."""
  warnings.warn(
      f"`sam_optax.flax.{old}` is deprecated: use `sam_optax.flax.{new}`, which"
      " takes the same arguments (the model-level loss is now called"
      " `model_loss`).",
      DeprecationWarning,
      stacklevel=3,
  )


def checked_loss(caller: str, out: Any) -> Any:
  """The scalar loss in ``out``, with errors that name ``model_loss``."""
  try:
    return scalar_loss(caller, out)
  except TypeError as error:
    raise TypeError(str(error).replace("`loss_fn`", "`model_loss`")) from None


def first_parameter(fn: Callable[..., Any]) -> Optional[str]:
  """The name of ``fn``'s first parameter, or ``None`` if unknown."""
  try:
    parameters = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    return None
  if not parameters or parameters[0].kind not in (
      inspect.Parameter.POSITIONAL_ONLY,
      inspect.Parameter.POSITIONAL_OR_KEYWORD,
  ):
    return None
  return parameters[0].name


def uses_model_as_params(error: BaseException, model_type: str) -> bool:
  """Whether ``error`` says the loss used the model as a parameter tree.

  Args:
    error: what the loss raised.
    model_type: the class name of the ``model`` the loss was given.

  Returns:
    True for Linen's "not a dictionary of collections" (``model.apply`` with
    the model in place of the parameters), ``nnx.merge``'s leaf count
    mismatch (a module in place of an ``nnx.State``), and Python's and JAX's
    errors on indexing, iterating or computing with an object of
    ``model_type``.
  """
  if isinstance(error, flax.errors.ApplyScopeInvalidVariablesTypeError):
    return True
  text = str(error)
  if isinstance(error, ValueError) and text.startswith("Incorrect number of leaves"):
    return True
  if isinstance(error, (TypeError, AttributeError)):
    t = re.escape(model_type)
    return any(re.search(p.format(t=t), text) for p in _AS_PARAMS)
  return False


def params_style_error(
    caller: str,
    model_loss: Callable[..., Any],
    error: BaseException,
    model_type: str,
    framework: str,
) -> Optional[TypeError]:
  """A ``TypeError`` explaining ``model_loss(model, ...)``, if ``error`` fits.

  Args:
    caller: the public function, for the message.
    model_loss: the user's loss, whose first parameter's name is quoted when
      it suggests parameters.
    error: what ``model_loss`` raised.
    model_type: the class name of the ``model`` it was given.
    framework: ``"linen"`` or ``"nnx"``.

  Returns:
    The error to raise from ``error``, or ``None`` when ``error`` does not
    look like a loss written against the parameters.
  """
  if not uses_model_as_params(error, model_type):
    return None
  model_is, closure_goes_to = _EXAMPLE[framework]
  name = first_parameter(model_loss)
  named = (
      f" (its first parameter is named `{name}`)" if name in _PARAMS_NAMES else ""
  )
  first_line = str(error).splitlines()[0] if str(error) else ""
  return TypeError(
      f"`{caller}`: `model_loss` is called as `model_loss(model, *args,"
      f" **kwargs)`, where {model_is}; but it seems to treat its first"
      f" argument as the parameters{named}, and raised"
      f" {type(error).__name__}: {first_line[:200]}\n\n"
      "Write the loss against `model`:\n\n"
      "    def model_loss(model, x, y):\n"
      "      return jnp.mean((model(x) - y) ** 2)\n\n"
      "A `loss(params, x, y)` function is the closure that `tx.update(...,"
      f" loss_fn=...)` takes instead; pass it yourself, e.g. to {closure_goes_to}."
  )
