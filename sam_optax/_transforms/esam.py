"""Efficient SAM (ESAM): random weight masks and sharpness-sensitive data selection."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._core.prng import PRNG, KeyLike
from sam_optax._parts import perturbations
from sam_optax._parts.compose import sharpness_aware

__all__ = ("esam", "num_selected", "sds_loss")


def num_selected(gamma: Any, batch_size: int) -> jax.Array:
  """``ceil(gamma * batch_size)``, at least 1 and at most ``batch_size`` (int32).

  A relative tolerance of 1e-6 keeps round-off in ``gamma * batch_size``
  from adding an example (``0.3 * 10`` selects 3).
  """
  x = jnp.asarray(gamma, jnp.float32) * batch_size
  k = jnp.ceil(x * (1.0 - 1e-6)).astype(jnp.int32)
  return jnp.clip(k, 1, batch_size)


def _per_example(caller: str, out: Any, what: str) -> jax.Array:
  if isinstance(out, (tuple, list)):
    if len(out) != 2:
      raise TypeError(
          f"`{caller}`: {what} returned a sequence of length {len(out)}; it"
          " must return per-example losses or a `(losses, aux)` pair."
      )
    out = out[0]
  out = jnp.asarray(out)
  if out.ndim > 1 or not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(
        f"`{caller}`: {what} must return a vector of per-example losses of"
        f" shape (batch,) (or a scalar, a batch of one); got shape"
        f" {out.shape} and dtype {out.dtype}. Build it with"
        " `reduction='none'`-style losses, e.g."
        " `optax.softmax_cross_entropy_with_integer_labels(logits, labels)`"
        " without `.mean()`."
    )
  return out


def sds_loss(
    loss_fn: Callable[..., Any],
    params: Any,
    gamma: Any,
    clean_losses: Optional[jax.Array] = None,
    *,
    caller: str = "esam",
) -> Callable[[Any], jax.Array]:
  """The scalar loss whose gradient at ``w + ε`` is ESAM's SDS gradient.

  ``loss_fn(p)`` returns per-example losses of shape ``(B,)`` (or a
  ``(losses, aux)`` pair). The returned function evaluates them at ``p``,
  ranks the examples by ``l_i(p) - l_i(params)`` (held constant under
  differentiation) and returns the mean loss over the ``ceil(gamma * B)``
  highest-ranked ones. ``l_i(params)`` is ``clean_losses`` if given, else
  one extra forward pass. A scalar loss is a batch of one and is returned
  as it is.
  """

  def selected_mean(p: Any) -> jax.Array:
    losses = _per_example(caller, loss_fn(p), "`loss_fn`")
    if losses.ndim == 0:
      return losses
    (batch,) = losses.shape
    if clean_losses is None:
      clean = _per_example(caller, loss_fn(params), "`loss_fn`")
    else:
      clean = jnp.asarray(clean_losses)
      if clean.shape != losses.shape:
        raise ValueError(
            f"`{caller}`: `clean_losses` must have the shape of the"
            f" per-example losses returned by `loss_fn`, {losses.shape}; got"
            f" {clean.shape}."
        )
    wide = jnp.promote_types(losses.dtype, jnp.float32)
    sharpness = jax.lax.stop_gradient(
        losses.astype(wide) - clean.astype(wide)
    )
    # Rank by sharpness, largest first; ties go to the lower index.
    _, order = jax.lax.top_k(sharpness, batch)
    rank = jnp.zeros((batch,), jnp.int32).at[order].set(
        jnp.arange(batch, dtype=jnp.int32)
    )
    k = num_selected(gamma, batch)
    weights = jnp.where(rank < k, 1.0 / k.astype(wide), 0.0).astype(wide)
    return jnp.sum(weights * losses.astype(wide))

  return selected_mean


@validation.reported_as("esam")
def esam(
    rho: ScalarOrSchedule = 0.05,
    beta: float = 0.6,
    gamma: float = 0.5,
    *,
    key: KeyLike = 0,
    eps: float = 1e-12,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Efficient SAM: a randomly masked perturbation, and the sharpest examples only.

  **Stochastic weight perturbation (SWP).** Every step, each leaf of the
  parameter tree (one weight tensor) is kept with probability
  :math:`\beta`; with :math:`m_j \in \{0, 1\}` the mask of leaf :math:`j`,

  .. math::

    \hat\epsilon = \frac{\rho}{\beta} \,
      \frac{m \odot g}{\|m \odot g\|_2 + \mathrm{eps}} .

  As in the official implementation the mask is drawn per tensor (dropped
  tensors get no perturbation) and the norm is that of the masked gradient.

  **Sharpness-sensitive data selection (SDS).** With per-example losses
  :math:`l_i`, rank the examples by
  :math:`l_i(w + \hat\epsilon) - l_i(w)`, keep the
  :math:`k = \lceil \gamma B \rceil` largest (ties: lower index first) and
  return

  .. math::

    u = \nabla_w \frac{1}{k} \sum_{i \in \text{top-}k}
        l_i(w)\Big|_{w + \hat\epsilon} ,

  so the other examples have no influence on ``u``. (The official code keeps
  the examples strictly sharper than the :math:`\lfloor \gamma B
  \rfloor`-th sharpest, :math:`\lfloor \gamma B \rfloor - 1` of them: one
  fewer where :math:`\gamma B` is an integer, two fewer otherwise.)

  **Per-example loss protocol.** ``update(grads, state, params, *,
  loss_fn, clean_losses=None)``: ``loss_fn(params)`` returns a vector of
  per-example losses of shape ``(B,)`` (or a ``(losses, aux)`` pair), on the
  batch whose mean loss gave ``grads``. The clean losses :math:`l_i(w)` are

  * ``clean_losses=``, a ``(B,)`` array, when given: the caller's first
    pass produces them for free by returning them as ``aux`` (see the
    example);
  * otherwise recomputed by one extra forward pass at :math:`w`.

  Cost per step, besides the caller's pass: one forward and one backward
  pass at :math:`w + \hat\epsilon` over the whole batch (the forward serves
  both the ranking and the gradient), plus the clean forward unless
  ``clean_losses`` is passed. Shapes are static under ``jit``, so the
  backward pass runs over all :math:`B` examples, the unselected ones with
  zero weight: SDS decides *which* examples drive the update but, unlike in
  the paper, does not shrink the backward pass; and SWP does not save the
  clean gradient's computation, which the caller has already done.

  SWP is the perturbation part :func:`sam_optax.perturbations.random_mask`
  (``beta, key, inner=perturbations.l2(eps)``), usable with any direction
  and policy of :func:`sam_optax.sharpness_aware`; SDS is a property of the
  loss closure, ``sds_loss``, which ``update`` applies to ``loss_fn``.

  A scalar ``loss_fn`` is a batch of one: SDS then keeps it. With
  ``grad_fn=`` instead of ``loss_fn=`` there are no per-example losses and
  only SWP applies (as with ``gamma = 1``). ``rho == 0`` as a Python number
  returns ``g`` unchanged and compiles no pass.

  Choosing rho: SAM's values. The authors' scripts (Du et al., 2022,
  official code) use ρ = 0.05 for ResNet-18, 0.1 for WideResNet and 0.2 for
  PyramidNet on CIFAR-10 and CIFAR-100, with β = 0.5 to 0.6 and γ = 0.5.
  Since the kept leaves are perturbed by ρ/β, the perturbation is 1/β times
  (1.7 to 2 times) as long as SAM's at the same ρ.

  Args:
    rho: perturbation radius or a schedule of the step count.
    beta: probability :math:`\beta \in (0, 1]` that a leaf is perturbed
      (0.5-0.6 in the authors' scripts).
    gamma: fraction :math:`\gamma \in (0, 1]` of the batch that gives the
      gradient (0.5 in the authors' scripts). A number, also traced under
      ``optax.inject_hyperparams``: the selection is a mask, not a slice.
    key: a non-negative int seed or a JAX PRNG key for the masks.
    eps: added to the norm of the masked gradient.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`~sam_optax.SAMState`; its ``variant.perturbation`` is a
    :class:`~sam_optax.perturbations.RandomMaskState`. ``sam_stats(state).perturbed_loss`` is the mean loss of the
    selected examples at :math:`w + \hat\epsilon`.

  Raises:
    ValueError: if ``rho`` is negative, ``beta`` or ``gamma`` outside
      ``(0, 1]``, ``eps`` not positive, or ``key`` not a seed or key.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> x = jnp.linspace(-1.0, 1.0, 8)[:, None]
    >>> y = jnp.sin(3 * x[:, 0])
    >>> def losses_fn(p):  # per-example losses, shape (8,)
    ...   return (x @ p["w"] + p["b"] - y) ** 2
    >>> params = {"w": jnp.ones(1), "b": jnp.zeros(())}
    >>> tx = optax.chain(sam_optax.esam(rho=0.05, beta=0.6, gamma=0.5, key=0),
    ...                  optax.sgd(0.1))
    >>> def mean_loss(p):  # one forward: the mean, and the losses as aux
    ...   losses = losses_fn(p)
    ...   return losses.mean(), losses
    >>> state = tx.init(params)
    >>> (loss, clean), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=losses_fn,
    ...                            clean_losses=clean)
    >>> params = optax.apply_updates(params, updates)
    >>> float(sam_optax.sam_stats(state).pass_taken)
    1.0

  References:
    Du, Yan, Feng, Zhou, Zhen, Goh, Tan, *Efficient Sharpness-aware
    Minimization for Improved Training of Neural Networks*, ICLR 2022.
    https://arxiv.org/abs/2110.03141
  """
  validation.check_scalar(
      "esam", "beta", beta, low=0.0, high=1.0, low_inclusive=False
  )
  validation.check_scalar(
      "esam", "gamma", gamma, low=0.0, high=1.0, low_inclusive=False
  )
  validation.check_scalar("esam", "eps", eps, low=0.0, low_inclusive=False)
  PRNG.of("esam", key)  # a bad key is reported under this name
  inner = sharpness_aware(
      rho,
      perturbation=perturbations.random_mask(
          beta, key, inner=perturbations.l2(eps)
      ),
      eps=eps,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="esam",
  )

  def update_fn(
      updates: Any,
      state: Any,
      params: Optional[Any] = None,
      *,
      loss_fn: Optional[Callable[..., Any]] = None,
      grad_fn: Optional[Callable[[Any], Any]] = None,
      clean_losses: Optional[jax.Array] = None,
      **extra_args: Any,
  ):
    if loss_fn is not None and callable(loss_fn):
      loss_fn = sds_loss(loss_fn, params, gamma, clean_losses)
    return inner.update(
        updates, state, params, loss_fn=loss_fn, grad_fn=grad_fn, **extra_args
    )

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
