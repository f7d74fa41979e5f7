"""Sharpness-Aware Minimization (SAM) as a chainable gradient transformation."""

from __future__ import annotations

from typing import Any, Optional

import optax

from sam_optax._core import tree, validation
from sam_optax._core.builder import SAMState, ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._parts import perturbations
from sam_optax._parts.compose import sharpness_aware

__all__ = ("SAMState", "normalized_direction", "sam")


def normalized_direction(grads: Any, eps: float) -> Any:
  """SAM's perturbation direction ``g / (‖g‖₂ + eps)``, in at least float32."""
  return tree.scale_wide(grads, 1.0 / (tree.global_norm(grads) + eps))


@validation.reported_as("sam")
def sam(
    rho: ScalarOrSchedule = 0.05,
    *,
    eps: float = 1e-12,
    num_ascent_steps: Optional[int] = None,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimization: the gradient at the worst nearby point.

  SAM minimizes :math:`\max_{\|\epsilon\|_2 \le \rho} L(w + \epsilon)`. Its
  first-order solution moves along the normalized clean gradient

  .. math::

    g = \nabla L(w), \qquad
    \hat\epsilon = \rho \, \frac{g}{\|g\|_2 + \mathrm{eps}}, \qquad
    u = \nabla L(w + \hat\epsilon),

  and hands :math:`u` to the optimizer that follows in the chain. The norm is
  taken over all leaves together, accumulated in at least float32. A zero
  gradient gives a zero perturbation (never NaN).

  ``update(grads, state, params, *, loss_fn=None, grad_fn=None,
  loss_scale=None, sam_pass=None)`` receives the clean gradient :math:`g` at
  ``params`` and needs one of

  * ``loss_fn``: ``params -> loss`` or ``params -> (loss, aux)``. ``aux`` is
    discarded, which is how BatchNorm statistics of the perturbed pass are
    thrown away. Use the same batch and the same dropout key as for ``g``.
  * ``grad_fn``: ``params -> grads``, when gradients are built by hand (loss
    scaling, accumulation, code written for ``optax.contrib.sam``).

  It costs one extra forward and backward pass per step, with no
  conditional in the compiled step: a traced, scheduled or injected ``rho``
  compiles to the same program as a number. A step with ``rho == 0`` (for
  instance the first step of a warm-up schedule) evaluates the gradient at
  ``w`` itself, so it equals ``g`` up to rounding; only a Python ``0``
  removes the pass from the program.

  **Choosing the pass per step.** ``sam_pass``, an optional extra argument of
  ``update``, is a Python bool fixed when the step is traced: ``False`` hands
  on the clean gradient without the pass, ``True`` takes it; ``None`` (the
  default) lets the transform decide. Compile the step with
  ``jax.jit(step, static_argnames="sam_pass")`` to get two programs and
  choose between them in the Python loop, for example SAM on every second
  step with ``sam_pass=(t % 2 == 0)``, or LookSAM's schedule without its
  run-time conditional.

  **Loss scaling.** ``loss_scale``, an optional extra argument of
  ``update``, is the factor by
  which the loss was multiplied (fp16/bf16 loss scaling), so ``grads`` and
  the gradients of ``loss_fn``/``grad_fn`` arrive scaled. They are divided by
  it before the perturbation is built, and the returned gradient is
  unscaled.

  **Position in a chain.** Transformations placed *before* ``sam`` change
  only the clean gradient and hence :math:`\hat\epsilon`; the gradient that
  ``sam`` returns is recomputed by ``loss_fn`` and does not pass through them.
  Transformations placed *after* ``sam`` act on the SAM gradient. So

  * decoupled weight decay at :math:`w` (AdamW style):
    ``chain(sam(rho), add_decayed_weights(wd), sgd(lr))`` or
    ``chain(sam(rho), adamw(lr, weight_decay=wd))``;
  * L2 regularization that also enters :math:`\hat\epsilon` (the original
    JAX implementation): add ``0.5 * wd * ||w||²`` to the loss inside
    ``loss_fn``;
  * gradient clipping belongs *after* ``sam``:
    ``chain(sam(rho), clip_by_global_norm(1.0), sgd(lr))``. Clipping before
    ``sam`` is nearly meaningless, since :math:`\hat\epsilon` is normalized.

  Choosing rho: 0.05, the paper's default, is the usual first value; Foret
  et al. (2021) use 0.1 for fine-tuning, and Bahri et al. (ACL 2022)
  fine-tune T5 with 0.05 (Small) and 0.15 (larger models), chosen from 0.02
  to 0.3. SAM's ρ is the yardstick for the other variants, whose docstrings
  state their ρ relative to it. ``rho="auto"`` adapts the radius during
  training instead.

  Args:
    rho: perturbation radius :math:`\rho \ge 0`, or a schedule: a callable of
      the step count (0, 1, 2, ...) returning :math:`\rho`. Works with
      ``optax.inject_hyperparams(sam_optax.sam)(rho=...)``. A schedule's or
      traced value below 0 is taken as 0, and recorded so in the stats.
      ``"auto"`` (or :func:`sam_optax.auto_rho`) chooses and adapts the
      radius during training; :func:`sam_optax.guarded` adds the collapse
      guard to a number or a schedule.
    eps: small positive constant added to the gradient norm.
    num_ascent_steps: number ``n`` of ascent steps (``None``: one). With
      ``n > 1`` the
      perturbation is built by ``n`` normalized steps of size ``rho / n``,
      each from the gradient at the previous point,
      :math:`\epsilon_{k+1} = \epsilon_k + \frac{\rho}{n}
      \frac{\nabla L(w + \epsilon_k)}{\|\nabla L(w + \epsilon_k)\|}`
      with :math:`\epsilon_0 = 0`, then the gradient at
      :math:`w + \epsilon_n` is returned: ``n + 1`` gradient evaluations in
      all, the first being the clean gradient the caller passes in. A
      Python ``int`` is unrolled (the closure is traced ``n`` times); a
      traced one runs in a ``lax.fori_loop``. The default ``None`` keeps it
      out of the values ``optax.inject_hyperparams`` traces.
    renormalize: if ``True``, rescale the returned gradient to the norm of
      the clean gradient, :math:`u \leftarrow u \, \|g\| / \|u\|`
      (StableSAM). SAM's gradient can be much longer than the clean one,
      which destabilizes training at learning rates where SGD is stable.
    nonfinite: what happens when the perturbed gradient is not finite (NaN
      or Inf) while the clean one is. The step is counted in
      ``SAMState.nonfinite_count`` and the variant's state keeps its last
      finite value; the gradient handed on is

      * ``"skip"`` (default): zero, so the optimizer that follows takes no
        gradient step (its momentum still moves the weights, as on any
        zero gradient). Costs nothing on finite steps.
      * ``"fallback"``: the clean gradient, a plain step. This keeps the
        clean gradient alive through the perturbed pass: one more
        parameter-sized buffer of memory on every step.
      * ``"propagate"``: the non-finite gradient, for
        ``optax.apply_if_finite`` placed *after* this transform to skip the
        whole update, optimizer state included:
        ``chain(sam(rho, nonfinite="propagate"), apply_if_finite(base, n))``.

      A non-finite *clean* gradient is handed on as NaN, without a perturbed
      pass at a non-finite point, without touching the variant's state and
      without counting, so that ``optax.apply_if_finite`` around the chain
      skips and counts the step.
    axis_name: the name of the mapped axis (``jax.shard_map``, ``jax.pmap``
      or ``jax.vmap``) over which the batch is split, or a tuple of names.
      Each member passes its own *local* clean gradient; the perturbation
      is built from it (per-device SAM, the m-sharpness of the paper) and
      the returned gradient is averaged over the axis, so every member
      applies the same update. Under ``shard_map`` with ``check_vma=True``
      take the clean gradient with respect to
      ``jax.lax.pcast(params, axis_name, to="varying")``; a gradient that
      is already summed over the axis is rejected.
    sync_perturbation: with ``axis_name``, average the clean gradient over
      the axis before building the perturbation (one perturbation for the
      whole batch).
    group_size: with ``axis_name`` (a single name), average the clean
      gradient over groups of ``group_size`` consecutive members: ``m``
      between per-device (1) and synchronized (the axis size). Must divide
      the axis size.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SAMState`.

  Raises:
    ValueError: if ``rho`` is negative, ``eps`` is not positive,
      ``num_ascent_steps`` is not a positive int or ``renormalize`` not a bool.

  Examples:
    One SAM step on a quadratic, chained with SGD:

    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(w):
    ...   return 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * w ** 2)
    >>> params = jnp.array([1.0, 1.0])
    >>> tx = optax.chain(sam_optax.sam(rho=0.1), optax.sgd(0.05))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    >>> params = optax.apply_updates(params, updates)
    >>> [round(float(x), 4) for x in params]
    [0.9495, 0.4502]
    >>> round(float(sam_optax.sam_stats(state).perturbed_loss), 4)
    6.5545

    A ρ schedule counts SAM steps from 0:

    >>> rho = optax.linear_schedule(0.0, 0.05, transition_steps=1000)
    >>> tx = optax.chain(sam_optax.sam(rho), optax.adam(1e-3))

  References:
    Foret, Kleiner, Mobahi, Neyshabur, *Sharpness-Aware Minimization for
    Efficiently Improving Generalization*, ICLR 2021.
    https://arxiv.org/abs/2010.01412

    Renormalization: *Stabilizing Sharpness-Aware Minimization Through A
    Simple Renormalization Strategy*, 2024. https://arxiv.org/abs/2401.07250
  """
  return sharpness_aware(
      rho,
      perturbation=perturbations.l2(eps),
      eps=eps,
      num_ascent_steps=num_ascent_steps,
      renormalize=renormalize,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="sam",
  )
