"""Construction-time checks of hyperparameters.

Hyperparameters may be Python numbers, arrays, schedules (callables of the
step count) or tracers (under ``optax.inject_hyperparams`` and ``jax.vmap``).
Only values that are known at construction time are checked; traced values
are the caller's responsibility.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
from typing import Any, Callable, Optional, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

_F = TypeVar("_F", bound=Callable[..., Any])
_REPORTED_AS: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "sam_optax_reported_as", default=None
)


def reported_as(name: str) -> Callable[[_F], _F]:
  """Decorates a public factory so that its parts' errors carry its name.

  A part such as ``perturbations.l2`` names itself in its errors when the
  user calls it; built inside ``sam_optax.sam`` it reports ``sam``, the
  function the user called. The outermost decorated factory wins.
  """

  def decorate(factory: _F) -> _F:
    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
      if _REPORTED_AS.get() is not None:
        return factory(*args, **kwargs)
      token = _REPORTED_AS.set(name)
      try:
        return factory(*args, **kwargs)
      finally:
        _REPORTED_AS.reset(token)

    return wrapper  # type: ignore[return-value]

  return decorate


def _who(caller: str) -> str:
  return _REPORTED_AS.get() or caller


def concrete_float(value: Any) -> Optional[float]:
  """``value`` as a Python float when it is a concrete scalar, else ``None``."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  if arr.shape != () or not np.issubdtype(arr.dtype, np.number):
    return None
  return float(arr)


def _check_schedule(caller: str, name: str, schedule: Callable[..., Any]) -> None:
  """Raises ``TypeError`` unless ``schedule`` can be called with the count."""
  try:
    signature = inspect.signature(schedule)
  except (TypeError, ValueError):  # no signature to read (some builtins)
    return
  try:
    signature.bind(0)
  except TypeError as err:
    raise TypeError(
        f"`{caller}`: a `{name}` schedule must take one argument, the step"
        f" count (0, 1, 2, ...), e.g. `optax.linear_schedule(...)` or"
        f" `lambda count: ...`; {schedule!r} has the signature"
        f" {signature} ({err})."
    ) from err


def check_scalar(
    caller: str,
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_schedule: bool = False,
) -> None:
  """Raises ``ValueError`` naming ``name`` when a concrete ``value`` is out of range."""
  caller = _who(caller)
  if callable(value):
    if allow_schedule:
      _check_schedule(caller, name, value)
      return
    raise ValueError(
        f"`{caller}`: `{name}` must be a number, not a schedule (got"
        f" {value!r})."
    )
  if isinstance(value, jax.core.Tracer):
    return
  try:
    arr = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    arr = np.asarray(None)
  real = jnp.issubdtype(arr.dtype, jnp.integer) or jnp.issubdtype(
      arr.dtype, jnp.floating
  )
  if isinstance(value, bool) or arr.shape != () or not real:
    kind = "a real number or a schedule" if allow_schedule else "a real number"
    raise ValueError(
        f"`{caller}`: `{name}` must be {kind}, got {name}={value!r}."
    )
  x = float(arr)
  if math.isnan(x):
    raise ValueError(f"`{caller}`: `{name}` must be a number, got {name}=nan.")
  if math.isinf(x):
    raise ValueError(
        f"`{caller}`: `{name}` must be finite; got {name}={value!r}."
    )
  lo_ok = x >= low if low_inclusive else x > low
  hi_ok = x <= high if high_inclusive else x < high
  if not (lo_ok and hi_ok):
    lo = ("[" if low_inclusive else "(") + f"{low:g}"
    hi = f"{high:g}" + ("]" if high_inclusive and high < math.inf else ")")
    raise ValueError(
        f"`{caller}`: `{name}` must lie in {lo}, {hi}; got {name}={value!r}."
    )


def check_int(caller: str, name: str, value: Any, *, low: int) -> None:
  """Raises ``ValueError`` unless a concrete ``value`` is an integer >= ``low``.

  Integer arrays are accepted (``optax.inject_hyperparams`` turns ints into
  arrays); tracers are not checked.
  """
  caller = _who(caller)
  if isinstance(value, jax.core.Tracer):
    return
  arr = np.asarray(value) if not isinstance(value, bool) else None
  if (
      arr is None
      or arr.shape != ()
      or not np.issubdtype(arr.dtype, np.integer)
      or int(arr) < low
  ):
    raise ValueError(
        f"`{caller}`: `{name}` must be an integer >= {low}; got"
        f" {name}={value!r}."
    )


def check_option(caller: str, name: str, value: Any, allowed: tuple) -> None:
  """Raises ``ValueError`` unless ``value`` is one of the strings ``allowed``."""
  caller = _who(caller)
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(
        f"`{caller}`: `{name}` must be one of {', '.join(map(repr, allowed))};"
        f" got {name}={value!r}."
    )
