"""Curvature of the loss from Hessian-vector products: top eigenvalues and trace."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from sam_optax._core import closure, tree, validation
from sam_optax.sharpness import _common

PyTree = Any


def hvp(loss_fn: _common.LossFn, params: PyTree, vector: PyTree) -> PyTree:
  r"""Hessian-vector product :math:`\nabla^2 L(w)\, v`, forward-over-reverse.

  Computed as ``jax.jvp(jax.grad(L), (w,), (v,))``: one forward-mode pass
  through the backward pass, about the cost of two gradients, without ever
  forming the Hessian.

  Args:
    loss_fn: ``params -> loss`` or ``params -> (loss, aux)``; ``aux`` is
      dropped. Close over the batch, fixed BatchNorm statistics and fixed
      dropout keys.
    params: the point :math:`w`, any pytree of floating-point arrays.
    vector: the direction :math:`v`, a pytree like ``params``; each leaf is
      cast to the dtype of the matching parameter.

  Returns:
    :math:`H v` as a pytree like ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * (2.0 * w[0] ** 2 + 3.0 * w[1] ** 2 + w[0] * w[1])
    >>> sharpness.hvp(loss_fn, jnp.zeros(2), jnp.array([1.0, 0.0]))
    Array([2. , 0.5], dtype=float32)
  """
  _common.check_loss_fn("hvp", loss_fn)
  _common.check_float_leaves("hvp", params)
  closure.check_same_tree("hvp", vector, params, "`vector`", "params")
  return _hvp(loss_fn, params, vector)


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _hvp(loss_fn, params, vector):
  return _hvp_fn("hvp", loss_fn, params)(vector)


def _hvp_fn(caller: str, loss_fn: _common.LossFn, params: PyTree):
  """``v -> H v`` at ``params``, with ``v`` cast to the parameter dtypes."""
  grad = jax.grad(_common.scalar_loss(caller, loss_fn))

  def apply(v: PyTree) -> PyTree:
    v = tree.cast_like(v, params)
    return jax.jvp(grad, (params,), (v,))[1]

  return apply


class HessianEigenResult(NamedTuple):
  """Result of :func:`hessian_top_eigenvalue`.

  Attributes:
    eigenvalues: the ``k`` largest (algebraic) Hessian eigenvalues, in
      descending order, shape ``(k,)``.
    eigenvectors: the matching unit eigenvectors, a pytree like ``params``
      whose leaves carry a leading axis of size ``k``.
    residuals: ``‖H v − λ v‖`` for each pair, shape ``(k,)`` (for Lanczos the
      standard estimate :math:`|\\beta_m s_{m,i}|`).
    num_iters: number of Hessian-vector products used (int32).
    converged: whether every requested pair met the tolerance before the
      iteration limit.
  """

  eigenvalues: jax.Array
  eigenvectors: PyTree
  residuals: jax.Array
  num_iters: jax.Array
  converged: jax.Array

  @property
  def lambda_max(self) -> jax.Array:
    """The largest eigenvalue, ``eigenvalues[0]``."""
    return self.eigenvalues[0]

  def __repr__(self) -> str:
    k = jnp.shape(self.eigenvalues)[0] if jnp.ndim(self.eigenvalues) == 1 else 0
    return _common.summary_repr(type(self).__name__, [
        ("eigenvalues", _common.format_array(self.eigenvalues)),
        ("residuals", _common.format_array(self.residuals)),
        ("num_iters", _common.format_array(self.num_iters)),
        ("converged", _common.format_array(self.converged)),
        ("eigenvectors", _common.format_tree(self.eigenvectors, batch=k)),
    ])


def hessian_top_eigenvalue(
    loss_fn: _common.LossFn,
    params: PyTree,
    *,
    key: jax.Array,
    num_iters: int = 100,
    k: int = 1,
    method: str = "lanczos",
    tol: float = 1e-3,
) -> HessianEigenResult:
  r"""The largest Hessian eigenvalue :math:`\lambda_{\max}` (or the top ``k``).

  Works with Hessian-vector products only (:func:`hvp`), so it applies to any
  pytree model. :math:`\lambda_{\max}` is the largest *algebraic* eigenvalue:
  near a saddle point, where the most negative eigenvalue can be larger in
  magnitude, the result is still the largest positive-side one.

  * ``method="lanczos"`` (default) builds a Krylov basis of at most
    ``num_iters`` vectors with full reorthogonalization and reads the top
    ``k`` Ritz values of the tridiagonal matrix :math:`T_m`. It stops early
    once every requested Ritz pair has
    :math:`|\beta_m s_{m,i}| \le \mathrm{tol} \cdot \max_j |\theta_j|`. When
    the basis becomes invariant (:math:`\beta_m \approx 0`, as on a quadratic
    with few distinct eigenvalues) it restarts with a fresh random vector
    orthogonal to the basis, so repeated eigenvalues are found with their
    multiplicity. Memory: ``num_iters`` vectors of the size of ``params``.
  * ``method="power"`` runs power iteration for each of the ``k`` pairs in
    turn, restricted to the complement of the pairs already found
    (deflation by projection), until
    :math:`\|Hv - \theta v\| \le \mathrm{tol} \cdot \max |\theta|`, at most
    ``num_iters`` products per pair. Power iteration converges to the
    eigenvalue of largest *magnitude*; when that one is negative, the pair
    is recomputed (up to ``num_iters`` more products) on the shifted
    operator :math:`H - \theta I`, whose largest-magnitude eigenvalue is
    :math:`\lambda_{\max} - \theta`. It needs memory for ``k`` vectors
    only, but usually many more products, and converges slowly when the
    top eigenvalues are close.

  The computation is ``jax.jit``-compiled, keyed on ``loss_fn`` (pass the
  same function object to reuse the compilation), ``k``, ``num_iters`` and
  ``method``. Vectors are flattened into one array of dtype at least float32.

  Args:
    loss_fn: ``params -> loss`` or ``params -> (loss, aux)``; ``aux`` is
      dropped. Close over the batch (the full training set, or a fixed
      subset), fixed BatchNorm statistics and fixed dropout keys, so that
      the loss is a deterministic function of ``params``.
    params: the point at which the Hessian is taken.
    key: a ``jax.random`` key for the starting vectors.
    num_iters: the iteration limit, at least ``k``: the largest Krylov
      dimension (Lanczos; capped at the number of parameters) or the most
      products per eigenpair (power).
    k: how many of the largest eigenvalues to return.
    method: ``"lanczos"`` or ``"power"``.
    tol: relative residual tolerance, in (0, 1).

  Returns:
    A :class:`HessianEigenResult`; ``result.lambda_max`` is the top eigenvalue.

  Raises:
    ValueError: if ``k``, ``num_iters``, ``method`` or ``tol`` is out of range.

  Examples:
    A quadratic with Hessian ``diag(1, 4, 10)``:

    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 4.0, 10.0]) * w ** 2)
    >>> res = sharpness.hessian_top_eigenvalue(
    ...     loss_fn, jnp.zeros(3), key=jax.random.key(0), k=2)
    >>> [round(float(x), 3) for x in res.eigenvalues], bool(res.converged)
    ([10.0, 4.0], True)

    A saddle with eigenvalues (2, −5): power iteration first meets −5, the
    eigenvalue of largest magnitude, then shifts and returns
    :math:`\lambda_{\max} = 2`, as Lanczos does.

    >>> saddle = lambda w: w[0] ** 2 - 2.5 * w[1] ** 2
    >>> res = sharpness.hessian_top_eigenvalue(
    ...     saddle, jnp.ones(2), key=jax.random.key(1), method="power")
    >>> round(float(res.lambda_max), 3)
    2.0

  References:
    Lanczos, *An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators*, J. Res. Nat. Bur.
    Standards 45, 1950.

    Ghorbani, Krishnan, Xiao, *An Investigation into Neural Net Optimization
    via Hessian Eigenvalue Density*, ICML 2019.
    https://arxiv.org/abs/1901.10159

    Yao, Gholami, Keutzer, Mahoney, *PyHessian: Neural Networks Through the
    Lens of the Hessian*, 2020. https://arxiv.org/abs/1912.07145
  """
  caller = "hessian_top_eigenvalue"
  _common.check_loss_fn(caller, loss_fn)
  _common.check_float_leaves(caller, params)
  _common.check_choice(caller, "method", method, ("lanczos", "power"))
  flat = _common.flat_view(params)
  k = _common.check_int(caller, "k", k, low=1, high=flat.size)
  num_iters = _common.check_int(caller, "num_iters", num_iters, low=k)
  validation.check_scalar(
      caller, "tol", tol, low=0.0, high=1.0, low_inclusive=False,
      high_inclusive=False,
  )
  starts = _common.standard_normal(
      key, (2 if method == "lanczos" else k, flat.size), flat.dtype
  )
  return _top_eigen(
      loss_fn, params, starts, jnp.asarray(tol, jnp.float32), k=k,
      num_iters=num_iters, method=method,
  )


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "k", "num_iters", "method")
)
def _top_eigen(loss_fn, params, starts, tol, *, k, num_iters, method):
  flat = _common.flat_view(params)
  apply = _hvp_fn("hessian_top_eigenvalue", loss_fn, params)

  def matvec(v: jax.Array) -> jax.Array:
    return flat.ravel(apply(flat.unravel(v)))

  tol = tol.astype(flat.dtype)
  if method == "lanczos":
    m = min(num_iters, flat.size)
    vals, vecs, res, it, conv = _lanczos(matvec, flat.dtype, starts, k, m, tol)
  else:
    vals, vecs, res, it, conv = _power(matvec, flat.dtype, starts, num_iters, tol)
  return HessianEigenResult(
      eigenvalues=vals,
      eigenvectors=jax.vmap(flat.unravel)(vecs),
      residuals=res,
      num_iters=it.astype(jnp.int32),
      converged=conv,
  )


def _normalize(v: jax.Array) -> jax.Array:
  norm = jnp.linalg.norm(v)
  return v / jnp.maximum(norm, jnp.finfo(v.dtype).tiny)


def _lanczos(matvec, dtype, starts, k, m, tol):
  """Lanczos with full reorthogonalization, restart on breakdown, early exit.

  ``starts`` holds two random vectors: the start, and a base vector whose
  rotations (by the step index) serve as restart vectors after a breakdown.
  """
  n = starts.shape[1]
  sqrt_eps = jnp.sqrt(jnp.finfo(dtype).eps).astype(dtype)
  tiny = jnp.finfo(dtype).tiny
  start, restart = starts
  idx = jnp.arange(m)

  def tridiagonal(alpha, beta, j):
    """T of the first ``j + 1`` vectors, padded to m×m below its spectrum."""
    valid = idx <= j
    off = jnp.where(idx < j, beta, 0.0)
    left = jnp.concatenate([jnp.zeros((1,), dtype), off[:-1]])
    radius = jnp.abs(off) + jnp.abs(left)
    lo = jnp.min(jnp.where(valid, alpha - radius, jnp.inf))
    hi = jnp.max(jnp.where(valid, alpha + radius, -jnp.inf))
    gap = jnp.maximum(jnp.maximum(hi - lo, 0.5 * (jnp.abs(lo) + jnp.abs(hi))), tiny)
    diag = jnp.where(valid, alpha, lo - gap)
    return jnp.diag(diag) + jnp.diag(off[:-1], 1) + jnp.diag(off[:-1], -1)

  def ritz(alpha, beta, j):
    theta, s = jnp.linalg.eigh(tridiagonal(alpha, beta, j))
    anorm = jnp.maximum(jnp.abs(theta[-1]), jnp.abs(theta[m - 1 - j]))
    return theta[::-1][:k], s[:, ::-1][:, :k], anorm

  def orthogonalize(w, basis):
    w = w - basis.T @ (basis @ w)
    return w - basis.T @ (basis @ w)

  def cond(state):
    j, *_, done = state
    return (j < m) & ~done

  def body(state):
    j, basis, alpha, beta, v, v_prev, b_prev, _, _ = state
    w = matvec(v)
    a = jnp.vdot(v, w)
    w = w - a * v - b_prev * v_prev
    basis = basis.at[j].set(v)
    w = orthogonalize(w, basis)
    b = jnp.linalg.norm(w)
    alpha = alpha.at[j].set(a)
    _, s_top, anorm = ritz(alpha, beta, j)
    res = jnp.abs(b * s_top[j])
    breakdown = b <= sqrt_eps * anorm
    # An invariant basis has zero residuals but may miss eigenvalues outside
    # it: restart and look once more, unless the iteration limit is reached.
    done = (
        (j + 1 >= k) & jnp.all(res <= tol * anorm) & (~breakdown | (j + 1 >= m))
    )
    fresh = _normalize(orthogonalize(jnp.roll(restart, j), basis))
    v_next = jnp.where(breakdown, fresh, w / jnp.maximum(b, tiny))
    b_kept = jnp.where(breakdown, jnp.zeros((), dtype), b)
    beta = beta.at[j].set(b_kept)
    return j + 1, basis, alpha, beta, v_next, v, b_kept, res, done

  v0 = _normalize(start)
  zeros_m = jnp.zeros((m,), dtype)
  state = (
      jnp.zeros((), jnp.int32), jnp.zeros((m, n), dtype), zeros_m, zeros_m, v0,
      jnp.zeros((n,), dtype), jnp.zeros((), dtype), jnp.zeros((k,), dtype),
      jnp.zeros((), bool),
  )
  j, basis, alpha, beta, *_, res, done = jax.lax.while_loop(cond, body, state)
  theta, s_top, _ = ritz(alpha, beta, j - 1)
  vecs = jax.vmap(_normalize)(s_top.T @ basis)
  return theta, vecs, res, j, done


def _power(matvec, dtype, starts, num_iters, tol):
  r"""Power iteration per pair, projected off the found pairs, shifted if needed.

  Each pair runs one loop in up to two phases: plain power iteration on the
  projected operator, then, if it converged to a negative eigenvalue
  :math:`\theta`, again from the same start on the operator shifted by
  :math:`-\theta`, whose dominant eigenvalue is the largest algebraic one.
  """
  k, n = starts.shape
  tiny = jnp.finfo(dtype).tiny
  zero = jnp.zeros((), dtype)

  def stage(i, carry):
    found, vals, residuals, total, converged, anorm = carry

    def project(x):
      x = x - found.T @ (found @ x)
      return x - found.T @ (found @ x)

    v0 = _normalize(project(starts[i]))

    def cond(state):
      return ~state[-1]

    def body(state):
      it, it_phase, phase, shift, scale, v, _, _, _, _, _ = state
      w = project(matvec(v) - shift * v)
      theta_s = jnp.vdot(v, w)
      res = jnp.linalg.norm(w - theta_s * v)
      conv = res <= tol * jnp.maximum(jnp.abs(theta_s), scale)
      norm = jnp.linalg.norm(w)
      v_next = jnp.where(norm > tiny, w / jnp.maximum(norm, tiny), v)
      it_phase = it_phase + 1
      theta = theta_s + shift
      phase_end = conv | (it_phase >= num_iters)
      switch = phase_end & (phase == 0) & (theta < 0)
      return (
          it + 1,
          jnp.where(switch, 0, it_phase),
          jnp.where(switch, 1, phase),
          jnp.where(switch, theta, shift),
          jnp.maximum(scale, jnp.abs(theta)),
          jnp.where(switch, v0, v_next),
          v,
          theta,
          res,
          conv,
          phase_end & ~switch,
      )

    i32 = jnp.zeros((), jnp.int32)
    init = (i32, i32, i32, zero, anorm, v0, v0, zero, zero, jnp.zeros((), bool),
            jnp.zeros((), bool))
    it, _, _, _, scale, _, v, theta, res, conv, _ = jax.lax.while_loop(cond, body, init)
    return (
        found.at[i].set(v), vals.at[i].set(theta), residuals.at[i].set(res),
        total + it, converged & conv, scale,
    )

  carry = (
      jnp.zeros((k, n), dtype), jnp.zeros((k,), dtype), jnp.zeros((k,), dtype),
      jnp.zeros((), jnp.int32), jnp.ones((), bool), zero,
  )
  found, vals, residuals, total, converged, _ = jax.lax.fori_loop(0, k, stage, carry)
  order = jnp.argsort(-vals)
  return vals[order], found[order], residuals[order], total, converged


class HessianTraceResult(NamedTuple):
  """Result of :func:`hessian_trace`.

  Attributes:
    trace: the Hutchinson estimate of :math:`\\operatorname{tr} H`.
    std_error: its standard error, ``std(samples) / sqrt(num_samples)``
      (0 with a single sample).
    samples: the individual estimates :math:`z_i^\\top H z_i`, shape
      ``(num_samples,)``.
  """

  trace: jax.Array
  std_error: jax.Array
  samples: jax.Array

  def __repr__(self) -> str:
    return _common.summary_repr(type(self).__name__, [
        ("trace", _common.format_array(self.trace)),
        ("std_error", _common.format_array(self.std_error)),
        ("samples", _common.format_array(self.samples, max_items=0)),
    ])


def hessian_trace(
    loss_fn: _common.LossFn,
    params: PyTree,
    *,
    key: jax.Array,
    num_samples: int = 100,
    batch_size: Optional[int] = None,
) -> HessianTraceResult:
  r"""Hutchinson's estimate of the Hessian trace with Rademacher probes.

  .. math::

    \operatorname{tr} H \approx \frac1N \sum_{i=1}^N z_i^\top H z_i,
    \qquad z_i \in \{-1, +1\}^d \text{ uniformly at random.}

  The estimate is unbiased; its variance per probe is
  :math:`2 \sum_{i \ne j} H_{ij}^2`, so it is exact for a diagonal Hessian.
  Each probe costs one :func:`hvp`; the probes are evaluated with
  ``jax.lax.map``, ``batch_size`` of them at a time under ``jax.vmap``.

  Args:
    loss_fn: ``params -> loss`` or ``params -> (loss, aux)``; see
      :func:`hessian_top_eigenvalue` for what to close over.
    params: the point at which the Hessian is taken.
    key: a ``jax.random`` key for the probes.
    num_samples: number of probes :math:`N \ge 1`.
    batch_size: probes evaluated at once with ``vmap`` (memory grows with
      it); ``None`` evaluates them one after another.

  Returns:
    A :class:`HessianTraceResult`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 4.0, 10.0]) * w ** 2)
    >>> res = sharpness.hessian_trace(
    ...     loss_fn, jnp.zeros(3), key=jax.random.key(0), num_samples=8)
    >>> float(res.trace), float(res.std_error)
    (15.0, 0.0)

  References:
    Hutchinson, *A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines*, Communications in Statistics 18, 1989.

    Yao, Gholami, Keutzer, Mahoney, *PyHessian: Neural Networks Through the
    Lens of the Hessian*, 2020. https://arxiv.org/abs/1912.07145
  """
  caller = "hessian_trace"
  _common.check_loss_fn(caller, loss_fn)
  _common.check_float_leaves(caller, params)
  num_samples = _common.check_int(caller, "num_samples", num_samples, low=1)
  if batch_size is not None:
    batch_size = _common.check_int(caller, "batch_size", batch_size, low=1)
  return _trace(
      loss_fn, params, key, num_samples=num_samples, batch_size=batch_size
  )


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "num_samples", "batch_size")
)
def _trace(loss_fn, params, key, *, num_samples, batch_size):
  apply = _hvp_fn("hessian_trace", loss_fn, params)
  flat = _common.flat_view(params)

  def probe(k):
    z = flat.unravel(jax.random.rademacher(k, (flat.size,), flat.dtype))
    return tree.vdot(z, apply(z)).astype(flat.dtype)

  keys = jax.random.split(key, num_samples)
  samples = jax.lax.map(probe, keys, batch_size=batch_size)
  if num_samples > 1:
    std_error = jnp.std(samples, ddof=1) / math.sqrt(num_samples)
  else:
    std_error = jnp.zeros((), flat.dtype)
  return HessianTraceResult(jnp.mean(samples), std_error, samples)
