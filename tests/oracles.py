"""Float64 references of every contract case's first steps, from the papers.

One oracle per entry of ``tests.contract.CASES`` (same name). An oracle works
on flat float64 vectors (all leaves of the parameters in ``jax.tree.leaves``
order) and is written from the variant's equations; none calls ``sam_optax``.
Gradients are taken with ``jax.grad`` of the test's loss at the float64 point
cast to the parameters' dtype (:func:`tests.reference.grad_at`).

``ORACLES[name](params)`` returns a fresh ``step`` function with the
variant's state held in its closure::

    points, u = step(t, w, g, grad, rho, seen)

* ``t``: the step count (0, 1, ...); ``w``: the weights; ``g = ∇L(w)``;
  ``grad``: ``w -> ∇L(w)``; ``rho``: the radius at this step.
* ``seen``: ``(w_lib, points_lib)``, the weights and the points at which the
  library evaluated the closure at this step. Only the random cases read it,
  to learn the draw (which leaves a random mask kept, RWP's noise); every
  other oracle ignores it.
* ``points``: the points at which the closure is evaluated this step, in
  order (none on a step that skips the pass); ``u``: the output.

:func:`run` strings the steps together with ``w ← w − lr u``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np

from tests.reference import flat, grad_at

Vector = np.ndarray
Grad = Callable[[Vector], Vector]


# ----------------------------------------------------------------- helpers


def unit(v: Vector, eps: float = 0.0, norm_of: Optional[Vector] = None) -> Vector:
  """``v / (‖norm_of‖ + eps)`` (``norm_of = v`` by default); 0 when the norm is 0."""
  n = np.linalg.norm(v if norm_of is None else norm_of) + eps
  return v / n if n > 0 else np.zeros_like(v)


def top_k(score: Vector, keep_fraction: float) -> Vector:
  """Global top-k as 0/1, ties to the earlier entry, k = round(fraction · n) ≥ 1."""
  k = max(int(np.round(keep_fraction * score.size)), 1)
  order = np.argsort(-score, kind="stable")
  mask = np.zeros(score.size)
  mask[order[:k]] = 1.0
  return mask


def fisher_epsilon(g: Vector, rho: float, eta: float) -> Vector:
  """Kim et al. 2022: ε = ρ F⁻¹g / sqrt(gᵀF⁻¹g), F = diag(1 + η g²)."""
  f = 1.0 + eta * g * g
  q = g @ (g / f)
  return rho * (g / f) / np.sqrt(q) if q > 0 else np.zeros_like(g)


def ae_sam_policy(sq_norms, delta, lambda_start, lambda_end, total_steps):
  """AE-SAM's decisions, margins and (mean, var) statistics (Jiang et al. 2023)."""
  mean = var = 0.0
  takes, margins, stats = [], [], []
  for t, x in enumerate(sq_norms):
    mean = delta * mean + (1 - delta) * x
    var = delta * var + (1 - delta) * (x - mean) ** 2
    c = lambda_start + (lambda_end - lambda_start) * min(t / total_steps, 1.0)
    threshold = mean + c * np.sqrt(var)
    takes.append(x >= threshold)
    margins.append(abs(x - threshold) / max(1.0, x))
    stats.append((mean, var))
  return np.asarray(takes), np.asarray(margins), stats


def gsam_output(g: Vector, g_p: Vector, alpha: float, eps: float = 1e-12) -> Vector:
  """Zhuang et al. 2022: ``g_p − α g_⊥`` with ``g_⊥`` the part of g orthogonal to g_p."""
  u = unit(g_p, eps)
  return g_p - alpha * (g - (g @ u) * u)


class Layout(NamedTuple):
  """Where each leaf of the parameters lies in the flat vector."""

  slices: tuple[slice, ...]
  shapes: tuple[tuple[int, ...], ...]

  @classmethod
  def of(cls, params: Any) -> "Layout":
    slices, shapes, i = [], [], 0
    for leaf in jax.tree.leaves(params):
      n = int(np.size(leaf))
      slices.append(slice(i, i + n))
      shapes.append(tuple(np.shape(leaf)))
      i += n
    return cls(tuple(slices), tuple(shapes))

  def leaf_mask(self, keep: list[bool]) -> Vector:
    """A 0/1 vector that selects whole leaves."""
    m = np.zeros(self.slices[-1].stop)
    for s, k in zip(self.slices, keep, strict=True):
      m[s] = float(k)
    return m


def _seen_offset(seen) -> Vector:
  (w_lib, points) = seen
  (point,) = points
  return point - w_lib


def _kept_leaves(layout: Layout, seen) -> list[bool]:
  """Which leaves the library's random mask kept: those its point moved."""
  offset = _seen_offset(seen)
  return [bool(np.any(offset[s] != 0)) for s in layout.slices]


# ------------------------------------------------------------ the oracles


def sam(eps: float = 1e-12, ascent_steps: int = 1, renormalize: bool = False):
  """Foret et al. 2021 (``n`` normalized ascent steps; StableSAM's rescaling)."""

  def make(params):
    def step(t, w, g, grad, rho, seen):
      offset, points, g_k = np.zeros_like(w), [], g
      for k in range(ascent_steps):
        offset = offset + (rho / ascent_steps) * unit(g_k, eps)
        points.append(w + offset)
        g_k = grad(w + offset) if k < ascent_steps - 1 else None
      u = grad(points[-1])
      if renormalize:
        u = u * np.linalg.norm(g) / np.linalg.norm(u)
      return points, u

    return step

  return make


def _two_pass(direction, combine=None):
  """A one-ascent-step variant: ``ε = ρ d(g, w)``, output ``combine(g, g_p)``."""

  def step(t, w, g, grad, rho, seen):
    point = w + rho * direction(g, w)
    g_p = grad(point)
    return [point], (g_p if combine is None else combine(g, g_p))

  return step


def asam(eta: float, eps: float = 1e-12):
  """Kwon et al. 2021: ε = ρ T²g / ‖Tg‖, T = |w| + η."""

  def direction(g, w):
    t = np.abs(w) + eta
    return unit(t * t * g, eps, norm_of=t * g)

  return lambda params: _two_pass(direction)


def samson(eta: float, p: float, eps: float = 1e-12):
  """Mordido, Henwood et al. 2023: ASAM's T = |w| + η divided by ‖leaf‖_p."""

  def make(params):
    layout = Layout.of(params)

    def direction(g, w):
      t = np.ones_like(w)
      for s in layout.slices:
        norm = np.linalg.norm(w[s], ord=p)
        if norm > 0:
          t[s] = (np.abs(w[s]) + eta) / norm
      return unit(t * t * g, eps, norm_of=t * g)

    return _two_pass(direction)

  return make


def centralize(v: Vector, layout: "Layout", filter_axis: str) -> Vector:
  """Gradient centralization, leaf by leaf: each leaf of 2 or more dimensions
  loses its mean over every axis but the filter axis (Yong et al. 2020)."""
  out = v.copy()
  for s, shape in zip(layout.slices, layout.shapes):
    if len(shape) >= 2:
      x = v[s].reshape(shape)
      keep = (0 if filter_axis == "first" else len(shape) - 1)
      others = tuple(a for a in range(len(shape)) if a != keep)
      out[s] = (x - x.mean(axis=others, keepdims=True)).ravel()
  return out


def gcsam(filter_axis: str = "last", norm: str = "raw"):
  """Hassan et al. 2025 (kozistr's SAM(use_gc=True)): ε = ρ Φ(g)/‖g‖, u = g_p."""

  def make(params):
    layout = Layout.of(params)

    def direction(g, w):
      c = centralize(g, layout, filter_axis)
      return unit(c, 1e-12, norm_of=g if norm == "raw" else c)

    return _two_pass(direction)

  return make


def wsam(gamma: float):
  """Yue et al. 2023, coupled: u = α g_p + (1 − α) g, α = γ/(1 − γ)."""
  alpha = gamma / (1 - gamma)
  return lambda params: _two_pass(
      lambda g, w: unit(g, 1e-12), lambda g, gp: alpha * gp + (1 - alpha) * g
  )


def usam():
  """Andriushchenko & Flammarion 2022: ε = ρ g."""
  return lambda params: _two_pass(lambda g, w: g)


def gsam(alpha: float):
  return lambda params: _two_pass(lambda g, w: unit(g, 1e-12), lambda g, gp: gsam_output(g, gp, alpha))


def fisher_sam(eta: float):
  return lambda params: _two_pass(lambda g, w: fisher_epsilon(g, 1.0, eta))


def masked(mask_of: Callable[[Any], Vector], normalize: str):
  """SSAM / SAM-ON: ε = ρ M⊙g / ‖g‖ (``"full"``) or / ‖M⊙g‖ (``"masked"``)."""

  def make(params):
    m = mask_of(params)

    def direction(g, w):
      return unit(m * g, 1e-12, norm_of=m * g if normalize == "masked" else g)

    return _two_pass(direction)

  return make


def every(k: int, on_pass, on_skip):
  """A pass on steps 0, k, 2k, ...; ``on_skip(t, w, g)`` on the others."""

  def make(params):
    take_pass, skip = on_pass(params), on_skip(params)

    def step(t, w, g, grad, rho, seen):
      if t % k == 0:
        return take_pass(t, w, g, grad, rho, seen)
      return [], skip(t, w, g)

    return step

  return make


def composed(eta: float, alpha: float, k: int):
  """ASAM's perturbation, GSAM's output, the pass every k steps (g in between)."""

  def direction(g, w):
    t = np.abs(w) + eta
    return unit(t * t * g, 1e-12, norm_of=t * g)

  def on_pass(params):
    return _two_pass(direction, lambda g, gp: gsam_output(g, gp, alpha))

  return every(k, on_pass, lambda params: lambda t, w, g: g)


def random_mask_gsam(beta: float, alpha: float, k: int):
  """ESAM's leaf mask (kept w.p. β, ε = ρ/β M⊙g/‖M⊙g‖) with GSAM's output, every k."""

  def on_pass(params):
    layout = Layout.of(params)

    def step(t, w, g, grad, rho, seen):
      m = layout.leaf_mask(_kept_leaves(layout, seen))
      point = w + rho / beta * unit(m * g, 1e-12)
      return [point], gsam_output(g, grad(point), alpha)

    return step

  return every(k, on_pass, lambda params: lambda t, w, g: g)


def esam(beta: float):
  """Du et al. 2022 with a scalar loss (a batch of one: SDS keeps it)."""

  def make(params):
    layout = Layout.of(params)

    def step(t, w, g, grad, rho, seen):
      m = layout.leaf_mask(_kept_leaves(layout, seen))
      point = w + rho / beta * unit(m * g, 1e-12)
      return [point], grad(point)

    return step

  return make


def rwp(alpha: float, filter_axis: int = -1):
  """Li et al. 2024: ε_W,i ~ N(0, γ² ‖W_i‖² I) per filter, u = α g_p + (1−α) g.

  The draw is the library's (read off ``seen``); the oracle checks that every
  entry moved, that the noise is scaled by the filter norms to a plausible
  size, and the output formed from it.
  """

  def make(params):
    layout = Layout.of(params)

    def step(t, w, g, grad, rho, seen):
      offset = _seen_offset(seen)
      w_lib = seen[0]
      for s, shape in zip(layout.slices, layout.shapes):
        noise = offset[s].reshape(shape)
        wl = w_lib[s].reshape(shape)
        if len(shape) >= 2:
          axis = filter_axis % len(shape)
          others = tuple(a for a in range(len(shape)) if a != axis)
          norm = np.sqrt(np.sum(wl * wl, axis=others, keepdims=True))
        else:
          norm = np.sqrt(np.sum(wl * wl))
        z = noise / (rho * norm)
        assert np.all(noise != 0), "RWP must move every entry"
        assert np.all(np.abs(z) < 7), "RWP's noise is not scaled by ρ‖W_i‖"
      point = w + offset
      return [point], alpha * grad(point) + (1 - alpha) * g

    return step

  return make


def ae_sam(total_steps: int, delta=0.9, lambda_start=1.0, lambda_end=-1.0):
  """Jiang et al. 2023: the pass when ‖g‖² ≥ μ_t + c_t σ_t, else g."""

  def make(params):
    history: list[float] = []
    take_pass = sam()(params)

    def step(t, w, g, grad, rho, seen):
      history.append(float(g @ g))
      takes, _, _ = ae_sam_policy(history, delta, lambda_start, lambda_end, total_steps)
      if takes[-1]:
        return take_pass(t, w, g, grad, rho, seen)
      return [], g

    return step

  return make


def looksam(k: int, alpha: float):
  """Liu et al. 2022: every k steps store g_v = g_s − (g_s·g/‖g‖²) g; else g + α‖g‖/‖g_v‖ g_v."""

  def make(params):
    g_v = np.zeros(flat(params).size)

    def step(t, w, g, grad, rho, seen):
      nonlocal g_v
      if t % k == 0:
        point = w + rho * unit(g)
        g_s = grad(point)
        g_v = g_s - (g_s @ g) / (g @ g) * g
        return [point], g_s
      return [], g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v

    return step

  return make


def friendly_sam(sigma: float, lam: float):
  """Li et al. 2024: d = g − σ m_{t−1}, m_t = λ m_{t−1} + (1−λ) g (d = m = g at t = 0)."""

  def make(params):
    m = None

    def step(t, w, g, grad, rho, seen):
      nonlocal m
      if m is None:
        d, m = g, g
      else:
        d = g - sigma * m
        m = lam * m + (1 - lam) * g
      point = w + rho * unit(d)
      return [point], grad(point)

    return step

  return make


def vasso(theta: float):
  """Li & Giannakis 2023: d_t = (1−θ) d_{t−1} + θ g_t (d_0 = g_0), ε = ρ d_t/‖d_t‖."""

  def make(params):
    d = None

    def step(t, w, g, grad, rho, seen):
      nonlocal d
      d = g if d is None else (1 - theta) * d + theta * g
      point = w + rho * unit(d)
      return [point], grad(point)

    return step

  return make


def fisher_masked_sam(sparsity: float, every_n: int):
  """Zhong et al. 2022 / Mi et al. 2022: M = top (1−s) of Σ g² since the last
  refresh (refreshed on steps 0, N, 2N, ...), ε = ρ M⊙g/‖g‖."""

  def make(params):
    acc = np.zeros(flat(params).size)
    mask = np.zeros_like(acc)

    def step(t, w, g, grad, rho, seen):
      nonlocal acc, mask
      acc = acc + g * g
      if t % every_n == 0:
        mask, acc = top_k(acc, 1 - sparsity), np.zeros_like(acc)
      point = w + rho * unit(mask * g, norm_of=g)
      return [point], grad(point)

    return step

  return make


def dgsam(num_domains: int, eps: float = 1e-12):
  """Song et al. 2025 with identical domains: S + 1 gradients, each at the point
  the previous normalized steps reached (the first at w), averaged."""

  def make(params):
    def step(t, w, g, grad, rho, seen):
      point, points, total = w, [], np.zeros_like(w)
      for _ in range(num_domains + 1):
        points.append(point)
        g_i = grad(point)
        total = total + g_i
        point = point + rho * unit(g_i, eps)
      return points, total / (num_domains + 1)

    return step

  return make


def gam(ratio: float, beta0: float, beta1: float, gamma: float, eps: float = 1e-12):
  """Zhang et al. 2023 (xxgege/GAM ``GAM.step``): g1 at w + ρ'ĝ, g2 at
  w + ρ d̂ (d = g1 − g), g3 at w + ρ d̂ + ρ'ĝ2; u = β1 g1 + (1 − β1) g3,
  m = g + |1 − β0| g2, output u − γ (m − cos·‖m‖·u/(‖u‖ + eps))."""

  def make(params):
    def step(t, w, g, grad, rho, seen):
      rho_p = ratio * rho
      p1 = w + rho_p * unit(g, eps)
      g1 = grad(p1)
      p2 = w + rho * unit(g1 - g, eps)
      g2 = grad(p2)
      p3 = p2 + rho_p * unit(g2, eps)
      g3 = grad(p3)
      u = beta1 * g1 + (1 - beta1) * g3
      m = g + abs(1 - beta0) * g2
      nu, nm = np.linalg.norm(u), np.linalg.norm(m)
      cosine = (m @ u) / (nu * nm + eps)
      return [p1, p2, p3], u - gamma * (m - cosine * nm * u / (nu + eps))

    return step

  return make


def sampa(lr: float, lam: float, eps: float = 1e-12):
  """Xie et al. 2024 (LIONS-EPFL/SAMPa ``train.py``, one batch): x̃ = w + ρ ĥ
  with h = ∇f(y) of the previous step (0 at step 0), y = w − lr h,
  u = (1 − λ) ∇f(x̃) + λ ∇f(y); h ← ∇f(y)."""

  def make(params):
    h = np.zeros(flat(params).size)

    def step(t, w, g, grad, rho, seen):
      nonlocal h
      p1 = w + rho * unit(h, eps)
      y = w - lr * h
      h = grad(y)
      return [p1, y], (1 - lam) * grad(p1) + lam * h

    return step

  return make


def _alternate_entries(params) -> Vector:
  """``masked_sam``'s mask in the contract: even entries of every leaf."""
  return np.concatenate(
      [(np.arange(np.size(x)) % 2 == 0).astype(float) for x in jax.tree.leaves(params)]
  )


def _small_leaves(params) -> Vector:
  """``sam_on``'s mask in the contract: the leaves with fewer than 2 dimensions."""
  return np.concatenate(
      [np.full(np.size(x), float(np.ndim(x) < 2)) for x in jax.tree.leaves(params)]
  )


ORACLES: dict[str, Callable[[Any], Callable[..., Any]]] = {
    "sam": sam(),
    "sam_eps": sam(eps=1e-6),
    "sam_2steps": sam(ascent_steps=2),
    "sam_renorm": sam(renormalize=True),
    "asam": asam(0.01),
    "samson": samson(0.01, np.inf),
    "samson_p2": samson(0.05, 2),
    "composed": composed(0.01, 0.2, 3),
    "composed_random_mask": random_mask_gsam(0.5, 0.2, 2),
    "gcsam": gcsam(),
    "gcsam_first": gcsam("first", "centralized"),
    "wsam": wsam(0.88),
    "wsam_low": wsam(0.3),
    "usam": usam(),
    "gsam": gsam(0.2),
    "looksam": looksam(2, 0.7),
    "esam": esam(0.5),
    "rwp": rwp(0.5),
    "ae_sam": ae_sam(total_steps=4),
    "friendly_sam": friendly_sam(1.0, 0.6),
    "vasso": vasso(0.9),
    "fisher_sam": fisher_sam(1.0),
    "masked_sam": masked(_alternate_entries, "full"),
    "sam_on": masked(_small_leaves, "masked"),
    "fisher_masked_sam": fisher_masked_sam(0.5, 2),
    "dgsam": dgsam(3),
    "gam": gam(0.25, 0.3, 0.7, 0.3),
    "sampa": sampa(0.05, 0.2),
}
"""Keyed like ``tests.contract.CASES``; the hyperparameters are the cases'."""


def recording(loss_fn: Callable[[Any], Any], seen: list, tag: Any = 0):
  """``loss_fn`` that also appends ``(tag, flat point)`` for every point it sees.

  The points of a random case are its draw, which its oracle reads back.
  """

  def wrapped(p):
    jax.debug.callback(
        lambda t, q: seen.append((int(t), flat(q))), tag, p, ordered=True
    )
    return loss_fn(p)

  return wrapped


class StepRef(NamedTuple):
  """One reference step: the weights, the closure's points, the output."""

  w: Vector
  points: list[Vector]
  update: Vector


def run(
    name: str,
    loss_fn: Callable[[Any], Any],
    params: Any,
    rho_at: Callable[[int], float],
    steps: int,
    lr: float,
    seen: Optional[list] = None,
) -> list[StepRef]:
  """``steps`` reference steps of case ``name`` with ``w ← w − lr u``."""
  step = ORACLES[name](params)
  grad = lambda v: grad_at(loss_fn, params, v)  # noqa: E731
  w, out = flat(params), []
  for t in range(steps):
    g = grad(w)
    points, u = step(t, w, g, grad, rho_at(t), None if seen is None else seen[t])
    out.append(StepRef(w, points, u))
    w = w - lr * u
  return out
