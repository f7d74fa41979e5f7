"""DGSAM: gradual, one-domain-at-a-time perturbation for domain generalization."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import checks, closure, collectives, tree, validation
from sam_optax._core.builder import SAMState, ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._core.prng import PRNG, KeyLike
from sam_optax._core.stats import SAMStats

__all__ = ("dgsam",)

PyTree = Any
_CALL = """\
    def domain_loss_fn(params, d):        # the loss of domain d (a traced int)
      return loss(params, xs[d], ys[d])   # xs, ys: the domains' batches, stacked
    updates, opt_state = tx.update(grads, opt_state, params,
                                   domain_loss_fn=domain_loss_fn)

or `loss_fn=` returning the vector of the domains' losses (each of the
S + 1 gradients then evaluates every domain's loss)."""


def _vector(caller: str, out: Any) -> jax.Array:
  if isinstance(out, (tuple, list)):
    if len(out) != 2:
      raise TypeError(
          f"`{caller}`: `loss_fn` returned a sequence of length {len(out)};"
          " it must return the vector of per-domain losses or a"
          " `(losses, aux)` pair."
      )
    out = out[0]
  out = jnp.asarray(out)
  if out.ndim != 1 or not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(
        f"`{caller}`: `loss_fn` must return the vector of per-domain losses,"
        f" shape (num_domains,); got shape {out.shape} and dtype {out.dtype}."
        " A scalar (pooled) loss cannot be split into domains. Return"
        " `jnp.stack([loss_1, ..., loss_S])`, or pass `domain_loss_fn=`:\n\n"
        + _CALL
    )
  return out


def _domain_gradient(
    caller: str,
    params: PyTree,
    loss_fn: Optional[Callable[..., Any]],
    domain_loss_fn: Optional[Callable[..., Any]],
    num_domains: Optional[int],
) -> tuple[Callable[[PyTree, jax.Array], tuple[jax.Array, PyTree]], int]:
  """``(point, d) -> (L_d(point), ∇L_d(point))`` and the number of domains."""
  if (loss_fn is None) == (domain_loss_fn is None):
    raise TypeError(
        f"`{caller}` needs exactly one of `loss_fn` (per-domain losses) and"
        " `domain_loss_fn` (the loss of one domain), as a keyword argument"
        " of `update`:\n\n" + _CALL
    )
  if domain_loss_fn is not None:
    if not callable(domain_loss_fn):
      raise TypeError(f"`{caller}`: `domain_loss_fn` must be callable (params, d) -> loss.")
    if num_domains is None:
      raise ValueError(
          f"`{caller}`: with `domain_loss_fn`, the number of domains must be"
          f" given at construction: `sam_optax.{caller}(rho, num_domains=S)`."
      )
    scalar = lambda p, d: closure.scalar_loss(caller, domain_loss_fn(p, d))  # noqa: E731
    return jax.value_and_grad(scalar), num_domains
  if not callable(loss_fn):
    raise TypeError(f"`{caller}`: `loss_fn` must be callable (params -> losses).")
  shape = jax.eval_shape(lambda p: _vector(caller, loss_fn(p)), params).shape
  if num_domains is not None and shape != (num_domains,):
    raise ValueError(
        f"`{caller}`: `loss_fn` returned {shape[0]} domain losses, but"
        f" `num_domains={num_domains}`."
    )
  one = lambda p, d: _vector(caller, loss_fn(p))[d]  # noqa: E731
  return jax.value_and_grad(one), shape[0]


@validation.reported_as("dgsam")
def dgsam(
    rho: ScalarOrSchedule = 0.05,
    *,
    num_domains: Optional[int] = None,
    key: KeyLike = 0,
    eps: float = 1e-12,
    scale_by_domains: bool = False,
    axis_name: Optional[AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Domain-wise Gradual SAM: perturb one source domain at a time.

  SAM on the pooled loss of several training domains can land in minima
  that are flat for the total and sharp for single domains. DGSAM takes
  :math:`S + 1` single-domain gradients per step, in a random order
  :math:`\pi` drawn afresh every step, each at the point the previous ones
  moved to, and descends along all of them:

  .. math::

    \tilde w_0 = w, \quad g_i = \nabla L_{\pi(i \bmod S)}(\tilde w_i), \quad
    \tilde w_{i+1} = \tilde w_i + \rho \frac{g_i}{\|g_i\|_2 + \mathrm{eps}}
    \quad (i = 0, \dots, S), \qquad
    u = \frac{1}{S + 1} \sum_{i=0}^{S} g_i .

  The first domain is evaluated twice, at :math:`w` and after every domain's
  step; the perturbations add up (each of length :math:`\rho`). The cost is
  :math:`S + 1` single-domain forward/backward passes, against ERM's
  :math:`S` and SAM's :math:`2S` on the same batches.

  What is verified, and what not: the loop above is transcribed from a
  DomainBed ``DGSAM`` optimizer that states it was extracted from the
  authors' code; the paper's Algorithm 1 and its cost section could not be
  read. A published review of the paper confirms the random order (drawn in
  Algorithm 1, line 3) and the reuse of the ascent gradients in the
  descent. That code hands on :math:`S/(S+1) \sum_i g_i`, :math:`S` times
  the mean: ``scale_by_domains=True`` reproduces it (with SGD, a learning
  rate :math:`S` times larger; with Adam the step is almost unchanged, but
  a coupled weight decay weighs :math:`S` times less against it).

  The clean gradient handed to ``update`` is checked for its structure but
  not used: every gradient comes from the closure. Under ``jit`` a clean
  gradient computed only to be handed in is removed by the compiler.

  Choosing rho: the transcribed code defaults to ρ = 0.05, SAM's usual
  value (Foret et al., 2021); the paper's values could not be read. Each
  domain's step has length ρ, so the total perturbation can reach
  :math:`S\rho`.

  Args:
    rho: the length of each domain's ascent step (a number or a schedule).
    num_domains: the number :math:`S` of training domains; needed with
      ``domain_loss_fn``, checked against ``loss_fn``'s output otherwise.
    key: a seed or a ``jax.random`` key for the domain order.
    eps: added to each gradient norm.
    scale_by_domains: hand on :math:`S/(S+1) \sum_i g_i` as the authors'
      code does, instead of the mean.
    axis_name: average the output over this data-parallel axis (each member
      takes its gradients on its own batches, in the same domain order).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``domain_loss_fn=(params, d) -> loss`` (one domain, ``d`` a traced
    int32) or ``loss_fn=params -> losses`` (the vector of the :math:`S`
    domain losses, or ``(losses, aux)``; simpler, but each gradient then
    computes every domain's loss).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> centres = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 domains
    >>> def domain_loss_fn(w, d):
    ...   return jnp.sum((w - centres[d]) ** 2)
    >>> tx = optax.chain(sam_optax.dgsam(0.05, num_domains=3), optax.sgd(0.1))
    >>> w = jnp.zeros(2)
    >>> state = tx.init(w)
    >>> for _ in range(100):
    ...   grads = jax.tree.map(jnp.zeros_like, w)   # not used by DGSAM
    ...   updates, state = tx.update(grads, state, w, domain_loss_fn=domain_loss_fn)
    ...   w = optax.apply_updates(w, updates)
    >>> bool(jnp.allclose(w, centres.mean(axis=0), atol=0.05))
    True

  References:
    Song, Hwang, Lee, Lee, Lim, *Domain Generalization via Individual
    Sharpness-Aware Minimization* (DGSAM), 2025.
    https://arxiv.org/abs/2503.23430
  """
  caller = "dgsam"
  validation.check_scalar(caller, "rho", rho, low=0.0, allow_schedule=True)
  validation.check_scalar(caller, "eps", eps, low=0.0, low_inclusive=False)
  if num_domains is not None:
    if isinstance(num_domains, jax.core.Tracer):
      raise TypeError(
          f"`{caller}`: `num_domains` must be a Python int (it fixes the"
          " number of gradients per step); it was traced. With"
          " `optax.inject_hyperparams`, keep it static:"
          f" `optax.inject_hyperparams(sam_optax.{caller},"
          " static_args=('num_domains',))(rho, num_domains=S)`."
      )
    validation.check_int(caller, "num_domains", num_domains, low=1)
    num_domains = int(num_domains)
  if not isinstance(scale_by_domains, bool):
    raise ValueError(
        f"`{caller}`: `scale_by_domains` must be True or False; got"
        f" scale_by_domains={scale_by_domains!r}."
    )
  collectives.check_options(caller, axis_name, False, None)
  axis = collectives.Axis(axis_name)
  prng = PRNG.of(caller, key)

  def init_fn(params: PyTree) -> SAMState:
    closure.check_floating(caller, params, "`params`")
    return SAMState(
        count=jnp.zeros((), jnp.int32),
        stats=SAMStats.zeros(),
        nonfinite_count=jnp.zeros((), jnp.int32),
        variant=prng.init(),
    )

  def update_fn(
      updates: PyTree,
      state: SAMState,
      params: Optional[PyTree] = None,
      *,
      loss_fn: Optional[Callable[..., Any]] = None,
      domain_loss_fn: Optional[Callable[..., Any]] = None,
      **extra_args: Any,
  ) -> tuple[PyTree, SAMState]:
    del extra_args
    checks.reject_wrappers(caller)
    if params is None:
      raise ValueError(
          f"`{caller}` needs the current parameters: call"
          " `tx.update(grads, opt_state, params, domain_loss_fn=...)`."
      )
    closure.check_same_tree(
        caller, updates, params, "`updates` (the clean gradient)", "params"
    )
    if axis.active:
      axis.check_local(caller, updates)
    grad_of, s = _domain_gradient(caller, params, loss_fn, domain_loss_fn, num_domains)
    key_state, keys = prng.split(state.variant, 1)
    order = jax.random.permutation(keys[0], s)
    count = state.count
    rho_t = jnp.maximum(jnp.asarray(rho(count) if callable(rho) else rho, jnp.float32), 0.0)

    def gradient(point, d):
      loss, g = grad_of(axis.to_varying(point), d)
      closure.check_same_tree(caller, g, params, "a domain's gradient", "params")
      return tree.widen(g), loss.astype(jnp.float32)

    def ascend(carry, d):
      point, total = carry
      g, _ = gradient(point, d)
      norm = tree.global_norm(g)
      point = tree.add_scaled(point, g, rho_t / (norm + eps))
      total = jax.tree.map(jnp.add, total, g)
      return (point, total), norm

    zeros = jax.tree.map(jnp.zeros_like, tree.widen(params))
    # Unrolled (S is small and static): one program per domain step, and
    # XLA's cost analysis counts every step.
    (point, total), norms = jax.lax.scan(ascend, (params, zeros), order, unroll=True)
    g_last, loss_last = gradient(point, order[0])  # the first domain, again
    total = jax.tree.map(jnp.add, total, g_last)
    factor = (s if scale_by_domains else 1.0) / (s + 1)
    out = tree.cast_like(tree.scale_wide(total, jnp.asarray(factor, jnp.float32)), updates)
    out = axis.mean(out)
    out_norm = tree.global_norm(out)
    finite = jnp.isfinite(out_norm)
    stats = SAMStats.of(
        grad_norm=norms[0],
        perturbed_grad_norm=out_norm,
        perturbed_loss=loss_last,
        rho=rho_t,
        pass_taken=1.0,
    )
    stats = axis.agree(stats)  # one record for every member
    return out, SAMState(
        count=optax.safe_increment(count),
        stats=stats,
        nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
        variant=key_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
