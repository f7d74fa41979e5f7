"""Non-finite gradients and loss scaling: what every transform hands on.

* A non-finite *clean* gradient is handed on as NaN, the loss closure is
  never evaluated at a non-finite point and the variant's state is kept, so
  that ``optax.apply_if_finite`` around the chain skips and counts the step
  (and restores the whole optimizer state).
* A non-finite *perturbed* gradient (the clean one being finite) is counted
  in ``SAMState.nonfinite_count`` and hands on a zero gradient
  (``nonfinite="skip"``, the default), the clean gradient (``"fallback"``),
  or the non-finite gradient (``"propagate"``). ``optax.apply_if_finite`` tests the gradient
  it receives, so to skip such steps it must come *after* the transform:
  ``chain(sam(rho, nonfinite="propagate"), apply_if_finite(base, n))``;
  around the whole chain it sees only the (finite) clean gradient.
* ``loss_scale=S`` undoes a loss scaled by ``S``: the result is that of
  unscaled SAM; an overflow of the scaled gradients is a non-finite gradient.
"""

from __future__ import annotations

import inspect

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems, reference
from tests.contract import CASES

cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)


def _takes_nonfinite(case):
  return "nonfinite" in inspect.signature(case.factory).parameters


# Every variant with `nonfinite="propagate"`: the cases whose factory takes
# it, and the cases of CASES written as lambdas of `rho` alone, rebuilt here.
_REBUILT = {
    "rwp": lambda **kw: sam_optax.rwp(0.01, 0.5, key=0, **kw),
    "masked_sam": lambda **kw: sam_optax.masked_sam(
        0.05,
        lambda p: jax.tree.map(
            lambda x: jnp.arange(x.size).reshape(x.shape) % 2 == 0, p
        ),
        normalize="full",
        **kw,
    ),
    "sam_on": lambda **kw: sam_optax.sam_on(
        0.5, lambda p: jax.tree.map(lambda x: x.ndim < 2, p), **kw
    ),
}
def _maker(c):
  make = _REBUILT.get(c.name, lambda c=c, **kw: c.make(**kw))
  make.first_step_at_params = c.first_step_at_params
  make.uses_clean_gradient = c.uses_clean_gradient
  return make


PROPAGATING = [
    pytest.param(_maker(c), id=c.name, marks=[])
    for c in CASES
    if _takes_nonfinite(c) or c.name in _REBUILT
]
propagating = pytest.mark.parametrize("make", PROPAGATING)


def _poisoned(tree, value):
  """``tree`` with one entry of ``tree['layer1']['w']`` replaced by ``value``."""
  tree = jax.tree.map(lambda x: x, tree)
  tree["layer1"]["w"] = tree["layer1"]["w"].at[0, 0].set(value)
  return tree


def _all_finite(tree):
  return all(
      bool(jnp.all(jnp.isfinite(x)))
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.inexact)
  )


def _moved(point, params):
  """True where ``point`` differs from ``params`` anywhere (traced)."""
  flags = [
      jnp.any(a != b)
      for a, b in zip(jax.tree.leaves(point), jax.tree.leaves(params))
  ]
  return jnp.any(jnp.stack(flags))


def _recording_step(tx, loss_fn, **extra):
  """A jitted ``update`` whose ``grad_fn`` records every point it is run at."""
  points = []

  def record(*leaves):
    points.append([np.asarray(x) for x in leaves])

  def grad_fn(p):
    jax.debug.callback(record, *jax.tree.leaves(p))
    return jax.grad(loss_fn)(p)

  update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn, **extra))
  return update, points


@cases
def test_nonfinite_clean_gradient_is_handed_on_nonfinite(case):
  if not case.uses_clean_gradient:
    pytest.skip(f"{case.name} ignores the clean gradient it is handed")
  params, loss_fn = problems.mlp_problem(seed=3)
  tx = case.make()
  update, points = _recording_step(tx, loss_fn)
  state = tx.init(params)
  for _ in range(3):  # a state that is not the initial one
    _, state = update(jax.grad(loss_fn)(params), state, params)
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    grads = _poisoned(jax.grad(loss_fn)(params), bad)
    del points[:]
    out, new_state = update(grads, state, params)
    jax.effects_barrier()
    # Handed on unchanged where the pass is conditional (a traced or
    # scheduled rho, or a policy); all NaN where it always runs (a Python
    # rho), which spares holding g through the perturbed pass.
    unchanged = all(
        np.array_equal(a, b, equal_nan=True)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(grads))
    )
    all_nan = all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(out))
    assert unchanged or all_nan
    chex.assert_trees_all_equal(new_state.variant, state.variant)
    assert int(new_state.nonfinite_count) == int(state.nonfinite_count)
    assert float(new_state.stats.pass_taken) == 0.0
    for point in points:  # the closure only ever sees finite weights
      assert all(np.all(np.isfinite(x)) for x in point)


@cases
def test_apply_if_finite_skips_the_bad_step_and_training_goes_on(case):
  if not case.uses_clean_gradient:
    pytest.skip(f"{case.name} ignores the clean gradient it is handed")
  params, loss_fn = problems.mlp_problem(seed=4)
  tx = optax.apply_if_finite(
      optax.chain(case.make(), optax.sgd(0.1, momentum=0.9)),
      max_consecutive_errors=3,
  )

  @jax.jit
  def step(p, s, poison):
    grads = jax.grad(loss_fn)(p)
    grads = jax.tree.map(lambda x: x, grads)
    grads["layer1"]["w"] = grads["layer1"]["w"].at[1, 2].add(
        jnp.where(poison, jnp.nan, 0.0)
    )
    updates, s = tx.update(grads, s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, updates), s

  def run(poison_at):
    p, s = params, tx.init(params)
    trace = []
    for t in range(5):
      p, s = step(p, s, t in poison_at)
      trace.append((p, s))
    return trace

  bad = run(poison_at={2})
  chex.assert_trees_all_equal(bad[2][0], bad[1][0])  # params untouched
  chex.assert_trees_all_equal(bad[2][1].inner_state, bad[1][1].inner_state)
  assert int(bad[2][1].notfinite_count) == 1
  assert int(bad[2][1].total_notfinite) == 1
  assert not bool(bad[2][1].last_finite)
  assert int(bad[3][1].notfinite_count) == 0
  assert int(bad[4][1].total_notfinite) == 1
  # The same run with the bad step left out: four good steps.
  skipped = run(poison_at=set())[:4]
  final_p, final_s = bad[4]
  chex.assert_trees_all_equal(final_p, skipped[3][0])
  chex.assert_trees_all_equal(final_s.inner_state, skipped[3][1].inner_state)
  assert _all_finite(final_p)


def test_apply_if_finite_resumes_like_the_reference_that_skipped_the_step():
  params, loss_fn = problems.mlp_problem(seed=5)
  base = lambda: optax.sgd(0.1, momentum=0.9)
  tx = optax.apply_if_finite(
      optax.chain(sam_optax.sam(0.05), base()), max_consecutive_errors=2
  )
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))
  p, s = params, tx.init(params)
  for t in range(6):
    grads = jax.grad(loss_fn)(p)
    if t in (1, 2):  # two consecutive bad steps
      grads = _poisoned(grads, jnp.inf if t == 1 else jnp.nan)
    updates, s = update(grads, s, p)
    p = optax.apply_updates(p, updates)
  assert int(s.total_notfinite) == 2
  want = reference.train(loss_fn, params, base(), lambda t: 0.05, steps=4)
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)


def _poisonable_step(tx, loss_fn):
  """A jitted step whose ``grad_fn`` is NaN away from ``params`` if ``poison``."""

  @jax.jit
  def step(params, state, poison):
    def grad_fn(point):
      bad = poison & _moved(point, params)
      grads = jax.grad(loss_fn)(point)
      return jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), grads)

    grads = jax.grad(loss_fn)(params)
    return tx.update(grads, state, params, grad_fn=grad_fn)

  return step


@propagating
@pytest.mark.parametrize("policy", ["skip", "fallback"])
def test_nonfinite_perturbed_gradient_is_skipped_or_falls_back(make, policy):
  params, loss_fn = problems.mlp_problem(seed=6)
  grads = jax.grad(loss_fn)(params)
  kwargs = {} if policy == "skip" else {"nonfinite": policy}  # skip: default
  if policy == "fallback" and not make.uses_clean_gradient:
    with pytest.raises(ValueError, match="'skip'"):  # nothing to fall back on
      make(**kwargs)
    return
  tx = optax.apply_if_finite(
      optax.chain(make(**kwargs), optax.sgd(0.1)), max_consecutive_errors=5
  )
  step = _poisonable_step(tx, loss_fn)
  # The pass is taken on this step, or the checks below could not fail.
  _, healthy = step(params, tx.init(params), False)
  assert float(healthy.inner_state[0].stats.pass_taken) == 1.0
  assert int(healthy.inner_state[0].nonfinite_count) == 0

  start = healthy if make.first_step_at_params else tx.init(params)
  updates, state = step(params, start, True)
  sam_state = state.inner_state[0]
  if policy == "fallback":  # an SGD step on the clean gradient
    want = jax.tree.map(lambda g: -0.1 * np.asarray(g, np.float64), grads)
  else:  # no step at all
    want = jax.tree.map(lambda g: np.zeros(np.shape(g)), grads)
  chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-9)
  assert int(sam_state.nonfinite_count) == 1
  assert float(sam_state.stats.pass_taken) == 0.0
  assert float(sam_state.stats.perturbed_loss) == 0.0
  assert _all_finite(state)  # nothing non-finite is stored
  assert int(state.total_notfinite) == 0  # not a step to skip


@pytest.mark.parametrize("policy", ["skip", "fallback"])
def test_nonfinite_count_accumulates(policy):
  params, loss_fn = problems.mlp_problem(seed=7)
  tx = sam_optax.sam(0.05, nonfinite=policy)
  step = _poisonable_step(tx, loss_fn)
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params)
  want = reference.sam_gradient(loss_fn, params, 0.05)
  counts, taken = [], []
  for poison in (True, False, True, True, False):
    out, state = step(params, state, poison)
    counts.append(int(state.nonfinite_count))
    taken.append(float(state.stats.pass_taken))
    if poison and policy == "fallback":  # the clean gradient
      chex.assert_trees_all_close(out, grads, rtol=1e-5, atol=1e-8)
    elif poison:  # a zero gradient
      chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, grads))
    else:
      chex.assert_trees_all_close(out, want, rtol=1e-5, atol=1e-7)
  assert counts == [1, 1, 2, 3, 3]
  assert taken == [0.0, 1.0, 0.0, 0.0, 1.0]
  assert int(state.count) == 5


@propagating
def test_propagate_lets_apply_if_finite_after_sam_skip_the_step(make):
  params, loss_fn = problems.mlp_problem(seed=8)
  tx = optax.chain(
      make(nonfinite="propagate"),
      optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=5),
  )
  step = _poisonable_step(tx, loss_fn)
  start = tx.init(params)
  if make.first_step_at_params:
    start = step(params, start, False)[1]
  updates, state = step(params, start, True)
  chex.assert_trees_all_equal(optax.apply_updates(params, updates), params)
  sam_state, guard = state
  assert int(guard.notfinite_count) == 1 and int(guard.total_notfinite) == 1
  assert int(sam_state.nonfinite_count) == 1  # counted under both policies
  assert float(sam_state.stats.pass_taken) == 1.0
  # The next, healthy step is applied.
  updates, state = step(params, state, False)
  assert int(state[1].notfinite_count) == 0
  assert int(state[1].total_notfinite) == 1
  assert _all_finite(updates)
  assert np.max(np.abs(reference.flat(updates))) > 0


def test_apply_if_finite_around_sam_sees_only_the_clean_gradient():
  # `apply_if_finite` tests the gradient it receives. Around the whole
  # chain that is the clean gradient, so a perturbed gradient that
  # "propagate" hands on is not caught there: put it after `sam` instead.
  params, loss_fn = problems.mlp_problem(seed=8)
  outer = optax.apply_if_finite(
      optax.chain(sam_optax.sam(0.05, nonfinite="propagate"), optax.sgd(0.1)),
      max_consecutive_errors=5,
  )
  updates, state = _poisonable_step(outer, loss_fn)(params, outer.init(params), True)
  assert int(state.total_notfinite) == 0
  assert not _all_finite(updates)


def test_unknown_nonfinite_policy_is_rejected():
  with pytest.raises(ValueError, match=r"`nonfinite`.*sideways"):
    sam_optax.sam(0.05, nonfinite="sideways")


# ----------------------------------------------------------------------------
# Loss scaling.

SCALE = 2.0**15
UNIT_ROUNDOFF = {jnp.float16: 2.0**-11, jnp.bfloat16: 2.0**-8, jnp.float32: 2.0**-24}


def _two_pass_reference(loss_fn, params, rho, normalized):
  """Unscaled SAM (``ε = ρ g/‖g‖``) or USAM (``ε = ρ g``) in float64.

  Returns the flat gradient at ``w + ε`` (the point rounded to the params'
  dtype, as the transform must round it) and the loss there.
  """
  g = reference.flat(jax.grad(loss_fn)(params))
  eps = rho * g / np.sqrt(np.sum(g * g)) if normalized else rho * g
  point = reference.flat(params) + eps
  flat_params, unravel = jax.flatten_util.ravel_pytree(params)
  loss = float(loss_fn(unravel(np.asarray(point, flat_params.dtype))))
  return reference.grad_at(loss_fn, params, point), loss


@pytest.mark.parametrize(
    "dtype, closure",
    [
        (jnp.float16, "grad_fn"),
        (jnp.float16, "loss_fn"),
        (jnp.bfloat16, "grad_fn"),
        (jnp.float32, "loss_fn"),
    ],
    ids=["f16-grad_fn", "f16-loss_fn", "bf16-grad_fn", "f32-loss_fn"],
)
@pytest.mark.parametrize(
    "variant, rho, normalized",
    [(sam_optax.sam, 0.05, True), (sam_optax.usam, 0.5, False)],
    ids=["sam", "usam"],
)
def test_loss_scale_gives_unscaled_sam(dtype, closure, variant, rho, normalized):
  params, loss_fn = problems.mlp_problem(seed=11, dtype=dtype)
  scaled_loss = lambda p: SCALE * loss_fn(p)
  scaled_grads = jax.grad(scaled_loss)(params)
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(scaled_grads)) > 1e3
  assert _all_finite(scaled_grads)  # in range, even in fp16
  tx = variant(rho)
  kwargs = (
      {"grad_fn": jax.grad(scaled_loss)}
      if closure == "grad_fn"
      else {"loss_fn": scaled_loss}
  )
  got, state = jax.jit(
      lambda g, s, p: tx.update(g, s, p, loss_scale=SCALE, **kwargs)
  )(scaled_grads, tx.init(params), params)
  want, want_loss = _two_pass_reference(loss_fn, params, rho, normalized)
  tol = 8 * UNIT_ROUNDOFF[dtype] * np.max(np.abs(want)) + 1e-7
  np.testing.assert_allclose(reference.flat(got), want, rtol=0, atol=tol)
  assert jax.tree.map(lambda x: x.dtype, got) == jax.tree.map(lambda x: x.dtype, params)
  if closure == "loss_fn":  # the recorded loss is unscaled too
    np.testing.assert_allclose(float(state.stats.perturbed_loss), want_loss, rtol=1e-3)


def test_without_loss_scale_usam_steps_too_far():
  # USAM's step grows with the scale of the gradient, so `loss_scale` is not
  # optional there (SAM's normalized step does not see the scale).
  params, loss_fn = problems.mlp_problem(seed=11)
  scaled_loss = lambda p: SCALE * loss_fn(p)
  tx = sam_optax.usam(0.5)
  got, _ = tx.update(
      jax.grad(scaled_loss)(params), tx.init(params), params,
      grad_fn=jax.grad(scaled_loss),
  )
  want, _ = _two_pass_reference(loss_fn, params, 0.5, False)
  assert np.max(np.abs(reference.flat(got) / SCALE - want)) > 1.0


@pytest.mark.parametrize("policy", ["fallback", "propagate"])
def test_loss_scale_overflow_of_the_clean_gradient_skips_the_step(policy):
  params, loss_fn = problems.mlp_problem(seed=12, dtype=jnp.float16)
  huge = 2.0**30
  scaled_loss = lambda p: huge * loss_fn(p)
  grads = jax.grad(scaled_loss)(params)
  assert not _all_finite(grads)  # fp16 overflow
  tx = optax.apply_if_finite(
      optax.chain(sam_optax.sam(0.05, nonfinite=policy), optax.sgd(0.1)),
      max_consecutive_errors=5,
  )
  update, points = _recording_step(tx, scaled_loss, loss_scale=huge)
  updates, state = update(grads, tx.init(params), params)
  jax.effects_barrier()
  chex.assert_trees_all_equal(optax.apply_updates(params, updates), params)
  assert int(state.total_notfinite) == 1
  for point in points:  # never evaluated at a non-finite point
    assert all(np.all(np.isfinite(x)) for x in point)


def _overflow_problem():
  """fp16 weights whose scaled gradient fits at ``w`` but overflows at ``w + ε``."""
  params = {"w": jnp.ones(2, jnp.float16)}
  loss_fn = lambda p: 0.5 * jnp.sum(p["w"].astype(jnp.float32) ** 2)
  # ∇ = 60000 w: 60000 fits in fp16 (max 65504); at w + ε ≈ 1.35 it does not.
  return params, loss_fn, 60000.0


@pytest.mark.parametrize("policy", ["fallback", "propagate"])
def test_loss_scale_overflow_at_the_perturbed_point(policy):
  params, loss_fn, scale = _overflow_problem()
  scaled_loss = lambda p: scale * loss_fn(p)
  grads = jax.grad(scaled_loss)(params)
  assert _all_finite(grads)
  assert not _all_finite(jax.grad(scaled_loss)({"w": params["w"] * 1.3}))
  tx = optax.chain(
      sam_optax.sam(0.5, nonfinite=policy),
      optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=5),
  )
  updates, (sam_state, guard) = tx.update(
      grads, tx.init(params), params, grad_fn=jax.grad(scaled_loss),
      loss_scale=scale,
  )
  new_params = optax.apply_updates(params, updates)
  if policy == "fallback":
    # An SGD step on the unscaled clean gradient (w = 1); the overflow is counted.
    np.testing.assert_allclose(
        np.asarray(new_params["w"], np.float64), [0.9, 0.9], rtol=1e-3
    )
    assert int(sam_state.nonfinite_count) == 1
    assert int(guard.total_notfinite) == 0
  else:
    chex.assert_trees_all_equal(new_params, params)
    assert int(sam_state.nonfinite_count) == 1
    assert int(guard.total_notfinite) == 1
