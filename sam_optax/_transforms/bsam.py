"""bSAM, Bayesian SAM: an Adam-like optimizer that learns a Gaussian posterior."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import checks, closure, full_guard, tree, validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.prng import PRNG, KeyLike, RandomKeyState
from sam_optax._core.stats import SAMStats, first_node

__all__ = ("BSAMState", "bsam", "bsam_sample")


class BSAMState(NamedTuple):
  """State of :func:`bsam`.

  The parameters are the posterior mean :math:`m`; the state holds the rest
  of the posterior and of the optimizer.

  Attributes:
    count: number of ``update`` calls so far (int32); schedules of
      ``learning_rate`` and ``rho`` are evaluated at this count.
    momentum: the first moment :math:`v` (zeros at the start, no bias
      correction), at least float32.
    precision: the per-parameter precision :math:`s` (``init_precision`` at
      the start), at least float32. The posterior is
      :math:`\\mathcal{N}(m, 1/(N s))`.
    num_data: :math:`N`, the ``num_data`` of the factory (float32), kept so
      that :func:`bsam_sample` needs only the state.
    key: the :class:`~sam_optax.RandomKeyState` for the next step's noise.
    stats: diagnostics of the last step. ``grad_norm`` is the norm of the
      gradient at the noisy point, ``perturbed_grad_norm`` that at the
      ascent point, ``perturbed_loss`` the loss there (0 with ``grad_fn``),
      ``rho`` the radius used, ``pass_taken`` 1.
    nonfinite_count: number of steps (int32) with a non-finite gradient or
      update (handled by the ``nonfinite`` policy).
  """

  count: jax.Array
  momentum: Any
  precision: Any
  num_data: jax.Array
  key: RandomKeyState
  stats: SAMStats
  nonfinite_count: jax.Array = jnp.zeros((), jnp.int32)


def _wrap(state_key: RandomKeyState, impl: Any) -> jax.Array:
  return jax.random.wrap_key_data(state_key.key, impl=impl)


def _normal_like_tree(params: Any, key: jax.Array) -> tuple[Any, jax.Array]:
  """The authors' ``normal_like_tree``: one standard normal per parameter.

  ``key`` is split into ``L + 1`` keys (``L`` leaves); leaf ``i`` (in
  ``jax.tree`` order) draws with key ``i + 1``, key 0 is returned for the
  next draw. Each leaf's noise has the leaf's dtype widened to at least
  float32.
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves) + 1)
  noise = [
      jax.random.normal(keys[i + 1], jnp.shape(x), tree.wide_dtype(x.dtype))
      for i, x in enumerate(leaves)
  ]
  return jax.tree.unflatten(treedef, noise), keys[0]


def _find_state(caller: str, opt_state: Any) -> BSAMState:
  found = first_node(opt_state, lambda x: isinstance(x, BSAMState))
  if found is None:
    raise ValueError(
        f"`{caller}`: `opt_state` holds no `BSAMState`. Pass the state"
        " returned by `tx.init` or `tx.update` of an optimizer built with"
        " `sam_optax.bsam` (any wrapper around it works)."
    )
  return found


def bsam_sample(
    params: Any,
    opt_state: Any,
    key: jax.Array,
    num_samples: Optional[int] = None,
) -> Any:
  r"""Samples of bSAM's posterior :math:`\mathcal{N}(m, 1/(N s))`, for model averages.

  :math:`m` is ``params`` (the weights trained with :func:`bsam`),
  :math:`s` the precision in its state and :math:`N` its ``num_data``. A
  sample is :math:`m + z / \sqrt{N s}` with :math:`z \sim \mathcal{N}(0, I)`.
  Predict as the authors do (``test.py`` of team-approx-bayes/bayesian-sam):
  average the softmax probabilities of the model at several samples (they
  use 32), and compare with the prediction at the mean ``params``.

  The draws follow the authors' key sequence: each sample splits the key
  into ``L + 1`` keys (``L`` leaves), draws leaf ``i`` with key ``i + 1``
  and continues with key 0, so the same ``key`` gives the samples of their
  ``test.py`` started from it.

  Args:
    params: the posterior mean :math:`m`, the parameters trained with
      :func:`bsam`.
    opt_state: the optimizer state; any wrapper around the
      :class:`BSAMState` (``optax.inject_hyperparams``, ``optax.MultiSteps``,
      a chain, a Flax NNX ``opt_state``) works.
    key: a ``jax.random`` key (typed or legacy ``uint32``).
    num_samples: ``None`` for one sample with the structure of ``params``;
      an int ``K`` for ``K`` samples stacked along a new leading axis of
      every leaf (``jax.vmap`` the model over it).

  Returns:
    A tree like ``params`` (same dtypes), with a leading axis of length
    ``num_samples`` when it is given.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = jnp.array([1.0, -2.0])
    >>> tx = sam_optax.bsam(0.1, num_data=100)
    >>> state = tx.init(params)      # precision 1: standard deviation 0.1
    >>> samples = sam_optax.bsam_sample(params, state, jax.random.key(0), 4000)
    >>> samples.shape
    (4000, 2)
    >>> bool(jnp.all(jnp.abs(samples.std(0) - 0.1) < 0.005))
    True
  """
  caller = "bsam_sample"
  state = _find_state(caller, opt_state)
  precision = jax.tree.map(
      lambda x: x.get_value() if hasattr(x, "get_value") else x, state.precision
  )
  num_data = state.num_data
  num_data = num_data.get_value() if hasattr(num_data, "get_value") else num_data
  closure.check_same_tree(caller, precision, params, "the bSAM precision",
                          "params")
  if num_samples is not None:
    validation.check_int(caller, "num_samples", num_samples, low=1)
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))

  def one(k):
    noise, k = _normal_like_tree(params, k)
    sample = jax.tree.map(
        lambda m, s, z: (
            m.astype(z.dtype) + jnp.sqrt(1.0 / (num_data * s)).astype(z.dtype) * z
        ).astype(m.dtype),
        params, precision, noise,
    )
    return sample, k

  if num_samples is None:
    return one(key)[0]

  def body(k, _):
    sample, k = one(k)
    return k, sample

  return jax.lax.scan(body, key, None, length=int(num_samples))[1]


@validation.reported_as("bsam")
def bsam(
    learning_rate: ScalarOrSchedule,
    rho: ScalarOrSchedule = 0.01,
    *,
    num_data: float,
    b1: float = 0.9,
    b2: float = 0.999,
    prior_precision: float = 40.0,
    damping: float = 0.1,
    init_precision: float = 1.0,
    key: KeyLike = 0,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""bSAM, Bayesian SAM: SAM as a relaxation of Bayes, an Adam-like optimizer.

  bSAM learns a diagonal Gaussian posterior :math:`\mathcal{N}(m, 1/(N s))`
  over the weights: the parameters are its mean :math:`m`, the state holds a
  per-parameter precision :math:`s`. With :math:`N` = ``num_data``,
  :math:`\delta` = ``prior_precision`` / :math:`N`, one ``update`` is

  .. math::

    \tilde w &= m + \frac{z}{\sqrt{N s}}, \quad z \sim \mathcal{N}(0, I),
    \qquad g = \nabla L(\tilde w), \\
    g_{\mathrm{adv}} &= \nabla L\Bigl(m + \rho \frac{g}{s}\Bigr), \\
    v &\leftarrow \beta_1 v + (1 - \beta_1)(g_{\mathrm{adv}} + \delta m), \\
    m &\leftarrow m - \eta_t \frac{v}{s}, \\
    s &\leftarrow \beta_2 s + (1 - \beta_2)
        \bigl(\sqrt{s\, g^2} + \delta + \mathrm{damping}\bigr),

  element-wise, the descent with the precision *before* its update. The
  ascent :math:`\rho g / s` is not normalized; the precision grows from
  :math:`\sqrt{s}\,|g|` at the *noisy* point (not from
  :math:`g_{\mathrm{adv}}`), and the momentum gets the adversarial gradient
  plus the prior's pull :math:`\delta m` (an L2 weight decay of
  :math:`\delta`). :math:`v` has no bias correction.

  A full optimizer (it replaces the base optimizer, as Adam would): its
  ``update`` returns the parameter update; apply it, do not chain another
  optimizer after it. ``update(grads, state, params, loss_fn=...)`` (or
  ``grad_fn=``) evaluates the closure twice, at :math:`\tilde w` and at the
  ascent point. The gradient passed as ``grads`` is checked for its
  structure and otherwise not used (bSAM never needs the gradient at
  :math:`m`): inside ``jax.jit`` its computation is dead code and XLA
  drops it, so the usual training step costs the two passes only; outside
  ``jit`` pass ``params`` to skip computing it.

  Prediction: at the mean ``params``, or averaged over samples of the
  posterior drawn with :func:`bsam_sample` (the authors' Bayesian model
  average, 32 samples, gives their better calibration; measure it with
  :func:`sam_optax.calibration.expected_calibration_error`).

  Cost: 2 forward/backward passes per step, as SAM; state of two
  parameter-sized buffers (:math:`v`, :math:`s`, at least float32) and a
  key; inside the call, the noise and the two points.

  What is verified: transcribed from ``build_bsam_optimizer`` in
  ``optim.py`` of team-approx-bayes/bayesian-sam (commit 936eec1, 2023):
  the noise ``normal_like_tree`` (the key split into 2, the first split
  into ``L + 1`` with leaf ``i`` drawn with key ``i + 1``, the second kept
  for the next step; for one group, the same draws as the authors' code
  from the same key), the points, ``gs = sqrt(s * g**2)``, the momentum,
  the step with the old ``s``, the precision update with
  ``damping + wdecay``, and ``wdecay = priorprec / ndata`` from
  ``train.py``, where ``ndata`` is the training-set size times the
  augmentation factor ``--dafactor``. The learning-rate factor of their
  loop (linear warm-up over 5 epochs, then cosine) is a schedule here.
  Not copied: the authors' default splits every batch into 8 groups
  (``--batchsplit 8``), each with its own noise and ascent, and averages
  ``gs`` and :math:`g_{\mathrm{adv}}` over them (m-sharpness); here one
  group, the whole batch of the closure.

  Choosing rho: not SAM's radius, and smaller: the ascent
  :math:`\rho g / s` is an unnormalized step scaled by the inverse
  precision, so its length grows with the gradient. The authors use
  ρ = 0.01 with a learning rate of 0.5, prior precision 40 and
  ``num_data`` = 4 × 50,000 (augmentation factor 4) for ResNet-18 on
  CIFAR-10/100, and ρ = 5e-5 with a learning rate of 0.25, prior precision
  25 on TinyImageNet (Möllenhoff & Khan, ICLR 2023, repository README),
  where SAM's ρ is 0.05 (Foret et al., 2021). Their command-line defaults
  are ρ = 0.1, learning rate 1.0, prior precision 25.

  Args:
    learning_rate: :math:`\eta_t`, a number or a schedule of the ``update``
      count (the authors: 0.5 on CIFAR, with a warm-up and cosine decay).
    rho: the ascent's scale :math:`\rho \ge 0` (a number or a schedule), see
      "Choosing rho" above; 0 gives the noisy-gradient method (the
      adversarial gradient is then the gradient at :math:`m`).
    num_data: :math:`N > 0`, the number of training examples, times the
      augmentation factor if any (the authors: 4 with augmentation on
      CIFAR). It scales the noise, :math:`1/\sqrt{N s}`, and the prior.
    b1: :math:`\beta_1 \in [0, 1)`, the momentum's decay.
    b2: :math:`\beta_2 \in [0, 1)`, the precision's decay.
    prior_precision: :math:`\delta N \ge 0`, the precision of the Gaussian
      prior on the weights (the weight decay is this over ``num_data``).
    damping: :math:`\ge 0`, added to the precision's target at every step.
    init_precision: :math:`s_0 > 0` (the authors' ``--custominit``, 1.0).
    key: a non-negative int seed or a JAX PRNG key for the noise.
    nonfinite: what a step with a non-finite gradient (at the noisy or the
      ascent point) or update does: ``"skip"`` (default) returns a zero
      update and keeps the momentum and precision as they were (the key
      moves on, so the next step draws fresh noise), ``"propagate"`` passes
      it on; both count it in ``BSAMState.nonfinite_count``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`BSAMState`; ``update`` takes ``loss_fn=`` or ``grad_fn=``.

  Raises:
    ValueError: for a negative ``learning_rate`` or ``rho``, a
      non-positive ``num_data`` or ``init_precision``, ``b1`` or ``b2``
      outside ``[0, 1)``, a negative ``prior_precision`` or ``damping``, or
      a bad ``key``; ``init`` raises for non-real-floating parameters.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = {"w": jnp.array([[2.0, -0.5], [0.1, 0.3]]), "b": jnp.zeros(2)}
    >>> loss_fn = lambda p: jnp.sum((jnp.ones(2) @ p["w"] + p["b"] - 1.0) ** 2)
    >>> tx = sam_optax.bsam(0.05, rho=0.01, num_data=1000)
    >>> state = tx.init(params)
    >>> start = loss_fn(params)
    >>> for _ in range(50):
    ...   grads = jax.grad(loss_fn)(params)  # unused by bSAM; dead code under jit
    ...   updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params) < 0.1 * start)
    True
    >>> samples = sam_optax.bsam_sample(params, state, jax.random.key(1), 8)
    >>> samples["w"].shape
    (8, 2, 2)

  References:
    Möllenhoff, Khan, *SAM as an Optimal Relaxation of Bayes*, ICLR 2023.
    https://arxiv.org/abs/2210.01620
  """
  caller = "bsam"
  validation.check_scalar(caller, "learning_rate", learning_rate, low=0.0,
                          allow_schedule=True)
  validation.check_scalar(caller, "rho", rho, low=0.0, allow_schedule=True)
  validation.check_scalar(caller, "num_data", num_data, low=0.0,
                          low_inclusive=False)
  validation.check_scalar(caller, "b1", b1, low=0.0, high=1.0,
                          high_inclusive=False)
  validation.check_scalar(caller, "b2", b2, low=0.0, high=1.0,
                          high_inclusive=False)
  validation.check_scalar(caller, "prior_precision", prior_precision, low=0.0)
  validation.check_scalar(caller, "damping", damping, low=0.0)
  validation.check_scalar(caller, "init_precision", init_precision, low=0.0,
                          low_inclusive=False)
  prng = PRNG.of(caller, key)
  full_guard.check(caller, nonfinite)

  def init_fn(params: Any) -> BSAMState:
    closure.check_floating(caller, params, "`params`")
    for x in jax.tree.leaves(params):
      if jnp.iscomplexobj(x):
        raise ValueError(
            f"`{caller}`: complex parameters are not supported (the"
            " precision update takes |g|); got a leaf of dtype"
            f" {x.dtype}."
        )
    wide = lambda x: tree.wide_dtype(x.dtype)  # noqa: E731
    return BSAMState(
        count=jnp.zeros((), jnp.int32),
        momentum=jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), wide(x)), params),
        precision=jax.tree.map(
            lambda x: jnp.full(jnp.shape(x), init_precision, wide(x)), params
        ),
        num_data=jnp.asarray(num_data, jnp.float32),
        key=prng.init(),
        stats=SAMStats.zeros(),
        nonfinite_count=jnp.zeros((), jnp.int32),
    )

  def update_fn(
      updates: Any,
      state: BSAMState,
      params: Optional[Any] = None,
      *,
      loss_fn: Optional[Callable[..., Any]] = None,
      grad_fn: Optional[Callable[[Any], Any]] = None,
      **extra_args: Any,
  ) -> tuple[Any, BSAMState]:
    del extra_args
    checks.reject_wrappers(caller)
    oracle = closure.gradient_oracle(caller, params, loss_fn, grad_fn)
    closure.check_same_tree(caller, updates, params, "`updates`", "params")
    count = state.count
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    rho_t = rho(count) if callable(rho) else rho
    m = tree.widen(params)
    s, v = state.precision, state.momentum
    n = jnp.asarray(num_data)
    delta = jnp.asarray(prior_precision) / n

    # rngkeys = split(rngkey, 2): the first draws the noise, the second is
    # the next step's key.
    key = _wrap(state.key, prng.impl)
    step_keys = jax.random.split(key, 2)
    noise, _ = _normal_like_tree(params, step_keys[0])
    noisy = jax.tree.map(
        lambda mu, si, z: mu + jnp.sqrt(1.0 / (n * si)).astype(mu.dtype) * z,
        m, s, noise,
    )
    g, _ = oracle(tree.cast_like(noisy, params))
    g = tree.widen(g)
    ascent = jax.tree.map(
        lambda mu, gi, si: mu + jnp.asarray(rho_t, mu.dtype) * gi / si, m, g, s
    )
    g_adv, loss = oracle(tree.cast_like(ascent, params))
    g_adv = tree.widen(g_adv)

    def leaf_momentum(vi, ga, mu):
      d = jnp.asarray(delta, vi.dtype)
      return b1 * vi + (1.0 - b1) * (ga.astype(vi.dtype) + d * mu.astype(vi.dtype))

    v_new = jax.tree.map(leaf_momentum, v, g_adv, m)
    out = jax.tree.map(
        lambda vi, si: -jnp.asarray(lr, vi.dtype) * vi / si, v_new, s
    )

    def leaf_precision(si, gi):
      gs = jnp.sqrt(si * gi.astype(si.dtype) ** 2)
      target = gs + jnp.asarray(damping, si.dtype) + jnp.asarray(delta, si.dtype)
      return b2 * si + (1.0 - b2) * target

    s_new = jax.tree.map(leaf_precision, s, g)
    stats = SAMStats.of(
        grad_norm=tree.global_norm(g),
        perturbed_grad_norm=tree.global_norm(g_adv),
        perturbed_loss=loss,
        rho=rho_t,
        pass_taken=1.0,
    )
    new_key = RandomKeyState(key=jax.random.key_data(step_keys[1]))
    new_state = BSAMState(
        count=optax.safe_increment(count),
        momentum=v_new,
        precision=s_new,
        num_data=state.num_data,
        key=new_key,
        stats=stats,
        nonfinite_count=state.nonfinite_count,
    )
    # The noise is fresh on the next step whatever this one gave.
    return full_guard.apply(
        nonfinite, full_guard.finite(g, g_adv, out),
        tree.cast_like(out, params), new_state, state, moving=("count", "key"),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
