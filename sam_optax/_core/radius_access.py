"""Reading and setting the radius of a sharpness-aware transform in any state.

``get_rho`` and ``set_rho`` find the first sharpness-aware transform of an
optimizer state (in a chain, ``optax.inject_hyperparams``, ``MultiSteps`` or
any other wrapper), as :func:`~sam_optax.sam_stats` does. The radius can be
set where it lives in the state, so the compiled step is reused:

* ``optax.inject_hyperparams(sam_optax.sam)(rho=...)``: the injected value;
* ``rho="auto"``: the controller's radius, from which it goes on adapting.

A number or schedule given at construction is part of the program; setting
it needs one of the two forms above.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax._core.builder import SAMState
from sam_optax._core.radius import RadiusState
from sam_optax._core.stats import first_node

_Inject = optax.InjectStatefulHyperparamsState


def _is_sam(x: Any) -> bool:
  return isinstance(x, SAMState)


def _is_node(x: Any) -> bool:
  if isinstance(x, _Inject):
    inner = first_node(x.inner_state, _is_sam)
    return "rho" in x.hyperparams and inner is not None
  return _is_sam(x)


def _first(opt_state: Any) -> Any:
  return first_node(opt_state, _is_node)


def _auto_flag(state: SAMState) -> Any:
  """``SAMState.radius.auto`` (True for ``rho="auto"``), or None without one."""
  return state.radius.auto if isinstance(state.radius, RadiusState) else None


def get_rho(opt_state: Any) -> jax.Array:
  """The radius of the first sharpness-aware transform in ``opt_state``.

  For an injected ``rho`` the injected value; for ``rho="auto"`` the radius
  the next step uses; otherwise (a number, a schedule, ``guarded``) the
  radius in force at the last step, ``sam_stats(opt_state).rho``.

  Examples:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> tx = optax.chain(optax.inject_hyperparams(sam_optax.sam)(rho=0.1),
    ...                  optax.sgd(0.1))
    >>> state = sam_optax.set_rho(tx.init(jnp.zeros(3)), 0.2)
    >>> round(float(sam_optax.get_rho(state)), 4)
    0.2
  """
  node = _first(opt_state)
  if node is None:
    raise ValueError(
        "`get_rho`: this optimizer state holds no sharpness-aware transform."
    )
  if isinstance(node, _Inject):
    return jnp.asarray(node.hyperparams["rho"])
  flag = _auto_flag(node)
  if flag is None:
    return node.stats.rho
  return jnp.where(flag, jnp.exp(node.radius.log_scale), node.stats.rho)


def set_rho(opt_state: Any, value: Any) -> Any:
  """``opt_state`` with the radius of its first sharpness-aware transform set.

  Works for an injected ``rho`` (``optax.inject_hyperparams``) and for
  ``rho="auto"`` (the controller goes on adapting from ``value``). The value
  keeps the state's dtype, so a jitted step is not recompiled.

  Raises:
    ValueError: if the state holds no sharpness-aware transform, or its
      radius is a constant of the program (a number or a schedule given at
      construction), naming the forms that can be set.
  """
  node = _first(opt_state)
  if node is None:
    raise ValueError(
        "`set_rho`: this optimizer state holds no sharpness-aware transform."
    )
  if isinstance(node, _Inject):
    old = node.hyperparams["rho"]
    hp = {**node.hyperparams, "rho": jnp.asarray(value, jnp.result_type(old))}
    new = node._replace(hyperparams=hp)
  elif _auto_flag(node) is not None and (
      isinstance(node.radius.auto, jax.core.Tracer) or bool(node.radius.auto)
  ):
    r = node.radius
    log_scale = jnp.where(
        r.auto, jnp.log(jnp.asarray(value, jnp.float32)), r.log_scale
    )
    new = node._replace(radius=r._replace(log_scale=log_scale))
  else:
    raise ValueError(
        "`set_rho`: this transform's `rho` is a constant of the compiled"
        " step. To change it during training, build the transform with"
        " `optax.inject_hyperparams(sam_optax.sam)(rho=...)` (then"
        " `set_rho` changes the injected value without recompiling), or"
        ' use `rho="auto"`. A `guarded` radius keeps its own factor.'
    )
  done = []

  def swap(x):
    if not done and x is node:
      done.append(True)
      return new
    return x

  return jax.tree.map(swap, opt_state, is_leaf=_is_node)
