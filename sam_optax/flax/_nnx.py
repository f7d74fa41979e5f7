"""Flax NNX: the SAM closure for ``nnx.Optimizer.update`` and a training step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import flax.errors
import jax
from flax import nnx

from sam_optax import sam_stats
from sam_optax.flax import _common

# Recent Flax calls `nnx.pure` `nnx.as_pure` and deprecates the old name.
_as_pure = getattr(nnx, "as_pure", None) or nnx.pure


def _call(
    caller: str,
    model_loss: Callable[..., Any],
    model: Any,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Any:
  """``model_loss(model, *args, **kwargs)``, explaining a params-style loss."""
  try:
    return model_loss(model, *args, **kwargs)
  except (flax.errors.FlaxError, TypeError, ValueError, AttributeError) as error:
    better = _common.params_style_error(
        caller, model_loss, error, type(model).__name__, "nnx"
    )
    if better is None:
      raise
    raise better from error


def _check_model(caller: str, model: Any) -> None:
  if not nnx.graph.is_graph_node(model):
    raise TypeError(
        f"`{caller}`: `model` must be an NNX module (or another graph node);"
        f" got {type(model).__name__}. The arguments are"
        f" `{caller}(model, model_loss, *args)`."
    )


def _build(
    caller: str,
    model: nnx.Module,
    model_loss: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Callable[[nnx.State], Any]:
  """:func:`nnx_closure` for ``caller``."""
  leaves, treedef = jax.tree.flatten(
      (tuple(args), dict(kwargs)), is_leaf=nnx.graph.is_graph_node
  )
  at = [i for i, leaf in enumerate(leaves) if nnx.graph.is_graph_node(leaf)]
  graphdef, state = nnx.split((model, *(leaves[i] for i in at)))
  # Pure arrays: a snapshot that later updates of `model` cannot reach.
  snapshot = _as_pure(state)

  def closure(params: nnx.State) -> Any:
    nodes = nnx.merge(graphdef, snapshot)
    copy = nodes[0]
    nnx.update(copy, params)
    copied = list(leaves)
    for i, node in zip(at, nodes[1:]):
      copied[i] = node
    copied_args, copied_kwargs = jax.tree.unflatten(treedef, copied)
    return _call(caller, model_loss, copy, copied_args, copied_kwargs)

  return closure


def nnx_closure(
    model: nnx.Module,
    model_loss: Optional[Callable[..., Any]] = None,
    *args: Any,
    loss_fn: Optional[Callable[..., Any]] = None,
    **kwargs: Any,
) -> Callable[[nnx.State], Any]:
  """Builds the SAM closure ``params -> model_loss(copy_of_model, *args)`` for NNX.

  ``nnx.Optimizer.update(model, grads, loss_fn=closure)`` forwards the
  closure to ``tx.update``, which calls it with the parameters as a pure
  ``nnx.State`` (the variables selected by the optimizer's ``wrt``) at the
  perturbed point. The closure rebuilds a copy of ``model`` with
  ``nnx.merge`` from a snapshot of all of its state taken when the closure is
  built, puts the given parameters in, and evaluates
  ``model_loss(copy, *args, **kwargs)``:

  * the perturbed pass never writes to ``model``: its BatchNorm statistics,
    RNG counters and any other variable updates stay in the discarded copy;
  * the copy's RNG streams start where ``model``'s stood at the snapshot,
    so when the closure is built **before** the clean pass, the perturbed
    pass draws the same dropout masks as the clean pass.

  Graph nodes among ``args`` and ``kwargs`` (an ``nnx.Rngs`` passed to the
  model, another module) are snapshotted together with ``model``, shared
  references included. Other arguments are used as they are. Works eagerly
  and inside ``nnx.jit``.

  Args:
    model: the NNX module being trained, in the state it has before the clean
      pass.
    model_loss: ``model_loss(model, *args, **kwargs)`` returning a scalar
      loss or a ``(loss, aux)`` pair; ``aux`` is discarded by the SAM
      transform.
    *args: passed to ``model_loss`` after the model, typically the batch.
    loss_fn: deprecated name of ``model_loss`` (a ``DeprecationWarning``).
    **kwargs: passed to ``model_loss`` as keyword arguments, for example a
      mask.

  Returns:
    A function of the parameters (an ``nnx.State`` of pure arrays or of
    variables, with the paths of ``nnx.state(model, wrt)``) returning what
    ``model_loss`` returns on the copy.

  Raises:
    TypeError: if ``model`` is not an NNX graph node or ``model_loss`` is
      not callable, and, when the closure runs, if ``model_loss`` treats the
      module as a parameter tree.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.linear = nnx.Linear(2, 8, rngs=rngs)
    ...     self.bn = nnx.BatchNorm(8, rngs=rngs)
    ...     self.dropout = nnx.Dropout(0.5, rngs=rngs)
    ...     self.out = nnx.Linear(8, 1, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.out(self.dropout(self.bn(self.linear(x))))
    >>> model = Net(nnx.Rngs(0, dropout=1))
    >>> tx = optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> def mse(model, x, y):
    ...   return jnp.mean((model(x) - y) ** 2)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   closure = sam_optax.flax.nnx_closure(model, mse, x, y)  # before clean pass
    ...   loss, grads = nnx.value_and_grad(mse)(model, x, y)     # updates BatchStats
    ...   optimizer.update(model, grads, loss_fn=closure)
    ...   return loss
    >>> loss = train_step(model, optimizer, jnp.ones((4, 2)), jnp.zeros((4, 1)))
    >>> int(model.dropout.rngs.count[...])   # one clean pass drew one key
    1
  """
  caller = "nnx_closure"
  _check_model(caller, model)
  model_loss = _common.model_loss_arg(caller, model_loss, loss_fn)
  return _build(caller, model, model_loss, args, kwargs)


def nnx_loss_fn(
    model: nnx.Module,
    model_loss: Optional[Callable[..., Any]] = None,
    *args: Any,
    loss_fn: Optional[Callable[..., Any]] = None,
    **kwargs: Any,
) -> Callable[[nnx.State], Any]:
  """Deprecated name of :func:`nnx_closure` (emits a ``DeprecationWarning``).

  Args:
    model: as in :func:`nnx_closure`.
    model_loss: as in :func:`nnx_closure`.
    *args: as in :func:`nnx_closure`.
    loss_fn: deprecated name of ``model_loss``.
    **kwargs: as in :func:`nnx_closure`.

  Returns:
    What :func:`nnx_closure` returns.
  """
  _common.deprecated_name("nnx_loss_fn", "nnx_closure")
  _check_model("nnx_loss_fn", model)
  model_loss = _common.model_loss_arg("nnx_loss_fn", model_loss, loss_fn)
  return nnx_closure(model, model_loss, *args, **kwargs)


def nnx_train_step(
    model_loss: Optional[Callable[..., Any]] = None,
    *,
    with_stats: bool = False,
    loss_fn: Optional[Callable[..., Any]] = None,
) -> Callable[..., Any]:
  """Builds a SAM training step ``train_step(model, optimizer, *args) -> out``.

  ``train_step(model, optimizer, *args, sam_pass=None, **kwargs)`` also
  takes ``sam_pass``, a Python bool (or ``None``: the transform decides)
  handed to ``tx.update``; with
  ``nnx.jit(train_step, static_argnames="sam_pass")`` the loop chooses
  between two compiled steps (see :func:`sam_optax.sam`). Its other keyword
  arguments (a mask, a flag) go to ``model_loss`` in both passes;
  ``sam_pass`` is the step's own name.

  The step snapshots the model with :func:`nnx_closure`, runs the clean pass
  ``nnx.value_and_grad(model_loss)`` with respect to ``optimizer.wrt``
  (which updates the model's BatchNorm statistics and advances its RNG
  streams once), and calls ``optimizer.update(model, grads,
  loss_fn=closure)``, whose perturbed pass reuses the same dropout masks and
  leaves the model's non-parameter variables alone. It returns what
  ``model_loss`` returned on the clean pass. Wrap it in ``nnx.jit``. The
  clean pass differentiates with respect to
  ``nnx.DiffState(0, optimizer.wrt)``, which needs NNX's graph mode (the
  default).

  Args:
    model_loss: ``model_loss(model, *args, **kwargs)`` returning a scalar
      loss or a ``(loss, aux)`` pair, where ``model`` is the NNX module
      (``model(x)`` calls it). Put the model in training mode
      (``model.train()``) before training. Not a ``loss(params, ...)``
      function: that is the closure ``optimizer.update(..., loss_fn=...)``
      takes.
    with_stats: if True, the step returns ``(out, stats)``, where ``stats``
      is the :class:`sam_optax.SAMStats` of the update,
      ``sam_optax.sam_stats(optimizer.opt_state, missing="zeros")`` (zeros
      for a ``tx`` without a sharpness-aware transform).
    loss_fn: deprecated name of ``model_loss`` (a ``DeprecationWarning``).

  Returns:
    ``train_step(model, optimizer, *args, sam_pass=None, **kwargs)``, where
    ``optimizer`` is an ``nnx.Optimizer`` of ``model`` whose ``tx`` contains
    a sharpness-aware transform (or any other optax transformation: the
    closure is then ignored), returning ``out`` or ``(out, stats)``.

  Raises:
    TypeError: if ``model_loss`` is not callable; when the step runs, if
      ``optimizer`` is not an ``nnx.Optimizer`` or ``model_loss`` treats the
      module as a parameter tree.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.linear = nnx.Linear(2, 8, rngs=rngs)
    ...     self.bn = nnx.BatchNorm(8, rngs=rngs)
    ...     self.dropout = nnx.Dropout(0.5, rngs=rngs)
    ...     self.out = nnx.Linear(8, 1, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.out(self.dropout(self.bn(self.linear(x))))
    >>> model = Net(nnx.Rngs(0, dropout=1))
    >>> tx = optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> def mse(model, x, y, weight=1.0):
    ...   return weight * jnp.mean((model(x) - y) ** 2)
    >>> x, y = jnp.arange(8.0).reshape(4, 2), jnp.ones((4, 1))
    >>> train_step = nnx.jit(sam_optax.flax.nnx_train_step(mse))
    >>> loss = train_step(model, optimizer, x, y)
    >>> int(optimizer.step[...])
    1
    >>> train_step = nnx.jit(sam_optax.flax.nnx_train_step(mse, with_stats=True))
    >>> loss, stats = train_step(model, optimizer, x, y, weight=2.0)
    >>> int(optimizer.step[...]), bool(stats.grad_norm > 0)
    (2, True)
  """
  caller = "nnx_train_step"
  model_loss = _common.model_loss_arg(caller, model_loss, loss_fn)

  def with_loss(
      model: nnx.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
  ) -> tuple[jax.Array, Any]:
    out = _call(caller, model_loss, model, args, kwargs)
    return _common.checked_loss(caller, out), out

  def train_step(
      model: nnx.Module,
      optimizer: nnx.Optimizer,
      *args: Any,
      sam_pass: Optional[bool] = None,
      **kwargs: Any,
  ) -> Any:
    if not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(
          f"`{caller}`: `optimizer` must be an `nnx.Optimizer`, got"
          f" {type(optimizer).__name__}. The step is called as"
          " `train_step(model, optimizer, *args)` with"
          " `optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)`."
      )
    if isinstance(optimizer, getattr(nnx, "ModelAndOptimizer", ())):
      raise TypeError(
          f"`{caller}`: `optimizer` is an `nnx.ModelAndOptimizer`, whose"
          " `update` takes no model. Use"
          " `nnx.Optimizer(model, tx, wrt=nnx.Param)` instead."
      )
    closure = _build(caller, model, model_loss, args, kwargs)
    value_and_grad = nnx.value_and_grad(
        with_loss, argnums=nnx.DiffState(0, optimizer.wrt), has_aux=True
    )
    # NNX transforms take no keyword arguments: pass them as one dict.
    (_, out), grads = value_and_grad(model, tuple(args), dict(kwargs))
    extra = {} if sam_pass is None else {"sam_pass": sam_pass}
    optimizer.update(model, grads, loss_fn=closure, **extra)
    if with_stats:
      return out, sam_stats(optimizer.opt_state, missing="zeros")
    return out

  return train_step
