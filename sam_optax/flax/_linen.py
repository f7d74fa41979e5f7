"""Linen: the loss closure and the training step for BatchNorm and dropout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import flax.errors
import jax

from sam_optax._core.closure import scalar_loss
from sam_optax.flax._train_state import TrainState

PyTree = Any


def _names(caller: str, arg: str, value: Union[str, Sequence[str]]) -> tuple[str, ...]:
  names = (value,) if isinstance(value, str) else tuple(value)
  if not all(isinstance(n, str) for n in names):
    raise TypeError(
        f"`{caller}`: `{arg}` must be a collection name or a sequence of"
        f" names, got {value!r}."
    )
  return names


class _BoundModel:
  """The model as a Linen ``loss_fn`` sees it: ``model(*args, **kwargs)``.

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


def linen_loss_fn(
    apply_fn: Callable[..., Any],
    loss_fn: Callable[..., Any],
    *args: Any,
    model_state: Optional[Mapping[str, PyTree]] = None,
    rngs: Optional[Mapping[str, jax.Array]] = None,
    mutable: Optional[Union[str, Sequence[str]]] = None,
) -> Callable[[PyTree], tuple[jax.Array, tuple[dict[str, PyTree], Any]]]:
  """Builds the SAM closure ``params -> (loss, (model_state, out))`` for Linen.

  The same closure serves both passes of a SAM step: differentiate it at
  ``params`` for the clean gradient and keep its ``model_state`` (for example
  the new BatchNorm statistics), then pass it as ``loss_fn=`` to
  ``TrainState.apply_gradients`` or ``tx.update``, which evaluates it at the
  perturbed parameters and discards everything but the loss. Both passes
  therefore see the same inputs, the same model state and the same random
  keys, hence the same dropout masks.

  ``loss_fn(model, *args)`` writes the loss in terms of a callable ``model``:
  ``model(*inputs, **kwargs)`` runs
  ``apply_fn({"params": params, **model_state}, *inputs, rngs=rngs,
  mutable=mutable, **kwargs)``, returns the model's output and records the
  updated collections. If ``loss_fn`` calls ``model`` more than once, each
  call sees the collections left by the previous one, and call ``i > 0``
  uses the keys ``jax.random.fold_in(rngs[name], i)``.

  Args:
    apply_fn: the model's apply function, usually ``model.apply`` or
      ``state.apply_fn``.
    loss_fn: ``loss_fn(model, *args)`` returning a scalar loss or a
      ``(loss, aux)`` pair.
    *args: passed to ``loss_fn`` after ``model``, typically the batch.
    model_state: the variable collections other than ``"params"``, for
      example ``{"batch_stats": state.batch_stats}``.
    rngs: random keys by collection name, for example
      ``{"dropout": dropout_key}``; the same keys serve both passes.
    mutable: the collections the model may update; by default those in
      ``model_state``.

  Returns:
    A function of ``params`` returning ``(loss, (new_model_state, out))``,
    where ``out`` is what ``loss_fn`` returned and ``new_model_state`` is
    ``model_state`` with the updated collections.

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
    >>> loss_fn = sam_optax.flax.linen_loss_fn(
    ...     Net().apply, mse, x, y, model_state={"batch_stats": batch_stats},
    ...     rngs={"dropout": jax.random.key(1)})
    >>> (loss, (model_state, _)), grads = jax.value_and_grad(
    ...     loss_fn, has_aux=True)(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
    >>> params = optax.apply_updates(params, updates)
    >>> batch_stats = model_state["batch_stats"]     # from the clean pass only
  """
  caller = "linen_loss_fn"
  if not callable(apply_fn):
    raise TypeError(
        f"`{caller}`: `apply_fn` must be callable, usually `model.apply` or"
        f" `state.apply_fn`; got {type(apply_fn).__name__}."
    )
  if not callable(loss_fn):
    raise TypeError(
        f"`{caller}`: `loss_fn` must be callable as `loss_fn(model, *args)`;"
        f" got {type(loss_fn).__name__}."
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

  def closure(params: PyTree) -> tuple[jax.Array, tuple[dict[str, PyTree], Any]]:
    model = _BoundModel(apply_fn, params, model_state, rngs, names)
    out = loss_fn(model, *args)
    return scalar_loss(caller, out), (model.model_state, out)

  return closure


def linen_train_step(
    loss_fn: Callable[..., Any],
    *,
    collections: Optional[Union[str, Sequence[str]]] = None,
    rng_collections: Union[str, Sequence[str]] = ("dropout",),
) -> Callable[..., tuple[TrainState, Any]]:
  """Builds a SAM training step for a Linen model with BatchNorm and dropout.

  The step ``train_step(state, *args, key=None, sam_pass=None) -> (state,
  out)``

  1. derives the random keys of the step from ``key`` and ``state.step``:
     collection ``rng_collections[i]`` gets
     ``jax.random.fold_in(jax.random.fold_in(key, state.step), i)``, so a run
     resumed from a checkpoint draws the same masks as an uninterrupted one;
  2. runs the clean pass at ``state.params`` with the mutable ``collections``
     (``state.batch_stats``, ...), and keeps their new values;
  3. calls ``state.apply_gradients(grads=..., loss_fn=...)``, whose perturbed
     pass uses the same batch and keys and whose updated collections are
     discarded.

  ``state`` must be a :class:`sam_optax.flax.TrainState` (a subclass with a
  ``batch_stats`` field for BatchNorm, as in Flax's guides). The step is not
  jitted; wrap it in ``jax.jit``. ``sam_pass`` (a Python bool, or ``None``
  to let the transform decide) is handed to ``tx.update``: with
  ``jax.jit(train_step, static_argnames="sam_pass")`` the loop chooses
  between two compiled steps, for instance LookSAM's schedule
  ``sam_pass=(step % k == 0)`` without a run-time conditional.

  Args:
    loss_fn: ``loss_fn(model, *args)`` returning a scalar loss or a
      ``(loss, aux)`` pair, where ``model(*inputs, **kwargs)`` applies the
      model (see :func:`linen_loss_fn`); for instance
      ``lambda model, batch: ce(model(batch["x"], train=True), batch["y"])``.
    collections: the mutable variable collections, each stored in the field
      of ``state`` with the same name. By default ``("batch_stats",)`` when
      ``state`` has a ``batch_stats`` field, otherwise none.
    rng_collections: names of the random streams the model draws from, in
      the order that defines their keys.

  Returns:
    ``train_step(state, *args, key=None)`` returning the new state and what
    ``loss_fn`` returned on the clean pass.

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
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> state = State.create(
    ...     apply_fn=Net().apply, params=variables["params"],
    ...     batch_stats=variables["batch_stats"],
    ...     tx=optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1)))
    >>> def mse(model, x, y):
    ...   return jnp.mean((model(x, train=True) - y) ** 2)
    >>> train_step = jax.jit(sam_optax.flax.linen_train_step(mse))
    >>> state, loss = train_step(state, x, y, key=jax.random.key(1))
    >>> int(state.step)
    1
  """
  caller = "linen_train_step"
  if not callable(loss_fn):
    raise TypeError(
        f"`{caller}`: `loss_fn` must be callable as `loss_fn(model, *args)`;"
        f" got {type(loss_fn).__name__}."
    )
  fixed = None if collections is None else _names(caller, "collections", collections)
  streams = _names(caller, "rng_collections", rng_collections)

  def train_step(
      state: TrainState,
      *args: Any,
      key: Optional[jax.Array] = None,
      sam_pass: Optional[bool] = None,
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
    closure = linen_loss_fn(
        state.apply_fn,
        loss_fn,
        *args,
        model_state={n: getattr(state, n) for n in names},
        rngs=rngs,
    )
    try:
      (_, (model_state, out)), grads = jax.value_and_grad(closure, has_aux=True)(
          state.params
      )
    except flax.errors.InvalidRngError as error:
      if key is not None:
        raise
      raise ValueError(
          f"`{caller}`: the model draws random numbers (for example in"
          " Dropout) but `train_step` was called without `key`. Call"
          " `train_step(state, *args, key=key)` with a key that is the same"
          " on every step, e.g. `jax.random.key(0)`; each step folds in"
          " `state.step`."
      ) from error
    new_state = state.apply_gradients(
        grads=grads,
        loss_fn=closure,
        sam_pass=sam_pass,
        **{n: model_state[n] for n in names},
    )
    return new_state, out

  return train_step
