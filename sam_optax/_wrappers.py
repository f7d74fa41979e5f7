"""Convenience forms that bundle a sharpness-aware transform with an optimizer."""

from __future__ import annotations

from typing import Any

import optax

from sam_optax._transforms.sam import ScalarOrSchedule, sam


def with_sam(
    optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    **sam_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``optimizer`` so that it descends along the SAM gradient.

  Shorthand for ``optax.chain(sam_optax.sam(rho, **sam_kwargs), optimizer)``;
  the chain form is the primitive and composes with anything else.

  Choosing rho: ``rho`` is SAM's radius itself, handed to
  :func:`sam_optax.sam`: 0.05 by default, as in Foret et al. (2021), who use
  0.1 for fine-tuning; see :func:`sam_optax.sam`.

  Args:
    optimizer: the base optimizer, for example ``optax.adamw(1e-3)``.
    rho: perturbation radius or schedule, passed to :func:`sam_optax.sam`.
    **sam_kwargs: further keyword arguments of :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=`` or ``grad_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = sam_optax.with_sam(optax.adam(0.1), rho=0.05)
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> for _ in range(100):
    ...   grads = jax.grad(loss_fn)(params)
    ...   updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(jnp.allclose(params, 1.0, atol=0.05))
    True
  """
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
        "`with_sam`: `optimizer` must be an optax.GradientTransformation, for"
        f" example `optax.sgd(0.1)`; got {type(optimizer).__name__}."
    )
  return optax.chain(sam(rho, **sam_kwargs), optimizer)
