"""``rho="auto"`` and ``guarded(rho)`` against independent references.

The reference of every case is its float64 oracle (``tests/oracles.py``, the
variant's equations on one flat vector) driven by a transcription of the
controller's law as documented in :func:`sam_optax.auto_rho` and
:func:`sam_optax.guarded`: the test measures the gradient change
``‖g_p − g‖ / ‖g‖`` itself, at the oracle's own perturbed point, and
computes the next radius from it. The library's weights, the radius it
reports in ``sam_stats`` and the change it reports must follow.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import oracles, problems
from tests.contract import CASES
from tests.reference import flat, grad_at

STEPS = 6
LR = 0.1


class Law:
  """The controllers' documented update, written out in float64."""

  def __init__(self, controller: Any):
    self.c = controller
    self.auto = isinstance(controller, sam_optax.AutoRho)
    self.log_scale = math.log(controller.init) if self.auto else 0.0
    self.measured = 0
    self.backoffs = 0

  def rho(self, base: Optional[float]) -> float:
    scale = math.exp(self.log_scale)
    return scale if self.auto else base * scale

  def update(self, change: Optional[float]) -> None:
    """One step: ``change`` measured, or ``None`` for a step without a pass."""
    c = self.c
    fire = change is not None and change > c.threshold
    if self.auto:
      if change is None:
        return
      self.measured += 1
      gain = max(c.gain, 1.0 / self.measured)
      tracked = self.log_scale + gain * (math.log(c.target) - math.log(change))
      if fire:
        tracked = min(tracked, self.log_scale) + math.log(c.backoff)
      self.log_scale = tracked
    else:
      if change is not None:
        self.measured += 1
      if fire:
        self.log_scale += math.log(c.backoff)
      else:
        self.log_scale = min(0.0, self.log_scale + math.log1p(c.recovery))
    self.backoffs += int(fire)


# Default auto; an auto that reaches its guard within the steps (target above
# the threshold, fast gain); a guarded radius that backs off.
CONTROLLERS = {
    "auto": lambda rho: "auto",
    "auto_backoff": lambda rho: sam_optax.auto_rho(
        target=3.0, threshold=0.6, gain=0.8, init=rho),
    "guarded": lambda rho: sam_optax.guarded(20 * rho, threshold=0.1,
                                             recovery=0.5),
}


def _controller_of(spec: Any) -> Any:
  return sam_optax.auto_rho() if spec == "auto" else spec


def _library_run(case, spec, params, loss_fn):
  tx = optax.chain(case.make(rho=spec), optax.sgd(LR))
  seen = []

  @jax.jit
  def step(p, s, t):
    g = jax.grad(loss_fn)(p)
    u, s = tx.update(g, s, p, loss_fn=oracles.recording(loss_fn, seen, t))
    return optax.apply_updates(p, u), s

  p, s, ws, st = params, tx.init(params), [], []
  for t in range(STEPS):
    ws.append(flat(p))
    p, s = step(p, s, jnp.asarray(t, jnp.int32))
    st.append(sam_optax.sam_stats(s))
  jax.effects_barrier()
  points = [[q for tag, q in seen if tag == t] for t in range(STEPS)]
  return p, s, ws, st, points


@pytest.mark.parametrize("ctrl", list(CONTROLLERS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_case_follows_a_two_pass_reference_at_the_radius_it_reports(case, ctrl):
  params, loss_fn = problems.mlp_problem(seed=5)
  spec = CONTROLLERS[ctrl](case.kwargs["rho"])
  if not case.controlled_rho:
    with pytest.raises(ValueError, match=r"`rho` must be a real number or a schedule"):
      case.make(rho=spec)
    return
  p, state, ws, st, points = _library_run(case, spec, params, loss_fn)

  law = Law(_controller_of(spec))
  base = spec.rho if isinstance(spec, sam_optax.GuardedRho) else None
  oracle = oracles.ORACLES[case.name](params)
  grad = lambda v: grad_at(loss_fn, params, v)  # noqa: E731
  w = flat(params)
  for t in range(STEPS):
    g = grad(w)
    rho_t = law.rho(base)
    np.testing.assert_allclose(float(st[t].rho), rho_t, rtol=2e-4)
    pts, u = oracle(t, w, g, grad, rho_t, (ws[t], points[t]))
    change = None
    if pts:  # the change at the last point the oracle evaluated
      change = float(np.linalg.norm(grad(pts[-1]) - g) / np.linalg.norm(g))
      np.testing.assert_allclose(float(st[t].grad_change), change, rtol=2e-3)
    else:
      assert float(st[t].grad_change) == 0.0
    law.update(change)
    assert float(st[t].backoffs) == law.backoffs
    w = w - LR * u
  np.testing.assert_allclose(flat(p), w, rtol=2e-4, atol=2e-6)
  radius_state = state[0].radius
  assert int(radius_state.backoffs) == law.backoffs
  assert int(radius_state.measured) == law.measured
  if ctrl != "auto":  # these settings are chosen to exercise the back-off
    assert law.backoffs > 0


def test_a_guarded_safe_radius_is_plain_sam_bit_for_bit():
  params, loss_fn = problems.mlp_problem(seed=3)

  def run(rho):
    tx = optax.chain(sam_optax.sam(rho), optax.sgd(LR))
    s, p = tx.init(params), params
    for _ in range(4):
      u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
      p = optax.apply_updates(p, u)
    return p, s

  p_plain, _ = run(0.05)
  p_guard, s = run(sam_optax.guarded(0.05, threshold=10.0))
  for a, b in zip(jax.tree.leaves(p_plain), jax.tree.leaves(p_guard)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(s[0].radius.backoffs) == 0


def _collapse_problem():
  """A ReLU network on separable data, where a large fixed radius kills it."""
  rng = np.random.RandomState(0)
  x = rng.randn(256, 8).astype(np.float32)
  y = (x[:, 0] + x[:, 1] > 0).astype(np.int32) + 2 * (x[:, 2] > 0)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  params = {"w1": jax.random.normal(k1, (8, 32)) / np.sqrt(8), "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, 4)) / np.sqrt(32), "b2": jnp.zeros(4)}

  def logits(p):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(logits(p), y).mean()

  def accuracy(p):
    return float(jnp.mean(jnp.argmax(logits(p), -1) == y))

  return params, loss_fn, accuracy


def test_the_guard_and_auto_keep_training_where_a_fixed_radius_collapses():
  params, loss_fn, accuracy = _collapse_problem()

  def train(rho):
    tx = optax.chain(sam_optax.sam(rho), optax.sgd(0.5, momentum=0.9))

    @jax.jit
    def step(p, s):
      u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
      return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for _ in range(150):
      p, s = step(p, s)
    return accuracy(p), s

  plain_sgd, _ = train(0.0)
  collapsed, _ = train(3.0)
  guarded, s_guard = train(sam_optax.guarded(3.0))
  auto, s_auto = train("auto")
  assert plain_sgd > 0.9
  assert collapsed < 0.6  # the cliff: one class, or nearly
  assert guarded > 0.9 and auto > 0.9
  assert int(s_guard[0].radius.backoffs) > 0
  assert float(sam_optax.sam_stats(s_guard).rho) < 3.0


def test_a_nonfinite_perturbed_gradient_backs_off_and_is_counted():
  params = jnp.array([1.0, 2.0])
  # Finite at w; its gradient is NaN once w[0] passes 1.5, which the ascent
  # (w[0] grows by about 0.7 at this radius) reaches.
  loss_fn = lambda w: 0.5 * jnp.sum(w ** 2) + jnp.sqrt(1.5 - w[0])  # noqa: E731
  tx = sam_optax.sam(sam_optax.guarded(5.0))
  s = tx.init(params)
  _, s = tx.update(jax.grad(loss_fn)(params), s, params, loss_fn=loss_fn)
  assert int(s.radius.backoffs) == 1 and int(s.nonfinite_count) == 1
  np.testing.assert_allclose(float(sam_optax.sam_stats(s).rho), 5.0)
  np.testing.assert_allclose(float(jnp.exp(s.radius.log_scale)), 0.5)


@pytest.mark.parametrize("rho", ["auto", sam_optax.guarded(0.05)], ids=["auto", "guarded"])
def test_scan_inject_hyperparams_and_jit_agree_without_recompiling(rho):
  params, loss_fn = problems.mlp_problem(seed=9)

  def chain(tx):
    return optax.chain(tx, optax.sgd(LR))

  def loop(tx, n=5):
    @jax.jit
    def step(p, s):
      u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
      return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for _ in range(n):
      p, s = step(p, s)
    assert step._cache_size() == 1  # the radius adapts without recompiling
    return p

  def scanned(tx, n=5):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=n)
    return p

  want = loop(chain(sam_optax.sam(rho)))
  injected = chain(optax.inject_hyperparams(sam_optax.sam)(rho=rho))
  for got in (scanned(chain(sam_optax.sam(rho))), loop(injected)):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_accumulating_after_auto_adapts_once_per_micro_batch():
  params, loss_fn = problems.mlp_problem(seed=2)
  accumulate = optax.MultiSteps(optax.sgd(LR), 2).gradient_transformation()
  tx = optax.chain(sam_optax.sam("auto"), accumulate)
  s, p = tx.init(params), params
  for i in range(4):
    u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
    moved = optax.apply_updates(p, u)
    if i % 2 == 0:  # the accumulating micro-step leaves the weights alone
      chex.assert_trees_all_equal(moved, p)
    p = moved
  radius_state = s[0].radius
  assert int(radius_state.measured) == 4
  assert float(radius_state.log_scale) != pytest.approx(math.log(1e-3))


def test_per_device_auto_agrees_on_one_radius_from_the_mean_change():
  params, loss_fn_of = problems.mlp_params(seed=4), problems.mlp_loss
  batches = [problems.mlp_batch(10 + i) for i in range(4)]
  stacked = jax.tree.map(lambda *b: jnp.stack(b), *batches)
  tx = sam_optax.sam("auto", axis_name="d")
  state = tx.init(params)

  def member(batch, state):
    loss_fn = lambda p: loss_fn_of(p, batch)  # noqa: E731
    g = jax.grad(loss_fn)(params)
    return tx.update(g, state, params, loss_fn=loss_fn)

  for _ in range(2):
    _, states = jax.vmap(member, in_axes=(0, None), axis_name="d")(stacked, state)
    log_scales = np.asarray(states.radius.log_scale)
    assert np.all(log_scales == log_scales[0])
    # The reference: each member's change at its own perturbation, averaged.
    rho = math.exp(float(state.radius.log_scale)) if int(state.radius.measured) else 1e-3
    changes = []
    for batch in batches:
      loss_fn = lambda p: loss_fn_of(p, batch)  # noqa: E731
      g = flat(jax.grad(loss_fn)(params))
      w_adv = flat(params) + rho * g / np.linalg.norm(g)
      g_p = grad_at(loss_fn, params, w_adv)
      changes.append(np.linalg.norm(g_p - g) / np.linalg.norm(g))
    law = Law(sam_optax.auto_rho())
    law.log_scale, law.measured = math.log(rho), int(state.radius.measured)
    law.update(float(np.mean(changes)))
    np.testing.assert_allclose(log_scales[0], law.log_scale, rtol=1e-4, atol=1e-5)
    state = jax.tree.map(lambda x: x[0], states)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: sam_optax.sam("atuo"), r'`sam`: `rho` must be .*"auto"'),
        (lambda: sam_optax.asam(rho="Auto"), r"`asam`: `rho`"),
        (lambda: sam_optax.auto_rho(target=0.0), r"`auto_rho`: `target`"),
        (lambda: sam_optax.auto_rho(backoff=1.0), r"`auto_rho`: `backoff`"),
        (lambda: sam_optax.auto_rho(gain=0.0), r"`auto_rho`: `gain`"),
        (lambda: sam_optax.guarded("auto"), r"`guarded`: `rho`.*already"),
        (lambda: sam_optax.guarded(-0.1), r"`guarded`: `rho`"),
        (lambda: sam_optax.guarded(0.1, threshold=0), r"`guarded`: `threshold`"),
        (lambda: sam_optax.msam(optax.sgd(0.1), rho="auto"), r"`msam`: .*sam\(rho=\"auto\"\)"),
    ],
)
def test_bad_radius_specs_name_the_argument_and_the_fix(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_auto_compiles_no_conditional_and_few_extra_flops():
  params, loss_fn = problems.mlp_problem(seed=1)

  def compiled(rho):
    tx = optax.chain(sam_optax.sam(rho), optax.sgd(LR))

    def step(p, s):
      u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
      return optax.apply_updates(p, u), s

    return jax.jit(step).lower(params, tx.init(params)).compile()

  fixed = compiled(0.05)
  for rho in ("auto", sam_optax.guarded(0.05)):
    c = compiled(rho)
    text = c.as_text()
    assert " conditional(" not in text and "while(" not in text
    flops = c.cost_analysis()["flops"]
    assert flops <= 1.05 * fixed.cost_analysis()["flops"]


def test_the_guarded_factor_grows_back_after_a_back_off():
  """Radii where the perturbed gradient is NaN (w[0] + Δ > 1.5) back off;
  the others let the factor grow back by ``1 + recovery``."""
  params = jnp.array([1.0, 2.0])
  loss_fn = lambda w: 0.5 * jnp.sum(w ** 2) + jnp.sqrt(1.5 - w[0])  # noqa: E731
  g = np.asarray(jax.grad(loss_fn)(params))
  reach = g[0] / np.linalg.norm(g)  # w[0] moves by rho * reach
  tx = sam_optax.sam(sam_optax.guarded(5.0, threshold=1e9, recovery=0.5))
  state, factor, want = tx.init(params), 1.0, []
  for _ in range(6):
    want.append(5.0 * factor)
    _, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    np.testing.assert_allclose(float(sam_optax.sam_stats(state).rho), want[-1], rtol=1e-5)
    bad = 1.0 + want[-1] * reach > 1.5
    factor = factor * 0.5 if bad else min(1.0, factor * 1.5)
  assert len(set(np.round(want, 4))) >= 4  # backed off, grew back, backed off
