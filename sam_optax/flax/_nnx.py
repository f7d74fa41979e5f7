"""Flax NNX: the loss closure for ``nnx.Optimizer.update`` and a training step."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
from flax import nnx

from sam_optax._core.closure import scalar_loss

# Recent Flax calls `nnx.pure` `nnx.as_pure` and deprecates the old name.
_as_pure = getattr(nnx, "as_pure", None) or nnx.pure


def nnx_loss_fn(
    model: nnx.Module, loss_fn: Callable[..., Any], *args: Any
) -> Callable[[nnx.State], Any]:
  """Builds the SAM closure ``params -> loss_fn(copy_of_model, *args)`` for NNX.

  ``nnx.Optimizer.update(model, grads, loss_fn=closure)`` forwards the
  closure to ``tx.update``, which calls it with the parameters as a pure
  ``nnx.State`` (the variables selected by the optimizer's ``wrt``) at the
  perturbed point. The closure rebuilds a copy of ``model`` with
  ``nnx.merge`` from a snapshot of all of its state taken when the closure is
  built, puts the given parameters in, and evaluates ``loss_fn`` on the copy:

  * the perturbed pass never writes to ``model``: its BatchNorm statistics,
    RNG counters and any other variable updates stay in the discarded copy;
  * the copy's RNG streams start where ``model``'s stood at the snapshot,
    so when the closure is built **before** the clean pass, the perturbed
    pass draws the same dropout masks as the clean pass.

  Graph nodes among ``args`` (an ``nnx.Rngs`` passed to the model, another
  module) are snapshotted together with ``model``, shared references
  included. Other arguments are used as they are. Works eagerly and inside
  ``nnx.jit``.

  Args:
    model: the NNX module being trained, in the state it has before the clean
      pass.
    loss_fn: ``loss_fn(model, *args)`` returning a scalar loss or a
      ``(loss, aux)`` pair; ``aux`` is discarded by the SAM transform.
    *args: passed to ``loss_fn`` after the model, typically the batch.

  Returns:
    A function of the parameters (an ``nnx.State`` of pure arrays or of
    variables, with the paths of ``nnx.state(model, wrt)``) returning what
    ``loss_fn`` returns on the copy.

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
    ...   closure = sam_optax.flax.nnx_loss_fn(model, mse, x, y)  # before the clean pass
    ...   loss, grads = nnx.value_and_grad(mse)(model, x, y)       # updates BatchStats
    ...   optimizer.update(model, grads, loss_fn=closure)
    ...   return loss
    >>> loss = train_step(model, optimizer, jnp.ones((4, 2)), jnp.zeros((4, 1)))
    >>> int(model.dropout.rngs.count[...])   # one clean pass drew one key
    1
  """
  caller = "nnx_loss_fn"
  if not nnx.graph.is_graph_node(model):
    raise TypeError(
        f"`{caller}`: `model` must be an NNX module (or another graph node);"
        f" got {type(model).__name__}. The arguments are"
        " `nnx_loss_fn(model, loss_fn, *args)`."
    )
  if not callable(loss_fn):
    raise TypeError(
        f"`{caller}`: `loss_fn` must be callable as `loss_fn(model, *args)`;"
        f" got {type(loss_fn).__name__}."
    )
  leaves, treedef = jax.tree.flatten(args, is_leaf=nnx.graph.is_graph_node)
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
    return loss_fn(copy, *jax.tree.unflatten(treedef, copied))

  return closure


def nnx_train_step(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Builds a SAM training step ``train_step(model, optimizer, *args) -> out``.

  ``train_step(model, optimizer, *args, sam_pass=None)`` also takes
  ``sam_pass``, a Python bool (or ``None``: the transform decides) handed to
  ``tx.update``; with ``nnx.jit(train_step, static_argnames="sam_pass")`` the
  loop chooses between two compiled steps (see :func:`sam_optax.sam`).

  The step snapshots the model with :func:`nnx_loss_fn`, runs the clean pass
  ``nnx.value_and_grad(loss_fn)`` with respect to ``optimizer.wrt`` (which
  updates the model's BatchNorm statistics and advances its RNG streams
  once), and calls ``optimizer.update(model, grads, loss_fn=closure)``, whose
  perturbed pass reuses the same dropout masks and leaves the model's
  non-parameter variables alone. It returns what ``loss_fn`` returned on the
  clean pass. Wrap it in ``nnx.jit``. The clean pass differentiates with
  respect to ``nnx.DiffState(0, optimizer.wrt)``, which needs NNX's graph
  mode (the default).

  Args:
    loss_fn: ``loss_fn(model, *args)`` returning a scalar loss or a
      ``(loss, aux)`` pair. Put the model in training mode
      (``model.train()``) before training.

  Returns:
    ``train_step(model, optimizer, *args)``, where ``optimizer`` is an
    ``nnx.Optimizer`` of ``model`` whose ``tx`` contains a sharpness-aware
    transform (or any other optax transformation: the closure is then
    ignored).

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
    >>> train_step = nnx.jit(sam_optax.flax.nnx_train_step(mse))
    >>> loss = train_step(model, optimizer, jnp.ones((4, 2)), jnp.zeros((4, 1)))
    >>> int(optimizer.step[...])
    1
  """
  caller = "nnx_train_step"
  if not callable(loss_fn):
    raise TypeError(
        f"`{caller}`: `loss_fn` must be callable as `loss_fn(model, *args)`;"
        f" got {type(loss_fn).__name__}."
    )

  def with_loss(model: nnx.Module, *args: Any) -> tuple[jax.Array, Any]:
    out = loss_fn(model, *args)
    return scalar_loss(caller, out), out

  def train_step(
      model: nnx.Module,
      optimizer: nnx.Optimizer,
      *args: Any,
      sam_pass: Optional[bool] = None,
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
    closure = nnx_loss_fn(model, loss_fn, *args)
    value_and_grad = nnx.value_and_grad(
        with_loss, argnums=nnx.DiffState(0, optimizer.wrt), has_aux=True
    )
    (_, out), grads = value_and_grad(model, *args)
    extra = {} if sam_pass is None else {"sam_pass": sam_pass}
    optimizer.update(model, grads, loss_fn=closure, **extra)
    return out

  return train_step
