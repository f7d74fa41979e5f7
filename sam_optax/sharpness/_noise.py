"""Robustness to weight noise at inference: a metric under random weight noise."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._core import masking
from sam_optax.sharpness import _common

PyTree = Any
NOISE_MODELS = ("layer_max", "multiplicative", "absolute")


class NoiseRobustnessResult(NamedTuple):
  """Result of :func:`weight_noise_robustness`.

  Attributes:
    levels: the noise levels :math:`\\sigma`, shape ``(L,)``.
    mean: the metric's mean over the draws at each level, shape ``(L,)``.
    std: its standard deviation over the draws (ddof 1), shape ``(L,)``.
    std_error: the standard error of ``mean``, shape ``(L,)``.
    values: every draw, shape ``(L, num_draws)``; draw ``j`` uses the same
      standard-normal sample at every level.
    clean: the metric without noise.
    noise: the noise model.
  """

  levels: jax.Array
  mean: jax.Array
  std: jax.Array
  std_error: jax.Array
  values: jax.Array
  clean: jax.Array
  noise: str

  def __repr__(self) -> str:
    return _common.summary_repr(type(self).__name__, [
        ("noise", repr(self.noise)),
        ("levels", _common.format_array(self.levels, max_items=6)),
        ("mean", _common.format_array(self.mean, max_items=6)),
        ("std_error", _common.format_array(self.std_error, max_items=6)),
        ("clean", _common.format_array(self.clean)),
        ("values", _common.format_array(self.values)),
    ])


def weight_noise_robustness(
    metric_fn: Callable[[PyTree], Any],
    params: PyTree,
    levels: Sequence[float],
    *,
    key: jax.Array,
    noise: str = "layer_max",
    num_draws: int = 32,
    mask: masking.MaskOrFn = None,
    batch_size: Optional[int] = 8,
) -> NoiseRobustnessResult:
  r"""A metric of the model under random noise on its weights, per noise level.

  Models the weights an analog in-memory accelerator computes with: each
  draw perturbs every selected leaf :math:`W` with standard normal
  :math:`Z` and evaluates ``metric_fn`` there; the draws are averaged per
  level :math:`\sigma`. Noise models:

  * ``"layer_max"`` (default): :math:`\tilde W = W + \sigma \max|W|\, Z`,
    additive noise scaled per leaf by its largest magnitude, as when a
    layer's weight range is mapped onto a device's conductance range;
  * ``"multiplicative"``: :math:`\tilde W = W \odot (1 + \sigma Z)`;
  * ``"absolute"``: :math:`\tilde W = W + \sigma Z`.

  Draw :math:`j` uses the same :math:`Z` at every level (common random
  numbers), so the curves of two models measured with the same ``key``
  differ by the models, not by the draws. Everything runs in one compiled
  program, the draws ``vmap``-ed in chunks of ``batch_size``.

  Args:
    metric_fn: ``params -> scalar``, for instance the test accuracy or the
      loss on a fixed batch (close over data, model state and keys); a
      ``(value, aux)`` pair is accepted, ``aux`` dropped.
    params: the trained parameters.
    levels: the noise levels :math:`\sigma \ge 0` (0 gives the clean value).
    key: a ``jax.random`` key for the draws.
    noise: ``"layer_max"``, ``"multiplicative"`` or ``"absolute"``.
    num_draws: draws per level, at least 1.
    mask: which leaves are noisy: ``None`` (all), a pytree of booleans with
      the structure of ``params``, or a callable ``params -> pytree``.
    batch_size: draws evaluated at once with ``vmap`` inside
      ``jax.lax.map``; ``None`` evaluates them one after another.

  Returns:
    A :class:`NoiseRobustnessResult`; plot it with
    :func:`plot_noise_robustness`.

  Examples:
    A linear model's loss under noise on its weights grows as
    :math:`\sigma^2 \sum_i (\max|w|\, x_i)^2`:

    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> x = jnp.array([1.0, 2.0, -1.0])
    >>> metric_fn = lambda w: (w @ x - 1.0) ** 2
    >>> w = jnp.array([0.5, 0.5, 0.5])       # w @ x = 1: the clean loss is 0
    >>> res = sharpness.weight_noise_robustness(
    ...     metric_fn, w, [0.0, 0.1], key=jax.random.key(0), num_draws=4000)
    >>> float(res.mean[0])
    0.0
    >>> bool(abs(res.mean[1] - 0.01 * 0.25 * 6.0) < 4 * res.std_error[1])
    True
  """
  caller = "weight_noise_robustness"
  _common.check_loss_fn(caller, metric_fn)
  _common.check_float_leaves(caller, params)
  _common.check_choice(caller, "noise", noise, NOISE_MODELS)
  num_draws = _common.check_int(caller, "num_draws", num_draws, low=1)
  if batch_size is not None:
    batch_size = _common.check_int(caller, "batch_size", batch_size, low=1)
  try:
    sigmas = np.asarray(levels, dtype=float)
  except (TypeError, ValueError) as err:
    raise ValueError(
        f"`{caller}`: `levels` must be a sequence of numbers, got {levels!r}."
    ) from err
  if sigmas.ndim != 1 or not sigmas.size:
    raise ValueError(
        f"`{caller}`: `levels` must be a non-empty 1-D sequence of noise"
        f" levels, got shape {sigmas.shape}."
    )
  if not np.all(np.isfinite(sigmas)) or np.any(sigmas < 0):
    raise ValueError(
        f"`{caller}`: every noise level must be finite and >= 0; got"
        f" levels={sigmas.tolist()}."
    )
  selected = masking.resolve(caller, "mask", mask, params)
  selected = jax.tree.map(lambda m: jnp.asarray(m, bool), selected)
  dtype = _common.loss_dtype(params)
  figures = _robustness(
      metric_fn, params, jnp.asarray(sigmas, dtype), key, selected,
      noise=noise, num_draws=num_draws, batch_size=batch_size,
  )
  return NoiseRobustnessResult(*figures, noise)


def _scale(w: jax.Array, noise: str) -> jax.Array:
  """The per-element standard deviation of the noise for unit sigma."""
  a = jnp.abs(w)
  if noise == "layer_max":
    return jnp.broadcast_to(jnp.max(a, initial=0.0), w.shape)
  if noise == "multiplicative":
    return w  # W (1 + s Z) = W + s W Z
  return jnp.ones_like(w)


@functools.partial(
    jax.jit, static_argnames=("metric_fn", "noise", "num_draws", "batch_size")
)
def _robustness(metric_fn, params, sigmas, key, selected, *, noise, num_draws,
                batch_size):
  metric = _common.scalar_loss("weight_noise_robustness", metric_fn)
  dtype = sigmas.dtype
  wide = jax.tree.map(lambda w: w.astype(jnp.promote_types(w.dtype, dtype)), params)
  scale = jax.tree.map(
      lambda w, m: jnp.where(m, _scale(w, noise), 0).astype(w.dtype), wide, selected
  )

  def one(k):
    z = _common.normal_like(k, params)

    def at(sigma):
      noisy = jax.tree.map(
          lambda w, s, zi, p: (w + sigma.astype(w.dtype) * s * zi.astype(w.dtype)
                               ).astype(p.dtype),
          wide, scale, z, params,
      )
      return metric(noisy).astype(dtype)

    return jax.lax.map(at, sigmas)

  values = jax.lax.map(one, jax.random.split(key, num_draws), batch_size=batch_size)
  values = values.T  # (levels, draws)
  mean = jnp.mean(values, axis=1)
  if num_draws > 1:
    std = jnp.std(values, axis=1, ddof=1)
  else:
    std = jnp.zeros_like(mean)
  std_error = std / math.sqrt(num_draws)
  clean = metric(params).astype(dtype)
  return sigmas, mean, std, std_error, values, clean
