"""Linen: the SAM closure and the training step for BatchNorm and dropout."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import flax.errors
import jax

from sam_optax import sam_stats
from sam_optax.flax import _common
from sam_optax.flax._train_state import TrainState

PyTree = Any
# Turns an error raised by the user's loss into a clearer one, or `None`.
Explain = Callable[[BaseException], Optional[BaseException]]


def _names(caller: str, arg: str, value: Union[str, Sequence[str]]) -> tuple[str, ...]:
  names = (value,) if isinstance(value, str) else tuple(value)
  if not all(isinstance(n, str) for n in names):
    raise TypeError(
        f"`{caller}`: `{arg}` must be a collection name or a sequence of"
        f" names, got {value!r}."
    )
  return names


class _BoundModel:
  """The model as a Linen ``model_loss`` sees it: ``model(*args, **kwargs)``.

  Each call runs ``apply_fn`` with the parameters, the current model state
  and the random keys, returns the model's output and records the updated
  mutable collections, which the next call sees.
  """

  def __init__(self, apply_fn, params, model_state, rngs, mutable):
    self._apply_fn = apply_fn
    self._params = params
    self._rngs = rngs
    self._mutable = mutable
    self._calls = 0
    self.model_state = model_state

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    rngs = self._rngs
    if self._calls:
      rngs = {k: jax.random.fold_in(v, self._calls) for k, v in rngs.items()}
    self._calls += 1
    variables = {"params": self._params, **self.model_state}
    if not self._mutable:
      return self._apply_fn(variables, *args, rngs=rngs, **kwargs)
    out, updates = self._apply_fn(
        variables, *args, rngs=rngs, mutable=list(self._mutable), **kwargs
    )
    self.model_state = {**self.model_state, **updates}
    return out


def _quoted(pattern: str, error: BaseException) -> Optional[str]:
  found = re.search(pattern, str(error))
  return found.group(1) if found else None


def _collection(error: BaseException) -> Optional[str]:
  """The collection named by a ``ScopeCollectionNotFound``."""
  return _quoted(r'from collection "([^"]+)"', error)


def _stream(error: BaseException) -> Optional[str]:
  """The random stream named by an ``InvalidRngError``."""
  return _quoted(r'needs PRNG for "([^"]+)"', error)


def _build(
    caller: str,
    apply_fn: Callable[..., Any],
    model_loss: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    model_state: Optional[Mapping[str, PyTree]],
    rngs: Optional[Mapping[str, jax.Array]],
    mutable: Optional[Union[str, Sequence[str]]],
    explain: Optional[Explain] = None,
) -> Callable[[PyTree], tuple[jax.Array, tuple[dict[str, PyTree], Any]]]:
  """:func:`linen_closure` for ``caller``; ``explain`` rewrites the loss's errors."""
  if not callable(apply_fn):
    raise TypeError(
        f"`{caller}`: `apply_fn` must be callable, usually `model.apply` or"
        f" `state.apply_fn`; got {type(apply_fn).__name__}."
    )
  model_state = dict(model_state or {})
  if "params" in model_state:
    raise ValueError(
        f"`{caller}`: `model_state` must not contain 'params': the parameters"
        " are the argument of the closure. Pass only the other collections,"
        " for example `model_state={'batch_stats': batch_stats}`."
    )
  names = tuple(model_state) if mutable is None else _names(caller, "mutable", mutable)
  rngs = dict(rngs or {})
  kwargs = dict(kwargs)
  if explain is None:
    explain = _closure_hints(caller, model_loss, model_state, rngs)

  def closure(params: PyTree) -> tuple[jax.Array, tuple[dict[str, PyTree], Any]]:
    model = _BoundModel(apply_fn, params, model_state, rngs, names)
    try:
      out = model_loss(model, *args, **kwargs)
    except (flax.errors.FlaxError, TypeError, ValueError, AttributeError) as error:
      better = explain(error)
      if better is None:
        raise
      raise better from error
    return _common.checked_loss(caller, out), (model.model_state, out)

  return closure


def _closure_hints(
    caller: str,
    model_loss: Callable[..., Any],
    model_state: Mapping[str, PyTree],
    rngs: Mapping[str, jax.Array],
) -> Explain:
  """Explains the loss's Flax errors in terms of :func:`linen_closure`'s arguments."""

  def explain(error: BaseException) -> Optional[BaseException]:
    if isinstance(error, flax.errors.ScopeCollectionNotFound):
      name = _collection(error) or "batch_stats"
      return ValueError(
          f"`{caller}`: the model reads the variable collection {name!r},"
          f" but `model_state` (collections {sorted(model_state)}) holds"
          " none of its variables. Pass the model's values from"
          " `model.init`:\n\n"
          f"    {caller}(apply_fn, model_loss, *args,\n"
          f"        model_state={{{name!r}: variables[{name!r}]}}, rngs=...)\n"
      )
    if isinstance(error, flax.errors.InvalidRngError):
      name = _stream(error)
      if name is None or name in rngs:
        return None
      keys = ", ".join(f"{n!r}: ..." for n in rngs)
      return ValueError(
          f"`{caller}`: the model draws random numbers from the stream"
          f" {name!r} (`self.make_rng({name!r})`), but `rngs` holds keys only"
          f" for {sorted(rngs)}. Pass one for it too, the same in both"
          f" passes: `rngs={{{keys + ', ' if keys else ''}{name!r}: key}}`."
      )
    return _common.params_style_error(
        caller, model_loss, error, _BoundModel.__name__, "linen"
    )

  return explain


def linen_closure(
    apply_fn: Callable[..., Any],
    model_loss: Optional[Callable[..., Any]] = None,
    *args: Any,
    model_state: Optional[Mapping[str, PyTree]] = None,
    rngs: Optional[Mapping[str, jax.Array]] = None,
    mutable: Optional[Union[str, Sequence[str]]] = None,
    loss_fn: Optional[Callable[..., Any]] = None,
    **kwargs: Any,
) -> Callable[[PyTree], tuple[jax.Array, tuple[dict[str, PyTree], Any]]]:
  """Builds the SAM closure ``params -> (loss, (model_state, out))`` for Linen.

  The same closure serves both passes of a SAM step: differentiate it at
  ``params`` for the clean gradient and keep its ``model_state`` (for example
  the new BatchNorm statistics), then pass it as ``loss_fn=`` to
  ``TrainState.apply_gradients`` or ``tx.update``, which evaluates it at the
  perturbed parameters and discards everything but the loss. Both passes
  therefore see the same inputs, the same model state and the same random
  keys, hence the same dropout masks.

  ``model_loss(model, *args, **kwargs)`` writes the loss in terms of a
  callable ``model``: ``model(*inputs, **options)`` runs
  ``apply_fn({"params": params, **model_state}, *inputs, rngs=rngs,
  mutable=mutable, **options)``, returns the model's output and records the
  updated collections. If ``model_loss`` calls ``model`` more than once, each
  call sees the collections left by the previous one, and call ``i > 0``
  uses the keys ``jax.random.fold_in(rngs[name], i)``.

  Args:
    apply_fn: the model's apply function, usually ``model.apply`` or
      ``state.apply_fn``.
    model_loss: ``model_loss(model, *args, **kwargs)`` returning a scalar
      loss or a ``(loss, aux)`` pair.
    *args: passed to ``model_loss`` after ``model``, typically the batch.
    model_state: the variable collections other than ``"params"``, for
      example ``{"batch_stats": state.batch_stats}``.
    rngs: random keys by collection name, for example
      ``{"dropout": dropout_key}``; the same keys serve both passes.
    mutable: the collections the model may update; by default those in
      ``model_state``.
    loss_fn: deprecated name of ``model_loss`` (a ``DeprecationWarning``).
    **kwargs: passed to ``model_loss`` as keyword arguments, for example a
      mask; the names above are taken.

  Returns:
    A function of ``params`` returning ``(loss, (new_model_state, out))``,
    where ``out`` is what ``model_loss`` returned and ``new_model_state`` is
    ``model_state`` with the updated collections.

  Raises:
    TypeError: if ``apply_fn`` or ``model_loss`` is not callable, and, when
      the closure runs, if ``model_loss`` treats ``model`` as parameters.
    ValueError: if ``model_state`` contains ``"params"``, and, when the
      closure runs, if the model reads a collection missing from
      ``model_state`` or draws from a stream missing from ``rngs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> import flax.linen as nn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    ...     return nn.Dense(1)(nn.Dropout(0.5, deterministic=not train)(x))
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> params, batch_stats = variables["params"], variables["batch_stats"]
    >>> tx = optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1))
    >>> opt_state = tx.init(params)
    >>> def mse(model, x, y):
    ...   return jnp.mean((model(x, train=True) - y) ** 2)
    >>> closure = sam_optax.flax.linen_closure(
    ...     Net().apply, mse, x, y, model_state={"batch_stats": batch_stats},
    ...     rngs={"dropout": jax.random.key(1)})
    >>> (loss, (model_state, _)), grads = jax.value_and_grad(
    ...     closure, has_aux=True)(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params, loss_fn=closure)
    >>> params = optax.apply_updates(params, updates)
    >>> batch_stats = model_state["batch_stats"]     # from the clean pass only
  """
  caller = "linen_closure"
  model_loss = _common.model_loss_arg(caller, model_loss, loss_fn)
  return _build(caller, apply_fn, model_loss, args, kwargs, model_state, rngs, mutable)


def linen_loss_fn(
    apply_fn: Callable[..., Any],
    model_loss: Optional[Callable[..., Any]] = None,
    *args: Any,
    loss_fn: Optional[Callable[..., Any]] = None,
    **kwargs: Any,
) -> Callable[[PyTree], tuple[jax.Array, tuple[dict[str, PyTree], Any]]]:
  """Deprecated name of :func:`linen_closure` (emits a ``DeprecationWarning``).

  Args:
    apply_fn: as in :func:`linen_closure`.
    model_loss: as in :func:`linen_closure`.
    *args: as in :func:`linen_closure`.
    loss_fn: deprecated name of ``model_loss``.
    **kwargs: as in :func:`linen_closure`.

  Returns:
    What :func:`linen_closure` returns.
  """
  _common.deprecated_name("linen_loss_fn", "linen_closure")
  model_loss = _common.model_loss_arg("linen_loss_fn", model_loss, loss_fn)
  return linen_closure(apply_fn, model_loss, *args, **kwargs)


def _step_hints(
    caller: str,
    model_loss: Callable[..., Any],
    state: TrainState,
    names: tuple[str, ...],
    fixed: Optional[tuple[str, ...]],
    streams: tuple[str, ...],
    key: Optional[jax.Array],
) -> Explain:
  """Explains the loss's Flax errors in terms of the step's arguments."""

  def explain(error: BaseException) -> Optional[BaseException]:
    if isinstance(error, flax.errors.ScopeCollectionNotFound):
      return _missing_collection(caller, error, state, names, fixed)
    if isinstance(error, flax.errors.InvalidRngError):
      name = _stream(error)
      add = f"rng_collections={(*streams, name)!r}"
      if key is None:
        also = (
            f" The model also draws from {name!r}: build the step with `{add}`."
            if name is not None and name not in streams
            else ""
        )
        return ValueError(
            f"`{caller}`: the model draws random numbers (for example in"
            " Dropout) but `train_step` was called without `key`. Call"
            " `train_step(state, *args, key=key)` with a key that is the same"
            " on every step, e.g. `jax.random.key(0)`; each step folds in"
            f" `state.step`.{also}"
        )
      if name is None or name in streams:
        return None
      return ValueError(
          f"`{caller}`: the model draws random numbers from the stream"
          f" {name!r} (`self.make_rng({name!r})`), but the step derives keys"
          f" only for `rng_collections={streams!r}`. Name every stream when"
          " building the step (appended last, the existing streams keep"
          " their keys):\n\n"
          f"    train_step = sam_optax.flax.linen_train_step(model_loss, {add})\n"
      )
    return _common.params_style_error(
        caller, model_loss, error, _BoundModel.__name__, "linen"
    )

  return explain


def _missing_collection(
    caller: str,
    error: BaseException,
    state: TrainState,
    names: tuple[str, ...],
    fixed: Optional[tuple[str, ...]],
) -> ValueError:
  """Why the model found collection ``name`` empty, and the fix."""
  cls = type(state).__name__
  name = _collection(error) or "batch_stats"
  auto = fixed is None and name == "batch_stats"
  collections = (
      "" if auto else f", collections={(*(fixed or names), name)!r}"
  )
  if hasattr(state, name):
    return ValueError(
        f"`{caller}`: the model reads the variable collection {name!r}, and"
        f" {cls} has a `{name}` field, but `collections={names!r}` leaves it"
        " out. Build the step with it:\n\n"
        f"    train_step = sam_optax.flax.linen_train_step(model_loss{collections})\n"
    )
  build = (
      ""
      if auto
      else (
          "\n    train_step = sam_optax.flax.linen_train_step(model_loss"
          f"{collections})\n"
      )
  )
  return ValueError(
      f"`{caller}`: the model reads the variable collection {name!r}"
      " (BatchNorm keeps its statistics in 'batch_stats'), but `state`, a"
      f" {cls}, has no `{name}` field to keep it in. Subclass the TrainState"
      " with that field and create the state with the model's initial"
      " values:\n\n"
      "    class TrainState(sam_optax.flax.TrainState):\n"
      f"      {name}: Any\n\n"
      "    variables = model.init(key, x, train=False)\n"
      "    state = TrainState.create(apply_fn=model.apply,"
      ' params=variables["params"],\n'
      f'                              {name}=variables["{name}"], tx=tx)\n'
      + build
  )


def linen_train_step(
    model_loss: Optional[Callable[..., Any]] = None,
    *,
    collections: Optional[Union[str, Sequence[str]]] = None,
    rng_collections: Union[str, Sequence[str]] = ("dropout",),
    with_stats: bool = False,
    loss_fn: Optional[Callable[..., Any]] = None,
) -> Callable[..., tuple[Any, ...]]:
  """Builds a SAM training step for a Linen model with BatchNorm and dropout.

  The step ``train_step(state, *args, key=None, sam_pass=None, **kwargs) ->
  (state, out)``

  1. derives the random keys of the step from ``key`` and ``state.step``:
     collection ``rng_collections[i]`` gets
     ``jax.random.fold_in(jax.random.fold_in(key, state.step), i)``, so a run
     resumed from a checkpoint draws the same masks as an uninterrupted one;
  2. runs the clean pass ``model_loss(model, *args, **kwargs)`` at
     ``state.params`` with the mutable ``collections`` (``state.batch_stats``,
     ...), and keeps their new values;
  3. calls ``state.apply_gradients(grads=..., loss_fn=...)``, whose perturbed
     pass uses the same batch, keyword arguments and keys and whose updated
     collections are discarded.

  Keyword arguments of the step other than ``key`` and ``sam_pass`` (a mask,
  a flag) go to ``model_loss`` in both passes; those two names are the
  step's own. ``state`` must be a :class:`sam_optax.flax.TrainState` (a
  subclass with a ``batch_stats`` field for BatchNorm, as in Flax's guides).
  The step is not jitted; wrap it in ``jax.jit`` (with a Python value among
  the keyword arguments, name it in ``static_argnames``). ``sam_pass`` (a
  Python bool, or ``None`` to let the transform decide) is handed to
  ``tx.update``: with ``jax.jit(train_step, static_argnames="sam_pass")`` the
  loop chooses between two compiled steps, for instance LookSAM's schedule
  ``sam_pass=(step % k == 0)`` without a run-time conditional.

  Args:
    model_loss: ``model_loss(model, *args, **kwargs)`` returning a scalar
      loss or a ``(loss, aux)`` pair, where ``model(*inputs, **options)``
      applies the model (see :func:`linen_closure`); for instance
      ``lambda model, batch: ce(model(batch["x"], train=True), batch["y"])``.
      Not a ``loss(params, ...)`` function: that is the closure
      ``state.apply_gradients(..., loss_fn=...)`` takes.
    collections: the mutable variable collections, each stored in the field
      of ``state`` with the same name. By default ``("batch_stats",)`` when
      ``state`` has a ``batch_stats`` field, otherwise none.
    rng_collections: names of the random streams the model draws from, in
      the order that defines their keys.
    with_stats: if True, the step also returns the
      :class:`sam_optax.SAMStats` of the update,
      ``sam_optax.sam_stats(state.opt_state, missing="zeros")`` (zeros for a
      ``tx`` without a sharpness-aware transform).
    loss_fn: deprecated name of ``model_loss`` (a ``DeprecationWarning``).

  Returns:
    ``train_step(state, *args, key=None, sam_pass=None, **kwargs)``
    returning the new state and what ``model_loss`` returned on the clean
    pass, ``(state, out)``, or ``(state, out, stats)`` with ``with_stats``.

  Raises:
    TypeError: if ``model_loss`` is not callable; when the step runs, if
      ``state`` is not a :class:`sam_optax.flax.TrainState` or
      ``model_loss`` treats ``model`` as parameters.
    ValueError: when the step runs, if the model reads a collection that
      ``state`` does not keep (the message shows the ``TrainState``
      subclass to write), or draws random numbers without ``key`` or from a
      stream missing from ``rng_collections``.

  Examples:
    >>> from typing import Any
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> import flax.linen as nn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    ...     return nn.Dense(1)(nn.Dropout(0.5, deterministic=not train)(x))
    >>> class State(sam_optax.flax.TrainState):
    ...   batch_stats: Any
    >>> x, y = jnp.arange(8.0).reshape(4, 2), jnp.ones((4, 1))
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> state = State.create(
    ...     apply_fn=Net().apply, params=variables["params"],
    ...     batch_stats=variables["batch_stats"],
    ...     tx=optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1)))
    >>> def mse(model, x, y, weight=1.0):
    ...   return weight * jnp.mean((model(x, train=True) - y) ** 2)
    >>> train_step = jax.jit(sam_optax.flax.linen_train_step(mse))
    >>> state, loss = train_step(state, x, y, key=jax.random.key(1))
    >>> int(state.step)
    1
    >>> train_step = jax.jit(sam_optax.flax.linen_train_step(mse, with_stats=True))
    >>> state, loss, stats = train_step(state, x, y, key=jax.random.key(1), weight=2.0)
    >>> int(state.step), bool(stats.grad_norm > 0)
    (2, True)
  """
  caller = "linen_train_step"
  model_loss = _common.model_loss_arg(caller, model_loss, loss_fn)
  fixed = None if collections is None else _names(caller, "collections", collections)
  streams = _names(caller, "rng_collections", rng_collections)

  def train_step(
      state: TrainState,
      *args: Any,
      key: Optional[jax.Array] = None,
      sam_pass: Optional[bool] = None,
      **kwargs: Any,
  ):
    if not isinstance(state, TrainState):
      raise TypeError(
          f"`{caller}`: `state` must be a `sam_optax.flax.TrainState` (or a"
          " subclass), whose `apply_gradients` forwards the loss closure to"
          f" `tx`; got {type(state).__name__}. Create it with"
          " `sam_optax.flax.TrainState.create(apply_fn=..., params=...,"
          " tx=...)`."
      )
    if fixed is None:
      names = ("batch_stats",) if hasattr(state, "batch_stats") else ()
    else:
      names = fixed
      missing = [n for n in names if not hasattr(state, n)]
      if missing:
        raise ValueError(
            f"`{caller}`: `collections` names {missing}, but"
            f" {type(state).__name__} has no such field. Add the field to"
            " your TrainState subclass, for example `batch_stats: Any`, or"
            " leave it out of `collections`."
        )
    rngs = {}
    if key is not None:
      step_key = jax.random.fold_in(key, state.step)
      rngs = {n: jax.random.fold_in(step_key, i) for i, n in enumerate(streams)}
    closure = _build(
        caller,
        state.apply_fn,
        model_loss,
        args,
        kwargs,
        {n: getattr(state, n) for n in names},
        rngs,
        None,
        _step_hints(caller, model_loss, state, names, fixed, streams, key),
    )
    (_, (model_state, out)), grads = jax.value_and_grad(closure, has_aux=True)(
        state.params
    )
    new_state = state.apply_gradients(
        grads=grads,
        loss_fn=closure,
        sam_pass=sam_pass,
        **{n: model_state[n] for n in names},
    )
    if with_stats:
      return new_state, out, sam_stats(new_state.opt_state, missing="zeros")
    return new_state, out

  return train_step
