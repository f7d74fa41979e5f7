"""A Linen ``TrainState`` whose ``apply_gradients`` forwards the loss closure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax.numpy as jnp
import optax
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.training import train_state

from sam_optax import sam_stats

_CALL = """\
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads=grads, loss_fn=loss_fn)

where `loss_fn(params)` returns the loss on the current batch (or a
`(loss, aux)` pair), with the same dropout keys as the clean pass. For models
with BatchNorm or dropout, `sam_optax.flax.linen_train_step` builds the whole
step."""


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` that can carry a SAM closure.

  Flax's ``apply_gradients(grads=..., **kwargs)`` treats every keyword
  argument as a field to replace, so a loss closure cannot reach
  ``tx.update``. This subclass takes ``loss_fn`` and ``grad_fn`` as keyword
  arguments and forwards them to ``tx.update``; every other keyword argument
  replaces a field, as in Flax. It adds no field, so it is a drop-in
  replacement, and subclasses may add fields (``batch_stats`` and so on) as
  usual.

  Without ``loss_fn`` and ``grad_fn``, ``apply_gradients`` is Flax's. With
  them and a ``tx`` that contains no sharpness-aware transform, the closures
  are ignored.

  :meth:`TrainState.create` stores ``step`` as an int32 array rather than Flax's Python
  ``0``, so a jitted step compiles once for a fresh state, after the first
  step, and for a restored state alike. (Orbax restores arrays committed to
  a device, which ``jax.jit`` also keys on: to reuse the step compiled
  before a restore, place the fresh state with
  ``jax.device_put(state, device)``.)

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> import flax.linen as nn
    >>> from sam_optax.flax import TrainState
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tx = optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1))
    >>> state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    >>> def loss_fn(params):
    ...   return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)
    >>> loss, grads = jax.value_and_grad(loss_fn)(state.params)
    >>> state = state.apply_gradients(grads=grads, loss_fn=loss_fn)
    >>> int(state.step), bool(loss_fn(state.params) < loss)
    (1, True)
  """

  @classmethod
  def create(
      cls, *, apply_fn: Any, params: Any, tx: Any, **kwargs: Any
  ) -> "TrainState":
    """Creates a state at step 0, as Flax's ``create``, with ``step`` an array.

    Args:
      apply_fn: the model's apply function, usually ``model.apply``.
      params: the parameters to train.
      tx: the optax transformation; ``opt_state`` is ``tx.init(params)``.
      **kwargs: the other fields of a subclass, for example
        ``batch_stats=variables["batch_stats"]``.

    Returns:
      The state, with ``step`` a scalar int32 array equal to 0 (Flax stores
      the Python int ``0``, which the first ``apply_gradients`` or an orbax
      restore turns into an array, a second compilation of a jitted step).
    """
    state = super().create(apply_fn=apply_fn, params=params, tx=tx, **kwargs)
    return state.replace(step=jnp.zeros((), jnp.int32))

  def apply_gradients(
      self,
      *,
      grads: Any,
      loss_fn: Optional[Callable[..., Any]] = None,
      grad_fn: Optional[Callable[[Any], Any]] = None,
      sam_pass: Optional[bool] = None,
      **kwargs: Any,
  ) -> "TrainState":
    """Applies one optimizer step; forwards ``loss_fn`` / ``grad_fn`` to ``tx``.

    Args:
      grads: the clean gradient at ``self.params``, with the structure of
        ``self.params``.
      loss_fn: ``params -> loss`` or ``params -> (loss, aux)`` on the current
        batch, passed to ``tx.update(..., loss_fn=loss_fn)``.
      grad_fn: ``params -> grads``, passed to
        ``tx.update(..., grad_fn=grad_fn)``, for callers that build gradients
        themselves. Pass at most one of ``loss_fn`` and ``grad_fn``.
      sam_pass: ``None``, or a Python bool that decides whether the
        perturbed pass runs at this step (see :func:`sam_optax.sam`),
        passed to ``tx.update(..., sam_pass=sam_pass)``.
      **kwargs: fields to replace, for example ``batch_stats=...``.

    Returns:
      A new state with ``step`` incremented by one, ``params`` and
      ``opt_state`` updated, and the fields in ``kwargs`` replaced.

    Raises:
      TypeError: if ``tx`` contains a sharpness-aware transform and neither
        ``loss_fn`` nor ``grad_fn`` was given.
    """
    if loss_fn is None and grad_fn is None:
      if sam_stats(self.opt_state) is not None:
        raise TypeError(
            "`TrainState.apply_gradients`: `tx` contains a sharpness-aware"
            " transform, which needs a loss closure to evaluate the gradient"
            " at the perturbed parameters, but neither `loss_fn` nor `grad_fn`"
            " was given. Pass it as a keyword argument:\n\n" + _CALL
        )
      return super().apply_gradients(grads=grads, **kwargs)
    if isinstance(grads, Mapping) and OVERWRITE_WITH_GRADIENT in grads:
      raise NotImplementedError(
          "`TrainState.apply_gradients`: `loss_fn`/`grad_fn` cannot be"
          f" combined with the fp8 `{OVERWRITE_WITH_GRADIENT}` collection in"
          " `params`."
      )
    closures = {"loss_fn": loss_fn} if loss_fn is not None else {}
    if grad_fn is not None:
      closures["grad_fn"] = grad_fn
    if sam_pass is not None:
      closures["sam_pass"] = sam_pass
    tx = self.tx
    if not isinstance(tx, optax.GradientTransformationExtraArgs):
      tx = optax.with_extra_args_support(tx)
    updates, new_opt_state = tx.update(
        grads, self.opt_state, self.params, **closures
    )
    return self.replace(
        step=self.step + 1,
        params=optax.apply_updates(self.params, updates),
        opt_state=new_opt_state,
        **kwargs,
    )
