"""Sharpness as a loss increase: worst case, adaptive, average case, m-sharpness."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._core import tree, validation
from sam_optax.sharpness import _common

PyTree = Any


class SharpnessResult(NamedTuple):
  """Result of :func:`worst_case_sharpness`.

  Attributes:
    sharpness: :math:`L(w + \\epsilon^*) - L(w)`, the largest loss increase
      found.
    loss: :math:`L(w)`.
    perturbed_loss: :math:`L(w + \\epsilon^*)`.
    perturbation: :math:`\\epsilon^*`, a pytree like ``params``.
  """

  sharpness: jax.Array
  loss: jax.Array
  perturbed_loss: jax.Array
  perturbation: PyTree

  def __repr__(self) -> str:
    return _common.summary_repr(type(self).__name__, [
        ("sharpness", _common.format_array(self.sharpness)),
        ("loss", _common.format_array(self.loss)),
        ("perturbed_loss", _common.format_array(self.perturbed_loss)),
        ("perturbation", _common.format_tree(self.perturbation)),
    ])


def _check_common(caller, loss_fn, params, rho, num_steps, step_size, eta):
  _common.check_loss_fn(caller, loss_fn)
  _common.check_float_leaves(caller, params)
  validation.check_scalar(caller, "rho", rho, low=0.0)
  num_steps = _common.check_int(caller, "num_steps", num_steps, low=0)
  validation.check_scalar(caller, "step_size", step_size, low=0.0, low_inclusive=False)
  validation.check_scalar(caller, "eta", eta, low=0.0)
  return num_steps


def worst_case_sharpness(
    loss_fn: _common.LossFn,
    params: PyTree,
    rho: float,
    *,
    num_steps: int = 20,
    step_size: float = 1.0,
    adaptive: bool = False,
    eta: float = 0.01,
    key: Optional[jax.Array] = None,
) -> SharpnessResult:
  r"""Worst-case :math:`\rho`-sharpness by projected gradient ascent.

  .. math::

    S_\rho(w) = \max_{\|T_w^{-1}\epsilon\|_2 \le \rho} L(w + \epsilon) - L(w),

  with :math:`T_w = I` (SAM's Euclidean ball) or, with ``adaptive=True``,
  :math:`T_w = \operatorname{diag}(|w| + \eta)` (ASAM's scale-invariant
  ball, element-wise over every leaf). In the variable
  :math:`\delta = T_w^{-1}\epsilon` the constraint is a ball of radius
  :math:`\rho`, and the ascent is

  .. math::

    \delta_0 = \rho\, \frac{T_w g}{\|T_w g\|}, \qquad
    \delta_{t+1} = \Pi_\rho\!\left(\delta_t + \text{step\_size}\cdot\rho\,
      \frac{T_w \nabla L(w + T_w\delta_t)}{\|T_w \nabla L(w + T_w\delta_t)\|}
    \right),

  where :math:`g = \nabla L(w)` and :math:`\Pi_\rho` projects onto the ball.
  :math:`\delta_0` is SAM's (ASAM's) perturbation; at a stationary point,
  where :math:`g = 0`, :math:`\delta_0` is a random direction on the sphere
  instead (drawn with ``key``, or with ``jax.random.key(0)`` when none is
  given). The result is the best of :math:`\epsilon = 0` and the
  ``num_steps + 1`` points visited, so it is never negative and always a
  lower bound on the true maximum; ``num_steps=0`` gives the one-step
  surrogate gap :math:`L(w + \hat\epsilon) - L(w)` of GSAM (clipped at 0). At a
  minimum of a quadratic with Hessian :math:`H` the answer is
  :math:`\rho^2 \lambda_{\max}(T_w H T_w) / 2`, and near any minimum
  :math:`S_\rho \approx \rho^2 \lambda_{\max} / 2`.

  Losses are evaluated in float32 or wider, but the difference of two losses
  loses precision when :math:`S_\rho` is tiny compared with :math:`L`
  (enable ``jax_enable_x64`` with float64 parameters for such cases).

  Args:
    loss_fn: ``params -> loss`` or ``params -> (loss, aux)``. Close over the
      batch (or the whole training set), fixed BatchNorm statistics and fixed
      dropout keys.
    params: the point :math:`w`.
    rho: the radius :math:`\rho \ge 0`; may be traced (for a ``vmap`` over
      radii, see :func:`sharpness_vs_rho`).
    num_steps: number of ascent steps after the first point, at least 0.
    step_size: the ascent step as a fraction of :math:`\rho`, positive.
      Large steps reach the sphere and turn along it quickly (on a quadratic
      at its minimum the iteration tends to power iteration as
      ``step_size`` → ∞, so it converges at the rate of the eigenvalue gap);
      small steps, such as 0.1, are safer when the maximum lies inside the
      ball. Raise ``num_steps`` when the top eigenvalues are close.
    adaptive: use ASAM's ball :math:`\|T_w^{-1}\epsilon\| \le \rho`.
    eta: the offset :math:`\eta \ge 0` in :math:`T_w = |w| + \eta`.
    key: optional ``jax.random`` key for the start at a stationary point.

  Returns:
    A :class:`SharpnessResult`.

  Raises:
    ValueError: if ``rho``, ``num_steps``, ``step_size`` or ``eta`` is out of
      range.

  Examples:
    At the minimum of a quadratic with :math:`\lambda_{\max} = 10`, the
    sharpness is :math:`\rho^2 \lambda_{\max}/2 = 0.05`:

    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 4.0, 10.0]) * w ** 2)
    >>> res = sharpness.worst_case_sharpness(loss_fn, jnp.zeros(3), rho=0.1)
    >>> round(float(res.sharpness), 5)
    0.05

  References:
    Foret, Kleiner, Mobahi, Neyshabur, *Sharpness-Aware Minimization for
    Efficiently Improving Generalization*, ICLR 2021.
    https://arxiv.org/abs/2010.01412

    Kwon, Kim, Park, Choi, *ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks*, ICML 2021.
    https://arxiv.org/abs/2102.11600

    Andriushchenko, Croce, Müller, Hein, Flammarion, *A Modern Look at the
    Relationship between Sharpness and Generalization*, ICML 2023.
    https://arxiv.org/abs/2302.07011
  """
  num_steps = _check_common(
      "worst_case_sharpness", loss_fn, params, rho, num_steps, step_size, eta
  )
  return _worst_case(
      loss_fn, params, jnp.asarray(rho), _random_start(key, params),
      jnp.asarray(step_size), jnp.asarray(eta), jnp.asarray(bool(adaptive)),
      num_steps=num_steps,
  )


def _random_start(key: Optional[jax.Array], params: PyTree) -> PyTree:
  """Gaussian noise like ``params`` for the start at a stationary point."""
  return _common.random_like(jax.random.key(0) if key is None else key, params)


def _scale(params: PyTree, adaptive: jax.Array, eta: jax.Array) -> PyTree:
  """The diagonal of :math:`T_w`: ``|w| + eta`` when ``adaptive``, else 1."""

  def leaf(p):
    wide = tree.wide_dtype(p.dtype)
    return jnp.where(adaptive, jnp.abs(p.astype(wide)) + eta.astype(wide), 1.0)

  return jax.tree.map(leaf, params)


def _ascent(loss_fn, params, rho, noise, step_size, eta, adaptive, *, num_steps):
  """The projected ascent of :func:`worst_case_sharpness`, not jitted.

  ``noise`` (a pytree like ``params``) gives the start direction where the
  gradient is zero. ``adaptive`` is a traced bool, so both balls share one
  compilation.
  """
  caller = "worst_case_sharpness"
  value_and_grad = jax.value_and_grad(_common.scalar_loss(caller, loss_fn))
  dtype = _common.loss_dtype(params)
  rho = rho.astype(dtype)
  tiny = jnp.finfo(dtype).tiny
  scale = _scale(params, adaptive, eta)

  def transform(d):  # T_w d
    return jax.tree.map(lambda s, x: s.astype(x.dtype) * x, scale, d)

  def unit(d):
    norm = tree.global_norm(d).astype(dtype)
    return jax.tree.map(lambda x: x / jnp.maximum(norm, tiny), d), norm

  def project(d):
    norm = tree.global_norm(d).astype(dtype)
    factor = jnp.minimum(1.0, rho / jnp.maximum(norm, tiny))
    return jax.tree.map(lambda x: x * factor.astype(x.dtype), d)

  def at(d):
    return _common.add_tree(params, transform(d))

  loss, g = value_and_grad(params)
  loss = loss.astype(dtype)
  direction, norm = unit(transform(g))
  random_dir, _ = unit(noise)
  start = jax.tree.map(
      lambda a, b: jnp.where(norm > 0, a, b.astype(a.dtype)), direction, random_dir
  )
  delta = jax.tree.map(lambda x: rho.astype(x.dtype) * x, start)

  def step(_, carry):
    delta, best_value, best_delta = carry
    value, g = value_and_grad(at(delta))
    value = value.astype(dtype)
    better = value > best_value
    best_value = jnp.where(better, value, best_value)
    best_delta = jax.tree.map(
        lambda a, b: jnp.where(better, a, b), delta, best_delta
    )
    ascent, _ = unit(transform(g))
    delta = project(
        jax.tree.map(
            lambda d, a: d + (step_size * rho).astype(d.dtype) * a, delta, ascent
        )
    )
    return delta, best_value, best_delta

  # ε = 0 lies in the ball: the maximum is never below L(w).
  init = (delta, loss, jax.tree.map(jnp.zeros_like, delta))
  delta, best_value, best_delta = jax.lax.fori_loop(0, num_steps, step, init)
  value = _common.scalar_loss(caller, loss_fn)(at(delta)).astype(dtype)
  better = value > best_value
  best_value = jnp.where(better, value, best_value)
  best_delta = jax.tree.map(lambda a, b: jnp.where(better, a, b), delta, best_delta)
  perturbation = jax.tree.map(
      lambda e, p: e.astype(p.dtype), transform(best_delta), params
  )
  return SharpnessResult(best_value - loss, loss, best_value, perturbation)


_worst_case = jax.jit(_ascent, static_argnames=("loss_fn", "num_steps"))


def sharpness_vs_rho(
    loss_fn: _common.LossFn,
    params: PyTree,
    rhos: Any,
    *,
    num_steps: int = 20,
    step_size: float = 1.0,
    adaptive: bool = False,
    eta: float = 0.01,
    key: Optional[jax.Array] = None,
) -> jax.Array:
  r"""Worst-case sharpness at each radius of ``rhos``: a sharpness-vs-ρ sweep.

  Runs :func:`worst_case_sharpness` for every radius with ``jax.lax.map``
  (one compiled ascent, radii evaluated in sequence). Near a minimum the
  curve starts as :math:`\rho^2 \lambda_{\max}/2`; plot it with
  :func:`plot_sharpness_vs_rho`.

  Args:
    loss_fn: ``params -> loss`` or ``params -> (loss, aux)``.
    params: the point :math:`w`.
    rhos: a 1-D array of radii, each :math:`\ge 0`.
    num_steps, step_size, adaptive, eta, key: as in
      :func:`worst_case_sharpness`.

  Returns:
    The sharpness at each radius, an array shaped like ``rhos``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 4.0, 10.0]) * w ** 2)
    >>> out = sharpness.sharpness_vs_rho(loss_fn, jnp.zeros(3), [0.0, 0.1, 0.2])
    >>> [round(float(s), 4) for s in out]
    [0.0, 0.05, 0.2]
  """
  caller = "sharpness_vs_rho"
  num_steps = _check_common(caller, loss_fn, params, 0.0, num_steps, step_size, eta)
  rhos_np = np.asarray(rhos)
  if (
      rhos_np.ndim != 1 or rhos_np.size == 0
      or not np.issubdtype(rhos_np.dtype, np.number)
  ):
    raise ValueError(
        f"`{caller}`: `rhos` must be a non-empty 1-D array of radii, got shape"
        f" {rhos_np.shape} and dtype {rhos_np.dtype}."
    )
  if np.any(~(rhos_np >= 0)):
    raise ValueError(
        f"`{caller}`: every radius in `rhos` must lie in [0, inf); got"
        f" rhos={rhos_np.tolist()}."
    )
  return _sweep(
      loss_fn, params, jnp.asarray(rhos_np, _common.loss_dtype(params)),
      _random_start(key, params), jnp.asarray(step_size), jnp.asarray(eta),
      jnp.asarray(bool(adaptive)), num_steps=num_steps,
  )


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_steps"))
def _sweep(loss_fn, params, rhos, noise, step_size, eta, adaptive, *, num_steps):
  def one(rho):
    return _ascent(
        loss_fn, params, rho, noise, step_size, eta, adaptive,
        num_steps=num_steps,
    ).sharpness

  return jax.lax.map(one, rhos)


class AverageSharpnessResult(NamedTuple):
  """Result of :func:`average_case_sharpness`.

  Attributes:
    sharpness: the Monte-Carlo mean of :math:`L(w + \\epsilon) - L(w)`.
    std_error: its standard error (0 with a single sample).
    loss: :math:`L(w)`.
  """

  sharpness: jax.Array
  std_error: jax.Array
  loss: jax.Array

  def __repr__(self) -> str:
    return _common.summary_repr(type(self).__name__, [
        ("sharpness", _common.format_array(self.sharpness)),
        ("std_error", _common.format_array(self.std_error)),
        ("loss", _common.format_array(self.loss)),
    ])


def average_case_sharpness(
    loss_fn: _common.LossFn,
    params: PyTree,
    sigma: float,
    *,
    key: jax.Array,
    num_samples: int = 100,
    adaptive: bool = False,
    eta: float = 0.01,
    batch_size: Optional[int] = 8,
) -> AverageSharpnessResult:
  r"""Average-case sharpness: the mean loss increase under Gaussian noise.

  .. math::

    S^{\mathrm{avg}}_\sigma(w) = \mathbb{E}_{\epsilon \sim
      \mathcal N(0,\, \sigma^2 T_w^2)} \big[L(w + \epsilon)\big] - L(w),

  with :math:`T_w = I`, or :math:`T_w = \operatorname{diag}(|w| + \eta)` when
  ``adaptive=True`` (noise proportional to each weight's magnitude). Near a
  minimum :math:`S^{\mathrm{avg}}_\sigma \approx \sigma^2
  \operatorname{tr}(T_w H T_w)/2`. Note :math:`\sigma` is per coordinate:
  the noise has norm about :math:`\sigma\sqrt d` in :math:`d` dimensions.

  Args:
    loss_fn: ``params -> loss`` or ``params -> (loss, aux)``.
    params: the point :math:`w`.
    sigma: the noise scale :math:`\sigma \ge 0`.
    key: a ``jax.random`` key for the noise.
    num_samples: number of noise draws, at least 1.
    adaptive: scale the noise by :math:`|w| + \eta`.
    eta: the offset :math:`\eta \ge 0`.
    batch_size: draws evaluated at once with ``vmap`` inside
      ``jax.lax.map``; ``None`` evaluates them one after another.

  Returns:
    An :class:`AverageSharpnessResult`.

  Examples:
    On a quadratic at its minimum the mean increase is
    :math:`\sigma^2 \operatorname{tr} H / 2 = 0.0075` here:

    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 4.0, 10.0]) * w ** 2)
    >>> res = sharpness.average_case_sharpness(
    ...     loss_fn, jnp.zeros(3), sigma=0.01, key=jax.random.key(0),
    ...     num_samples=4000)
    >>> bool(abs(res.sharpness - 0.00075) < 4 * res.std_error)
    True

  References:
    Andriushchenko, Croce, Müller, Hein, Flammarion, *A Modern Look at the
    Relationship between Sharpness and Generalization*, ICML 2023.
    https://arxiv.org/abs/2302.07011
  """
  caller = "average_case_sharpness"
  _common.check_loss_fn(caller, loss_fn)
  _common.check_float_leaves(caller, params)
  validation.check_scalar(caller, "sigma", sigma, low=0.0)
  validation.check_scalar(caller, "eta", eta, low=0.0)
  num_samples = _common.check_int(caller, "num_samples", num_samples, low=1)
  if batch_size is not None:
    batch_size = _common.check_int(caller, "batch_size", batch_size, low=1)
  return _average(
      loss_fn, params, jnp.asarray(sigma), key, jnp.asarray(eta),
      jnp.asarray(bool(adaptive)), num_samples=num_samples, batch_size=batch_size,
  )


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "num_samples", "batch_size")
)
def _average(loss_fn, params, sigma, key, eta, adaptive, *, num_samples, batch_size):
  scalar = _common.scalar_loss("average_case_sharpness", loss_fn)
  dtype = _common.loss_dtype(params)
  loss = scalar(params).astype(dtype)
  scale = _scale(params, adaptive, eta)

  def one(k):
    noise = _common.normal_like(k, params)
    eps = jax.tree.map(
        lambda z, t: (sigma.astype(z.dtype) * t.astype(z.dtype)) * z, noise, scale
    )
    return scalar(_common.add_tree(params, eps)).astype(dtype)

  values = jax.lax.map(one, jax.random.split(key, num_samples), batch_size=batch_size)
  increase = values - loss
  if num_samples > 1:
    std_error = jnp.std(increase, ddof=1) / math.sqrt(num_samples)
  else:
    std_error = jnp.zeros((), dtype)
  return AverageSharpnessResult(jnp.mean(increase), std_error, loss)


class MSharpnessResult(NamedTuple):
  """Result of :func:`m_sharpness`.

  Attributes:
    sharpness: the mean of ``group_sharpness``.
    group_sharpness: worst-case sharpness of each group, shape
      ``(num_groups,)``.
    group_loss: the clean loss of each group, shape ``(num_groups,)``.
  """

  sharpness: jax.Array
  group_sharpness: jax.Array
  group_loss: jax.Array

  def __repr__(self) -> str:
    return _common.summary_repr(type(self).__name__, [
        ("sharpness", _common.format_array(self.sharpness)),
        ("group_sharpness", _common.format_array(self.group_sharpness)),
        ("group_loss", _common.format_array(self.group_loss)),
    ])


def m_sharpness(
    loss_fn: Any,
    params: PyTree,
    batch: PyTree,
    rho: float,
    *,
    group_size: int,
    num_steps: int = 20,
    step_size: float = 1.0,
    adaptive: bool = False,
    eta: float = 0.01,
    key: Optional[jax.Array] = None,
) -> MSharpnessResult:
  r"""m-sharpness: worst-case sharpness averaged over groups of ``m`` examples.

  .. math::

    S^m_\rho(w) = \frac{1}{|\mathcal G|} \sum_{G \in \mathcal G}
      \max_{\|\epsilon\|_2 \le \rho} L_G(w + \epsilon) - L_G(w),

  where the batch is split, in order, into disjoint groups :math:`G` of
  ``group_size`` examples and :math:`L_G` is the loss on one group. This is
  the quantity SAM with per-device (or per-micro-batch) perturbations
  minimizes, and small ``m`` correlates better with generalization than the
  full-batch sharpness. Each group's maximum is found as in
  :func:`worst_case_sharpness`; groups are processed with ``jax.lax.map``.

  Unlike the other functions here, ``loss_fn`` takes the batch as its second
  argument, since the function splits it.

  Args:
    loss_fn: ``(params, batch) -> loss`` or ``-> (loss, aux)``; the loss on
      the examples of ``batch``. Close over model state and keys.
    params: the point :math:`w`.
    batch: a pytree whose leaves share a leading example axis of size
      :math:`n`, a multiple of ``group_size``.
    rho: the radius :math:`\rho \ge 0`.
    group_size: examples per group, :math:`m \ge 1`.
    num_steps, step_size, adaptive, eta, key: as in
      :func:`worst_case_sharpness`.

  Returns:
    An :class:`MSharpnessResult`.

  Raises:
    ValueError: if the batch leaves disagree on the leading axis, or
      ``group_size`` does not divide it.

  Examples:
    Two examples with per-example curvatures 1 and 9 (loss
    :math:`\frac12 \bar c\, w^2` on a group with mean curvature
    :math:`\bar c`): groups of one average :math:`\rho^2 (1 + 9)/4`, the
    full batch gives :math:`\rho^2 \cdot 5/2`, the same here since the
    parameter is one-dimensional.

    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w, c: 0.5 * jnp.mean(c) * jnp.sum(w ** 2)
    >>> res = sharpness.m_sharpness(
    ...     loss_fn, jnp.zeros(1), jnp.array([1.0, 9.0]), rho=0.1, group_size=1)
    >>> [round(float(s), 4) for s in res.group_sharpness]
    [0.005, 0.045]
    >>> round(float(res.sharpness), 4)
    0.025

  References:
    Foret, Kleiner, Mobahi, Neyshabur, *Sharpness-Aware Minimization for
    Efficiently Improving Generalization*, ICLR 2021.
    https://arxiv.org/abs/2010.01412

    Andriushchenko, Flammarion, *Towards Understanding Sharpness-Aware
    Minimization*, ICML 2022. https://arxiv.org/abs/2206.06232
  """
  caller = "m_sharpness"
  if not callable(loss_fn):
    raise TypeError(
        f"`{caller}`: `loss_fn` must be callable (params, batch) -> loss, got"
        f" {type(loss_fn).__name__}."
    )
  num_steps = _check_common(
      caller, lambda p: loss_fn(p, batch), params, rho, num_steps, step_size, eta
  )
  group_size = _common.check_int(caller, "group_size", group_size, low=1)
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        f"`{caller}`: every leaf of `batch` must have the same leading (example)"
        f" axis; got leading sizes {sorted(str(s) for s in sizes)}."
    )
  (n,) = sizes
  if n % group_size:
    raise ValueError(
        f"`{caller}`: `group_size` must divide the batch size {n}; got"
        f" group_size={group_size}. Trim the batch to"
        f" {n - n % group_size} examples or pick a divisor of {n}."
    )
  return _m_sharpness(
      loss_fn, params, batch, jnp.asarray(rho), _random_start(key, params),
      jnp.asarray(step_size), jnp.asarray(eta), jnp.asarray(bool(adaptive)),
      group_size=group_size, num_steps=num_steps,
  )


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "group_size", "num_steps")
)
def _m_sharpness(
    loss_fn, params, batch, rho, noise, step_size, eta, adaptive, *, group_size,
    num_steps,
):
  groups = jax.tree.map(
      lambda x: x.reshape((-1, group_size) + x.shape[1:]), batch
  )

  def one(group):
    res = _ascent(
        lambda p: loss_fn(p, group), params, rho, noise, step_size, eta,
        adaptive, num_steps=num_steps,
    )
    return res.sharpness, res.loss

  per_group, losses = jax.lax.map(one, groups)
  return MSharpnessResult(jnp.mean(per_group), per_group, losses)
