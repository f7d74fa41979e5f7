"""Policies: on which steps the perturbed forward/backward pass runs.

Each factory returns a :class:`Policy` for :func:`sam_optax.sharpness_aware`,
or ``None`` for "every step" (which lets a constant ρ skip the branch
machinery entirely). Skipped steps use the direction's fallback, and the
pass is not executed there (``jax.lax.switch`` runs one branch).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import tree, validation

__all__ = (
    "AESAMState",
    "Policy",
    "adaptive",
    "ae_sam_threshold_coefficient",
    "every",
    "every_step",
)

PyTree = Any


class Policy(NamedTuple):
  """Decides whether the perturbed pass runs.

  Attributes:
    init: ``params -> state``.
    gate: ``(g, params, state, count) -> (take, state)`` with a boolean scalar.
  """

  init: Callable[[PyTree], PyTree]
  gate: Callable[..., tuple[Any, PyTree]]


def every_step() -> Optional[Policy]:
  """Take the perturbed pass on every step (SAM); returns ``None``."""
  return None


def every(k: int) -> Policy:
  """Take the pass on steps 0, k, 2k, ... (LookSAM's schedule)."""
  validation.check_int("every", "k", k, low=1)

  def gate(g, params, state, count):
    del g, params
    return count % k == 0, state

  return Policy(lambda params: optax.EmptyState(), gate)


class AESAMState(NamedTuple):
  """AE-SAM's policy state (``SAMState.variant.policy``), in float32.

  Attributes:
    mean: exponential moving average :math:`\\mu_t` of the squared clean
      gradient norm :math:`\\|g_t\\|^2`, including the last step.
    var: exponential moving average :math:`\\sigma^2_t` of its squared
      deviation from the mean.
  """

  mean: jax.Array
  var: jax.Array


def ae_sam_threshold_coefficient(
    count: Any, lambda_start: Any, lambda_end: Any, total_steps: Any
) -> jax.Array:
  """``c_t``: linear from ``lambda_start`` at step 0 to ``lambda_end``.

  It reaches ``lambda_end`` at step ``total_steps`` and stays there.
  Computed in float32.
  """
  frac = jnp.minimum(
      jnp.asarray(count, jnp.float32) / jnp.asarray(total_steps, jnp.float32),
      1.0,
  )
  start = jnp.asarray(lambda_start, jnp.float32)
  end = jnp.asarray(lambda_end, jnp.float32)
  return start + (end - start) * frac


def adaptive(
    delta: float = 0.9,
    lambda_start: float = 1.0,
    lambda_end: float = -1.0,
    *,
    total_steps: int,
) -> Policy:
  r"""AE-SAM's policy: take the pass when :math:`\|g_t\|^2 \ge \mu_t + c_t \sigma_t`.

  :math:`\mu_t = \delta \mu_{t-1} + (1-\delta)\|g_t\|^2` and
  :math:`\sigma_t^2 = \delta \sigma_{t-1}^2 + (1-\delta)(\|g_t\|^2 - \mu_t)^2`
  (both from 0); :math:`c_t` moves linearly from ``lambda_start`` to
  ``lambda_end`` over ``total_steps`` (required: the length of the
  training run, in steps).
  """
  validation.check_scalar(
      "ae_sam", "delta", delta, low=0.0, high=1.0, high_inclusive=False
  )
  for name, value in (("lambda_start", lambda_start), ("lambda_end", lambda_end)):
    validation.check_scalar("ae_sam", name, value)
  validation.check_int("ae_sam", "total_steps", total_steps, low=1)

  def init(params: Any) -> AESAMState:
    del params
    zero = jnp.zeros((), jnp.float32)
    return AESAMState(mean=zero, var=zero)

  def gate(g: Any, params: Any, state: AESAMState, count: jax.Array):
    del params
    sq = jnp.square(tree.global_norm(g)).astype(jnp.float32)
    d = jnp.asarray(delta, jnp.float32)
    mean = d * state.mean + (1 - d) * sq
    var = d * state.var + (1 - d) * jnp.square(sq - mean)
    c = ae_sam_threshold_coefficient(count, lambda_start, lambda_end, total_steps)
    take = sq >= mean + c * jnp.sqrt(var)
    return take, AESAMState(mean=mean, var=var)

  return Policy(init, gate)
