"""SAMPa: sharpness-aware minimization with its two gradients in parallel."""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import builder, tree, validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName

__all__ = ("SAMPaState", "sampa")

PyTree = Any


class SAMPaState(NamedTuple):
  """SAMPa's state (inside ``SAMState.variant``).

  Attributes:
    gradient: :math:`\\nabla f(y_t)`, the gradient at the last extrapolated
      point (zeros before the first step), in at least float32; the next
      ascent follows it.
    momentum: the base optimizer's momentum buffer as SAMPa predicts it,
      :math:`b_t = \\mu b_{t-1} + u_t + \\mathrm{wd}\\, x_t` (``()`` without
      ``momentum``).
  """

  gradient: PyTree
  momentum: PyTree


def _is_zero(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == 0


def _rule(learning_rate, lam, momentum, weight_decay, eps, parallel) -> builder.Rule:
  keep_buffer = not _is_zero(momentum)
  decay = not _is_zero(weight_decay)

  def init(params):
    zeros = tree.widen(optax.tree.zeros_like(params))
    return SAMPaState(gradient=zeros, momentum=zeros if keep_buffer else ())

  def direction(g, params, state, count):
    # ε = ρ ∇f(y_t) / (‖∇f(y_t)‖ + eps): the stored gradient, not g (0 at step 0).
    del g, params, count
    h = state.gradient
    return tree.scale_wide(h, 1.0 / (tree.global_norm(h) + eps)), state

  def companion(params, state, count):
    # y_{t+1} = x_t - lr_t (∇f(y_t) + [t > 0] (wd x_t + μ b_{t-1})).
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    started = count > 0

    def leaf(x, h, b):
      wide = h.dtype
      step = h
      extra = jnp.zeros((), wide)
      if decay:
        extra = jnp.asarray(weight_decay, wide) * x.astype(wide)
      if keep_buffer:
        extra = extra + jnp.asarray(momentum, wide) * b
      if decay or keep_buffer:
        step = step + jnp.where(started, extra, jnp.zeros_like(extra))
      return x.astype(wide) - jnp.asarray(lr, wide) * step

    buffers = state.momentum if keep_buffer else state.gradient
    return jax.tree.map(leaf, params, state.gradient, buffers)

  def combine(g, grads, params, state):
    # u = (1 - λ) ∇f(x̃_t) + λ ∇f(y_{t+1}); ∇f(y_{t+1}) kept for the next ascent.
    del g
    g_adv, g_y = grads

    def mix(a, c, h):
      a, c = a.astype(h.dtype), c.astype(h.dtype)
      lam_ = jnp.asarray(lam, h.dtype)
      return (1 - lam_) * a + lam_ * c

    out = jax.tree.map(mix, g_adv, g_y, state.gradient)
    kept = jax.tree.map(lambda c, h: c.astype(h.dtype), g_y, state.gradient)
    buf = state.momentum
    if keep_buffer:

      def advance(b, u, x):
        new = jnp.asarray(momentum, b.dtype) * b + u
        if decay:
          new = new + jnp.asarray(weight_decay, b.dtype) * x.astype(b.dtype)
        return new

      buf = jax.tree.map(advance, state.momentum, out, params)
    return out, SAMPaState(gradient=kept, momentum=buf)

  return builder.Rule(
      init=init,
      direction=direction,
      combine=combine,
      companion=companion,
      parallel=parallel,
      pass_closure=("previous_loss_fn", "previous_grad_fn"),
      reads_clean=False,
  )


@validation.reported_as("sampa")
def sampa(
    learning_rate: Union[float, Callable[[jax.Array], Any]],
    rho: ScalarOrSchedule = 0.1,
    lam: float = 0.2,
    *,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    parallel: bool = False,
    eps: float = 1e-12,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SAMPa: SAM whose two gradients can be computed at the same time.

  SAM's perturbed gradient waits for the clean one. SAMPa (Xie, Pethick and
  Cevher, NeurIPS 2024) perturbs along the gradient at an extrapolated point
  :math:`y_t` taken on the previous step instead, so the two gradients of a
  step are independent:

  .. math::

    \tilde x_t = x_t + \rho \frac{\nabla f(y_t)}{\|\nabla f(y_t)\|_2 + \mathrm{eps}},
    \qquad
    y_{t+1} = x_t - \eta_t \nabla f(y_t), \qquad
    u_t = (1-\lambda)\, \nabla f(\tilde x_t) + \lambda\, \nabla f(y_{t+1}),

  and :math:`u_t` is handed to the base optimizer chained after this
  transform; :math:`\nabla f(y_{t+1})` is kept for the next step's ascent.
  On step 0, :math:`\nabla f(y_0) = 0`: no ascent, :math:`y_1 = x_0`, and
  :math:`u_0` is the gradient at :math:`x_0`. :math:`y_{t+1}` predicts the
  base optimizer's next iterate: with ``momentum`` :math:`\mu` and
  ``weight_decay`` :math:`\mathrm{wd}` (those of the base optimizer, which
  must then be ``chain(sampa(...), add_decayed_weights(wd), sgd(lr,
  momentum=mu))``, torch's ``SGD(lr, momentum, weight_decay)``), from step
  1 on :math:`y_{t+1} = x_t - \eta_t (\nabla f(y_t) + \mathrm{wd}\, x_t +
  \mu b_{t-1})`, with :math:`b` the buffer that SGD holds, mirrored here
  from the outputs (:math:`b_t = \mu b_{t-1} + u_t + \mathrm{wd}\, x_t`).
  ``learning_rate`` is :math:`\eta_t`, a number or the base optimizer's
  schedule, evaluated at the step count from 0. The extrapolation is
  stable for a smaller step than SGD: along a direction of curvature
  :math:`L`, :math:`y_{t+1} \approx x_t - \eta L\, y_t` needs
  :math:`\eta L < 1`, half of SGD's bound (on a quadratic with
  :math:`L = 10`, :math:`\eta = 0.1` with momentum diverges).

  **Batches and closures.** In the authors' loop, :math:`\nabla f(y_t)`
  was taken on the previous batch :math:`B_{t-1}`, and so is the perturbed
  gradient :math:`\nabla f(\tilde x_t)`; :math:`\nabla f(y_{t+1})` is taken
  on the current batch :math:`B_t`. ``update`` takes

  * ``loss_fn`` (or ``grad_fn``): the current batch, for
    :math:`\nabla f(y_{t+1}; B_t)`;
  * ``previous_loss_fn`` (or ``previous_grad_fn``), optional: the previous
    batch, for :math:`\nabla f(\tilde x_t; B_{t-1})`, the authors' schedule
    (on step 0 pass the current batch's closure, as their loop does).
    Without it the perturbed gradient is taken on the current batch too,
    an approximation that needs no batch kept between steps.

  The clean gradient handed to ``update`` is checked for its structure and
  otherwise not read (``SAMState.stats.grad_norm`` is 0): inside ``jax.jit``
  its computation is dead code, so the usual training step costs SAMPa's two
  passes (``benchmarks/variant_cost.py`` measures 2.0× a plain step);
  outside ``jit`` pass zeros to skip computing it.

  **Parallel form.** ``parallel=True`` evaluates the two gradients in one
  ``jax.vmap`` over the two points (a batch of two parameter sets through
  the closure), which XLA can run as one wider program; it needs one
  closure for both, so it cannot take ``previous_loss_fn``. Both forms give
  the same result up to float rounding. On one device it trades twice the
  activation memory for fewer, larger kernels; see
  ``benchmarks/sampa_parallel.py``.

  Cost: 2 forward/backward passes per step, parallel; one float32 buffer for
  :math:`\nabla f(y)`, one more with ``momentum``.

  What is verified: the rule is transcribed from ``train.py`` of the
  official code, ``LIONS-EPFL/SAMPa`` at commit ``01093ef6eb35``, which has
  no optimizer class: worker 0 perturbs along the previous step's
  :math:`\nabla f(y)` with ``rho / (‖·‖ + 1e-12)``, takes the smoothed
  cross-entropy gradient on the previous batch and sends
  :math:`(1-\lambda)\nabla f(\tilde x)`; worker 1 moves to
  ``x - lr * (g_y + wd * x + momentum * buf)`` (``g_y`` alone before SGD
  has a momentum buffer), takes the gradient on the current batch and sends
  :math:`\lambda \nabla f(y)`; the sum goes to ``torch.optim.SGD(lr,
  momentum=0.9, weight_decay=5e-4)``; ``rho=0.1``, ``og`` (λ) ``=0.2``.
  ``tests/test_sampa.py`` compares this transform chained with
  ``add_decayed_weights`` and ``sgd(momentum)`` to a float64 transcription
  of that loop over several steps and batches. Not copied: worker 0
  recovers :math:`\nabla f(y)` as ``(sum - own part) / (λ + 1e-15)``, which
  rounds, and is 0 for λ = 0 (the code then never perturbs; here λ = 0 is
  the paper's SAMPa-0, perturbed along the stored gradient); both workers
  restore the weights as ``(x - a) + a``, which rounds and lets the two
  replicas drift apart; with ``momentum=0`` torch keeps no buffer and the
  code's prediction then drops the weight decay, kept here.

  Choosing rho: the authors use ρ = 0.1 with λ = 0.2 on CIFAR-10 (their
  default; ρ = 0.05 for SAM on the same models, Foret et al., 2021). The
  perturbation has length ρ as in SAM, along a gradient one step old, so
  SAM's ρ (or slightly larger) is the first value to try. With traced or
  scheduled ρ the program is the same; a ρ of 0 still mixes in
  :math:`\lambda \nabla f(y_{t+1})` (only ``lam=0`` with ``rho=0`` is the
  base optimizer). ``rho="auto"`` and the radius controllers are rejected:
  they measure the perturbed gradient against the clean one, which SAMPa
  does not compute.

  Args:
    learning_rate: :math:`\eta_t` of the extrapolation, the base
      optimizer's learning rate (a number or a schedule of the count).
    rho: perturbation radius (a number or a schedule).
    lam: :math:`\lambda \in [0, 1]`, the weight of :math:`\nabla f(y_{t+1})`
      in the output (the authors' ``og``).
    momentum: the base SGD's momentum :math:`\mu` for the extrapolation
      (0: the paper's :math:`y_{t+1} = x_t - \eta_t \nabla f(y_t)`; the
      authors' code: 0.9).
    weight_decay: the base optimizer's coupled weight decay for the
      extrapolation (the authors' code: 5e-4).
    parallel: evaluate both gradients in one ``jax.vmap`` (see above).
      Keep it static under ``optax.inject_hyperparams``
      (``static_args=("parallel",)``).
    eps: added to :math:`\|\nabla f(y_t)\|`.
    nonfinite: ``"skip"`` (default) or ``"propagate"``, see
      :func:`sam_optax.sam`; the stored gradient and buffer keep their last
      finite values. ``"fallback"`` (the clean gradient) is refused: SAMPa
      does not read it.
    axis_name: see :func:`sam_optax.sam`. Each member takes its gradients
      on its own batch; the output and the stored gradient are averaged
      over the axis, so the next ascent follows the mean gradient.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`~sam_optax.SAMState` holding a :class:`SAMPaState`.

  Raises:
    ValueError: if ``rho`` is negative or not a number or a schedule,
      ``lam`` lies outside [0, 1], ``momentum`` or ``weight_decay`` is
      negative, or ``parallel`` is not a bool.

  Examples:
    The authors' schedule: the perturbed gradient on the previous batch.

    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> xs = jnp.array([[1.0, 2.0], [2.0, -1.0], [0.5, 0.5], [-1.0, 1.0]])
    >>> ys = jnp.array([1.0, 0.0, 0.5, 1.0])
    >>> def loss(w, x, y):
    ...   return jnp.mean((x @ w - y) ** 2)
    >>> lr = 0.1
    >>> tx = optax.chain(sam_optax.sampa(lr, rho=0.1, lam=0.2), optax.sgd(lr))
    >>> w = jnp.zeros(2)
    >>> state = tx.init(w)
    >>> previous = None
    >>> for t in range(40):
    ...   batch = (xs[2 * (t % 2):][:2], ys[2 * (t % 2):][:2])
    ...   previous = previous or batch          # step 0: the current batch
    ...   updates, state = tx.update(
    ...       jax.tree.map(jnp.zeros_like, w), state, w,  # not read
    ...       loss_fn=lambda p, b=batch: loss(p, *b),
    ...       previous_loss_fn=lambda p, b=previous: loss(p, *b))
    ...   w = optax.apply_updates(w, updates)
    ...   previous = batch
    >>> bool(loss(w, xs, ys) < 0.5 * loss(jnp.zeros(2), xs, ys))
    True

    The parallel form, both gradients on the current batch:

    >>> tx = optax.chain(sam_optax.sampa(lr, parallel=True), optax.sgd(lr))

  References:
    Xie, Pethick, Cevher, *SAMPa: Sharpness-aware Minimization
    Parallelized*, NeurIPS 2024. https://arxiv.org/abs/2410.10683 (official
    code: https://github.com/LIONS-EPFL/SAMPa, ``train.py``).
  """
  caller = "sampa"
  # A radius controller compares g_p with the clean gradient SAMPa ignores.
  validation.check_scalar(caller, "rho", rho, low=0.0, allow_schedule=True)
  validation.check_scalar(caller, "learning_rate", learning_rate, low=0.0,
                          allow_schedule=True)
  validation.check_scalar(caller, "lam", lam, low=0.0, high=1.0)
  validation.check_scalar(caller, "momentum", momentum, low=0.0)
  validation.check_scalar(caller, "weight_decay", weight_decay, low=0.0)
  if not isinstance(parallel, bool):
    raise ValueError(
        f"`{caller}`: `parallel` must be True or False; got"
        f" parallel={parallel!r}. Under `optax.inject_hyperparams`, keep it"
        " static: `static_args=('parallel',)`."
    )
  return builder.build(
      caller,
      rho,
      _rule(learning_rate, lam, momentum, weight_decay, eps, parallel),
      eps=eps,
      nonfinite=nonfinite,
      axis_name=axis_name,
  )
