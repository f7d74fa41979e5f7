"""Per-step diagnostics that sharpness-aware transforms keep in their state."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp


class SAMStats(NamedTuple):
  """What the last ``update`` measured, at no extra forward or backward pass.

  Attributes:
    grad_norm: global L2 norm of the clean gradient ``g`` received by
      ``update``.
    perturbed_grad_norm: global L2 norm of the gradient returned by
      ``update`` (the sharpness-aware direction).
    perturbed_loss: the loss at the perturbed parameters ``w + ε``, when a
      ``loss_fn`` was given and the perturbed pass ran; 0 otherwise (with
      ``grad_fn``, or on steps without a sharpness-aware pass, such as
      ``rho == 0``).
    rho: the perturbation radius used at that step.
    pass_taken: 1.0 if the step was sharpness-aware: the perturbed
      forward/backward pass ran with ``rho > 0`` and gave a finite gradient;
      0.0 otherwise (``rho == 0``, a step skipped by a variant's own schedule
      such as LookSAM's or by ``sam_pass=False``, or a non-finite result).
      Its mean over steps is the fraction of SAM steps.
    grad_change: with ``rho="auto"`` or :func:`~sam_optax.guarded`, the
      gradient change ``‖g_p - g‖ / ‖g‖`` measured at that step (0 without
      a controller, or on steps without a pass).
    backoffs: with ``rho="auto"`` or :func:`~sam_optax.guarded`, the number
      of times the radius has backed off so far; 0 otherwise.
  """

  grad_norm: jax.Array
  perturbed_grad_norm: jax.Array
  perturbed_loss: jax.Array
  rho: jax.Array
  pass_taken: jax.Array
  grad_change: jax.Array
  backoffs: jax.Array

  @classmethod
  def zeros(cls) -> "SAMStats":
    z = jnp.zeros((), jnp.float32)
    return cls(*(z for _ in cls._fields))

  def as_dict(self) -> dict[str, float]:
    """The stats as Python floats, for a logger (one device-to-host copy each)."""
    return {k: float(_unwrap(v)) for k, v in zip(self._fields, self)}

  @classmethod
  def of(cls, **values: Any) -> "SAMStats":
    """Builds stats from scalars (missing ones 0), stored as float32."""
    return cls(**{
        k: jnp.asarray(values.get(k, 0.0)).astype(jnp.float32)
        for k in cls._fields
    })


def sam_stats(opt_state: Any, *, missing: str = "none") -> Optional[SAMStats]:
  """Finds the :class:`SAMStats` of the first sharpness-aware transform in a state.

  Works on the state of any chain, ``optax.inject_hyperparams``,
  ``optax.MultiSteps`` or other wrapper, since it searches the state pytree,
  and on a Flax NNX ``optimizer.opt_state``.

  Args:
    opt_state: an optimizer state, for example ``tx.init(params)``.
    missing: what a state without a sharpness-aware transform gives:
      ``"none"`` (default) ``None``; ``"zeros"`` stats of zeros, so that a
      logging loop runs unchanged on a plain-optimizer baseline; ``"raise"``
      a ``ValueError``.

  Returns:
    The stats of the first sharpness-aware transform found (see
    :meth:`sam_optax.SAMStats.as_dict` for a logger), or as ``missing`` says.

  Examples:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> tx = optax.chain(sam_optax.sam(rho=0.1), optax.sgd(0.1))
    >>> params = jnp.array([3.0, 4.0])
    >>> loss_fn = lambda w: 0.5 * jnp.sum(w ** 2)
    >>> state = tx.init(params)
    >>> _, state = tx.update(params, state, params, loss_fn=loss_fn)
    >>> float(sam_optax.sam_stats(state).grad_norm)
    5.0
  """
  found = first_node(opt_state, lambda x: isinstance(x, SAMStats))
  if found is None:
    if missing == "zeros":
      return SAMStats.zeros()
    if missing == "raise":
      raise ValueError(
          "`sam_stats`: this optimizer state holds no sharpness-aware"
          " transform. Put one in the chain, e.g."
          " `optax.chain(sam_optax.sam(rho), base)`, or pass"
          " `missing=\"zeros\"` to log zeros for a plain optimizer."
      )
    if missing != "none":
      raise ValueError(
          '`sam_stats`: `missing` must be "none", "zeros" or "raise"; got'
          f" missing={missing!r}."
      )
    return None
  # Flax NNX keeps each array of `optimizer.opt_state` in a variable.
  return SAMStats(*(_unwrap(x) for x in found))


def first_node(tree: Any, is_node: Callable[[Any], bool]) -> Any:
  """The first subtree of ``tree`` (in leaf order) for which ``is_node`` holds."""
  for x in jax.tree.leaves(tree, is_leaf=is_node):
    if is_node(x):
      return x
  return None


def _unwrap(x: Any) -> Any:
  get_value = getattr(x, "get_value", None)  # an NNX variable
  return get_value() if callable(get_value) else x
