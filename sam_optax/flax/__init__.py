"""Flax integration: Linen ``TrainState`` and NNX ``Optimizer`` with SAM.

A sharpness-aware step evaluates the loss twice on the same batch: once at
the parameters ``w`` (the clean pass) and once at ``w + ε`` (the perturbed
pass, run inside ``tx.update``). With BatchNorm and dropout, the two passes
must agree on what is random and disagree on what is kept:

* the same dropout masks (the same random keys) in both passes;
* BatchNorm statistics (and any other mutable state) from the clean pass
  only; the perturbed pass's are thrown away.

The helpers here build the closures and training steps that do so. The
loss is written against the model, ``model_loss(model, *args, **kwargs)``,
where ``model(x)`` applies the network; the helpers turn it into the
``params -> loss`` closure that ``tx.update(..., loss_fn=...)`` takes
(:func:`linen_closure`, :func:`nnx_closure`), or into a whole step.

Linen::

    state = TrainState.create(apply_fn=model.apply, params=..., tx=tx,
                              batch_stats=...)   # a subclass with the field
    train_step = jax.jit(sam_optax.flax.linen_train_step(model_loss))
    state, loss = train_step(state, x, y, key=key)

NNX::

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    train_step = nnx.jit(sam_optax.flax.nnx_train_step(model_loss))
    loss = train_step(model, optimizer, x, y)

Extra keyword arguments of a step reach ``model_loss``
(``train_step(state, x, y, key=key, mask=mask)``), and
``with_stats=True`` makes the step also return the
:class:`sam_optax.SAMStats` of the update. ``linen_loss_fn`` and
``nnx_loss_fn`` are deprecated names of :func:`linen_closure` and
:func:`nnx_closure`.

After ``import sam_optax``, ``sam_optax.flax`` imports this module on first
use. Importing this module requires Flax: ``pip install "sam_optax[flax]"``.
"""

try:
  import flax as _flax  # noqa: F401
except ImportError as _error:  # pragma: no cover - exercised without flax only
  raise ImportError(
      "`sam_optax.flax` needs Flax, which is not installed. Install it with"
      ' `pip install "sam_optax[flax]"` (or `pip install flax`).'
  ) from _error

from sam_optax.flax._linen import linen_closure, linen_loss_fn, linen_train_step
from sam_optax.flax._nnx import nnx_closure, nnx_loss_fn, nnx_train_step
from sam_optax.flax._train_state import TrainState

__all__ = (
    "TrainState",
    "linen_closure",
    "linen_loss_fn",  # deprecated: linen_closure
    "linen_train_step",
    "nnx_closure",
    "nnx_loss_fn",  # deprecated: nnx_closure
    "nnx_train_step",
)
