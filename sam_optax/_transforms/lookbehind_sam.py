"""Lookbehind-SAM: k ascent steps behind, their descents looked back on."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import checks, closure, full_guard, tree, validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.stats import SAMStats
from sam_optax._parts import perturbations
from sam_optax._parts.perturbations import Perturbation

__all__ = ("LookbehindState", "lookbehind_sam")


class LookbehindState(NamedTuple):
  """State of :func:`lookbehind_sam`.

  Attributes:
    count: number of ``update`` calls so far (int32); a ``rho`` schedule is
      evaluated at this count.
    base: the state of the wrapped base optimizer (advanced ``k`` times per
      ``update``).
    perturbation: the state of the ascent's perturbation part.
    stats: diagnostics of the last step (``perturbed_loss`` is the loss at
      the last ascent point, ``perturbed_grad_norm`` the norm of the update).
    nonfinite_count: number of steps (int32) whose update was not finite
      (handled by the ``nonfinite`` policy).
  """

  count: jax.Array
  base: optax.OptState
  perturbation: Any
  stats: SAMStats
  nonfinite_count: jax.Array = jnp.zeros((), jnp.int32)


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """``torch.nn.CosineSimilarity(dim=0)`` of the flattened leaves (eps 1e-8)."""
  a, b = a.ravel(), b.ravel()
  na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
  return jnp.dot(a, b) / (jnp.maximum(na, 1e-8) * jnp.maximum(nb, 1e-8))


@validation.reported_as("lookbehind_sam")
def lookbehind_sam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    k: int = 2,
    alpha: Union[float, str] = 0.5,
    *,
    perturbation: Optional[Perturbation] = None,
    eps: float = 1e-12,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""Lookbehind-SAM: k ascent steps, each followed by a descent, then an
  interpolation back toward the start (a full optimizer).

  From the weights :math:`w` (the *slow* weights), one ``update`` runs
  :math:`k` inner steps. Ascent :math:`j` continues from the last perturbed
  point, and the base optimizer steps the *fast* weights :math:`f` (which
  start at :math:`w`) with the gradient found there:

  .. math::

    p_0 = f_0 = w, \quad g_0 = \nabla L(w), \qquad
    p_j = p_{j-1} + \rho \frac{g_{j-1}}{\|g_{j-1}\|_2 + \mathrm{eps}}, \quad
    g_j = \nabla L(p_j), \quad f_j = f_{j-1} + \mathrm{base}(g_j)
    \quad (j = 1..k),

  and the slow weights move toward the last fast ones,
  :math:`w \leftarrow w + \alpha (f_k - w)`. With ``alpha="adaptive"``,
  :math:`\alpha` is set per leaf to
  :math:`(\cos(f_1 - w, f_k - w) + 1)/2`. The perturbations add up (the
  last point lies up to :math:`k\rho` from :math:`w`): "k steps back", a
  worse worst case than SAM's, whose descents are averaged by the
  interpolation ("1 step forward").

  Why a full optimizer: the base optimizer runs :math:`k` times per call,
  each time at other fast weights, and the result is an interpolation of
  its iterates, none of which a transform placed in front of it (as
  :func:`sam_optax.sam` is) can produce. So this wraps the base optimizer,
  as ``optax.lookahead`` does, and returns the parameter update
  :math:`w_{\text{new}} - w`: apply it; do not chain another optimizer
  after it. The fast weights live only inside one call (they are reset to
  the slow ones at the end of every call in the authors' loop too), so the
  state holds the base optimizer's state (one momentum shared by all inner
  steps, as in the authors' loop), not a second copy of the weights.

  Compared with ``sam(rho, num_ascent_steps=k)``: that takes :math:`k`
  ascent steps of length :math:`\rho/k` (total :math:`\rho`) and one
  descent, at the last point; here every ascent step has length
  :math:`\rho` and each is followed by a descent step of the base
  optimizer, so one ``update`` makes :math:`k` optimizer steps on the same
  batch and keeps a fraction :math:`\alpha` of their sum.

  Cost: :math:`k` gradients through the closure besides the clean one
  (:math:`k + 1` forward/backward passes per ``update``); the authors'
  loop evaluates :math:`2k`, taking each ascent gradient again at the point
  where the previous descent gradient was taken (identical for a
  deterministic closure, so it is reused here). Buffers: the fast weights,
  the ascent point and (adaptive) :math:`f_1`, inside the call.

  What is verified: transcribed from ``Lookbehind_SAM`` (``lookbehind.py``)
  and its training loop (``example_cifar.py``) in
  ``chandar-lab/Lookbehind-SAM``: ``descent_step`` restores the cached fast
  weights, steps the base optimizer there, caches the result and puts the
  perturbed point back, so the next ascent starts from it; after ``k``
  descents the fast weights are interpolated with the cached slow ones
  (fixed ``alpha`` or the per-tensor cosine rule) and both caches reset to
  the result. The gradient norm there adds ``1e-16``; here ``eps``
  (1e-12). Not copied: the ASAM variant's rule of scaling tensors named
  ``weight`` only (pass ``perturbation=perturbations.adaptive(eta, mask=...)``
  for it), and the re-evaluated ascent gradients (above). The paper's
  pseudo-code was not compared.

  Choosing rho: SAM's scale per ascent step: the authors run
  Lookbehind-SAM with ρ = 0.05, k = 2 and adaptive α, and Lookbehind-ASAM
  with ρ = 0.5 (README of chandar-lab/Lookbehind-SAM, ICML 2024); their
  class defaults are ρ = 0.5, k = 5, α = 0.5, and the paper's grid used
  α ∈ {0.2, 0.5, 0.8}. With k steps the perturbation grows to kρ, so keep ρ
  at or below SAM's value (Foret et al., 2021) as k grows.

  Args:
    base_optimizer: the optimizer that takes each inner descent step (for
      example ``optax.sgd(lr, momentum=0.9)``); its state persists across
      calls.
    rho: the length of each ascent step (a number or a schedule of the
      ``update`` count).
    k: the number of ascent/descent steps per ``update`` (a Python int).
    alpha: the slow weights' step toward the fast ones, in ``[0, 1]``, or
      ``"adaptive"`` (the per-leaf cosine rule).
    perturbation: the ascent's direction part (default
      :func:`sam_optax.perturbations.l2`; ``perturbations.adaptive`` gives
      Lookbehind-ASAM).
    eps: added to the gradient norm of the default perturbation.
    nonfinite: what a step whose update is not finite (a NaN or inf
      gradient at any of the points) does: ``"skip"`` (default) returns a
      zero update and keeps the state (the base optimizer's included) as it
      was, ``"propagate"`` passes it on; both count it in
      ``LookbehindState.nonfinite_count``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=`` or ``grad_fn=`` and returns the parameter update; its state
    is a :class:`LookbehindState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = {"w": jnp.array([[2.0, -0.5], [0.1, 0.3]]), "b": jnp.zeros(2)}
    >>> loss_fn = lambda p: jnp.sum((jnp.ones(2) @ p["w"] + p["b"] - 1.0) ** 2)
    >>> tx = sam_optax.lookbehind_sam(optax.sgd(0.05), rho=0.05, k=2, alpha=0.5)
    >>> state = tx.init(params)
    >>> start = loss_fn(params)
    >>> for _ in range(20):
    ...   grads = jax.grad(loss_fn)(params)
    ...   updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params) < 0.1 * start)
    True

  References:
    Mordido, Malviya, Baratin, Chandar, *Lookbehind-SAM: k steps back, 1
    step forward*, ICML 2024. https://arxiv.org/abs/2307.16704
  """
  caller = "lookbehind_sam"
  if not isinstance(base_optimizer, optax.GradientTransformation):
    raise TypeError(
        f"`{caller}`: `base_optimizer` must be an optax GradientTransformation"
        f" (for example `optax.sgd(lr, momentum=0.9)`); got"
        f" {type(base_optimizer).__name__}."
    )
  validation.check_scalar(caller, "rho", rho, low=0.0, allow_schedule=True)
  validation.check_int(caller, "k", k, low=1)
  full_guard.check(caller, nonfinite)
  adaptive = isinstance(alpha, str)
  if adaptive:
    validation.check_option(caller, "alpha", alpha, ("adaptive",))
  else:
    validation.check_scalar(caller, "alpha", alpha, low=0.0, high=1.0)
  if perturbation is None:
    perturbation = perturbations.l2(eps)
  if not isinstance(perturbation, Perturbation):
    raise TypeError(
        f"`{caller}`: `perturbation` must be a Perturbation from"
        f" `sam_optax.perturbations`; got {type(perturbation).__name__}."
    )
  base = optax.with_extra_args_support(base_optimizer)
  k = int(k)

  def init_fn(params):
    closure.check_floating(caller, params, "`params`")
    return LookbehindState(
        count=jnp.zeros((), jnp.int32),
        base=base.init(params),
        perturbation=perturbation.init(params),
        stats=SAMStats.zeros(),
        nonfinite_count=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, *, loss_fn=None, grad_fn=None,
                **extra_args):
    checks.reject_wrappers(caller)
    oracle = closure.gradient_oracle(caller, params, loss_fn, grad_fn)
    closure.check_same_tree(
        caller, updates, params, "`updates` (the clean gradient)", "params"
    )
    count = state.count
    rho_t = jnp.maximum(jnp.asarray(rho(count) if callable(rho) else rho,
                                    jnp.float32), 0.0)
    slow = tree.widen(params)
    point, fast, g = slow, slow, updates
    base_state, pert_state, first, loss = state.base, state.perturbation, None, 0.0
    for j in range(k):
      if perturbation.prepare is not None:
        pert_state = perturbation.prepare(g, params, pert_state, count)
      d, new_pert = perturbation.direction(g, point, pert_state, count)
      if j == 0:
        kept_pert = new_pert
      point = tree.add_scaled(point, d, rho_t)
      g, loss = oracle(tree.cast_like(point, params))
      fast_params = tree.cast_like(fast, params)
      step, base_state = base.update(g, base_state, fast_params, **extra_args)
      fast = jax.tree.map(lambda f, s: f + s.astype(f.dtype), fast, step)
      if j == 0:
        first = fast
    if adaptive:
      a = jax.tree.map(
          lambda f1, fk, w: (_cosine(f1 - w, fk - w) + 1.0) / 2.0, first, fast, slow
      )
    else:
      a = jax.tree.map(lambda w: jnp.asarray(alpha, w.dtype), slow)
    out = jax.tree.map(lambda fk, w, ai: ai * (fk - w), fast, slow, a)
    out = tree.cast_like(out, params)
    stats = SAMStats.of(
        grad_norm=tree.global_norm(updates),
        perturbed_grad_norm=tree.global_norm(out),
        perturbed_loss=loss,
        rho=rho_t,
        pass_taken=1.0,
    )
    new_state = LookbehindState(
        count=optax.safe_increment(count),
        base=base_state,
        perturbation=kept_pert,
        stats=stats,
        nonfinite_count=state.nonfinite_count,
    )
    return full_guard.apply(
        nonfinite, full_guard.finite(out), out, new_state, state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
