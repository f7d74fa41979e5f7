"""The contract of the optimizers that wrap or replace the base optimizer.

``wsam_decoupled`` and ``lookbehind_sam`` wrap a base optimizer and ``bsam``
replaces it: their ``update`` returns the parameter update, so the chainable
suite (``tests/contract.py``) does not apply. Each is checked here for what
every optimizer of the package owes its users: the closure protocol
(``loss_fn=`` or ``grad_fn=``, one of them, named in the errors), jit,
ρ as a number, a schedule or a traced hyperparameter, unusual trees, the
base optimizer's step where ρ = 0 makes the method reduce to it (an
independent computation), and the ``nonfinite`` policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax


@dataclasses.dataclass(frozen=True)
class Full:
  """A full optimizer: ``factory(rho=...)`` builds it.

  ``base_at_rho_zero``: ``None``, or the base optimizer whose single step on
  the clean gradient the optimizer must equal at ρ = 0. ``moving``: the state
  fields that change on a skipped step.
  """

  name: str
  factory: Callable[..., optax.GradientTransformationExtraArgs]
  base_at_rho_zero: Callable[[], optax.GradientTransformation] | None
  moving: tuple[str, ...] = ("count",)

  def make(self, **kw: Any) -> optax.GradientTransformationExtraArgs:
    return self.factory(**kw)


def _momentum():
  return optax.sgd(0.05, momentum=0.9)


def _wsam_decoupled(rho=0.05, nonfinite="skip"):
  return sam_optax.wsam_decoupled(_momentum(), 0.05, rho=rho, gamma=0.88,
                                  nonfinite=nonfinite)


def _lookbehind_k1(rho=0.05, nonfinite="skip"):
  # k = 1, alpha = 1: one ascent and one descent of the base, kept whole.
  return sam_optax.lookbehind_sam(_momentum(), rho=rho, k=1, alpha=1.0,
                                  nonfinite=nonfinite)


def _lookbehind(rho=0.05, nonfinite="skip"):
  return sam_optax.lookbehind_sam(_momentum(), rho=rho, k=2, alpha=0.5,
                                  nonfinite=nonfinite)


def _lookbehind_adaptive(rho=0.05, nonfinite="skip"):
  return sam_optax.lookbehind_sam(_momentum(), rho=rho, k=3, alpha="adaptive",
                                  nonfinite=nonfinite)


def _bsam(rho=0.01, nonfinite="skip"):
  return sam_optax.bsam(0.05, rho, num_data=50, nonfinite=nonfinite)


FULL = (
    Full("wsam_decoupled", _wsam_decoupled, _momentum),
    Full("lookbehind_k1", _lookbehind_k1, _momentum),
    Full("lookbehind", _lookbehind, None),
    Full("lookbehind_adaptive", _lookbehind_adaptive, None),
    Full("bsam", _bsam, None, moving=("count", "key")),
)
cases = pytest.mark.parametrize("case", FULL, ids=lambda c: c.name)


def _params():
  return {"w": jnp.array([[0.8, -0.4, 0.3], [0.1, 0.5, -0.9]]),
          "b": jnp.array([0.2, -0.1, 0.05]), "s": jnp.asarray(0.7)}


def _loss(p):
  x = jnp.array([[1.0, -0.5], [0.3, 0.8], [-1.2, 0.4]])
  y = jnp.array([0.5, -0.2, 0.9])
  pred = jnp.tanh(x @ p["w"] + p["b"]) @ jnp.ones(3) * p["s"]
  return jnp.mean((pred - y) ** 2) + 0.1 * jnp.sum(p["w"] ** 2)


def _sam_part(state):
  """The state holding the step and non-finite counts."""
  return state.sam if isinstance(state, sam_optax.WSAMDecoupledState) else state


def _steps(tx, params, loss_fn, n=3, jit=True, closure="loss_fn"):
  def step(p, s):
    g = jax.grad(loss_fn)(p)
    kw = ({"loss_fn": loss_fn} if closure == "loss_fn"
          else {"grad_fn": jax.grad(loss_fn)})
    u, s = tx.update(g, s, p, **kw)
    return optax.apply_updates(p, u), u, s

  if jit:
    step = jax.jit(step)
  p, s = params, tx.init(params)
  for _ in range(n):
    p, u, s = step(p, s)
  return p, u, s


@cases
def test_jit_matches_eager_and_grad_fn_matches_loss_fn(case):
  tx = case.make()
  p_jit, _, s_jit = _steps(tx, _params(), _loss)
  p_eager, _, _ = _steps(tx, _params(), _loss, jit=False)
  p_grad, _, _ = _steps(tx, _params(), _loss, closure="grad_fn")
  chex.assert_trees_all_close(p_jit, p_eager, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(p_jit, p_grad, rtol=1e-5, atol=1e-6)
  assert int(_sam_part(s_jit).count) == 3
  assert int(_sam_part(s_jit).nonfinite_count) == 0


@cases
def test_rho_zero_is_the_base_optimizer(case):
  if case.base_at_rho_zero is None:
    pytest.skip("the method does not reduce to one base step at rho = 0")
  base = case.base_at_rho_zero()
  p, s = _params(), base.init(_params())
  for _ in range(3):  # the base optimizer on the clean gradient, by hand
    u, s = base.update(jax.grad(_loss)(p), s, p)
    p = optax.apply_updates(p, u)
  got, _, _ = _steps(case.make(rho=0.0), _params(), _loss)
  chex.assert_trees_all_close(got, p, rtol=1e-6, atol=1e-7)


@cases
def test_rho_schedule_and_traced_rho_match_the_number(case):
  want, _, _ = _steps(case.make(rho=0.03), _params(), _loss)
  sched, _, _ = _steps(case.make(rho=lambda c: 0.03 + 0.0 * c), _params(), _loss)
  injected = optax.inject_hyperparams(case.factory)(rho=0.03)
  traced, _, _ = _steps(injected, _params(), _loss)
  chex.assert_trees_all_close(sched, want, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(traced, want, rtol=1e-6, atol=1e-7)
  assert not np.allclose(want["w"], _steps(case.make(rho=0.3), _params(), _loss)[0]["w"])


@cases
def test_unusual_trees_keep_their_layout(case):
  params = {"empty": {}, "scalar": jnp.asarray(0.5), "none": None,
            "bf16": jnp.array([0.5, -1.0], jnp.bfloat16),
            "nested": (jnp.ones((2, 1)), [jnp.zeros(0)])}

  def loss_fn(p):
    return (jnp.sum(p["scalar"] ** 2) + jnp.sum(p["bf16"].astype(jnp.float32) ** 2)
            + jnp.sum(p["nested"][0] ** 3) + jnp.sum(p["nested"][1][0]))

  _, u, s = _steps(case.make(), params, loss_fn, n=2)
  assert jax.tree.structure(u) == jax.tree.structure(params)
  chex.assert_trees_all_equal_dtypes(u, params)
  chex.assert_trees_all_equal_shapes(u, params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  assert int(_sam_part(s).nonfinite_count) == 0


@cases
def test_closure_errors_name_the_argument(case):
  tx = case.make()
  params = _params()
  state = tx.init(params)
  g = jax.grad(_loss)(params)
  with pytest.raises((TypeError, ValueError), match="loss_fn"):
    tx.update(g, state, params)
  with pytest.raises((TypeError, ValueError), match="grad_fn"):
    tx.update(g, state, params, loss_fn=_loss, grad_fn=jax.grad(_loss))
  with pytest.raises(ValueError, match="params"):
    tx.update({"w": g["w"]}, state, params, loss_fn=_loss)


def _poisoned(params, where):
  """``_loss``, but NaN at any point other than ``params`` (``where="away"``)
  or everywhere (``where="all"``)."""
  ref = jax.tree.map(jnp.asarray, params)

  def loss_fn(p):
    moved = sum(jnp.sum(jnp.abs(a - b)) for a, b in
                zip(jax.tree.leaves(p), jax.tree.leaves(ref)))
    bad = moved > 0 if where == "away" else True
    return jnp.where(bad, jnp.nan, 1.0) * _loss(p)

  return loss_fn


FULL_POLICY = [c for c in FULL if c.name != "wsam_decoupled"]


@pytest.mark.parametrize("case", FULL_POLICY, ids=lambda c: c.name)
@pytest.mark.parametrize("policy", ["skip", "propagate"])
def test_nonfinite_step_is_counted_and_skipped_or_propagated(case, policy):
  params = _params()
  tx = case.make(nonfinite=policy)
  p, _, state = _steps(tx, params, _loss, n=2)
  # The clean gradient is finite at p, every other point gives NaN (bSAM
  # never evaluates p itself: NaN everywhere).
  loss_fn = _poisoned(p, "away" if case.name != "bsam" else "all")
  u, new = jax.jit(lambda s: tx.update(jax.grad(_loss)(p), s, p, loss_fn=loss_fn))(state)
  assert int(new.nonfinite_count) == 1
  assert int(new.count) == int(state.count) + 1
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  if policy == "propagate":
    assert not finite
    return
  assert finite and all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
  for field in new._fields:  # the state kept, but for what must move on
    if field in (*case.moving, "nonfinite_count"):
      continue
    chex.assert_trees_all_equal(getattr(new, field), getattr(state, field))
  u2, _ = tx.update(jax.grad(_loss)(p), new, p, loss_fn=_loss)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u2))


@pytest.mark.parametrize("policy", ["skip", "fallback"])
def test_wsam_decoupled_nonfinite_hands_the_base_zero_or_the_clean_gradient(policy):
  # The policy of its SAM transform: the base optimizer steps with a zero
  # gradient ("skip") or the clean one ("fallback"), and no sharpness step.
  case = FULL[0]
  tx = case.make(nonfinite=policy)
  p, _, state = _steps(tx, _params(), _loss, n=2)
  g = jax.grad(_loss)(p)
  u, new = tx.update(g, state, p, loss_fn=_poisoned(p, "away"))
  base = case.base_at_rho_zero()
  fed = g if policy == "fallback" else jax.tree.map(jnp.zeros_like, g)
  want, base_state = base.update(fed, state.base, p)
  chex.assert_trees_all_close(u, want, rtol=1e-6, atol=1e-8)
  chex.assert_trees_all_close(new.base, base_state, rtol=1e-6, atol=1e-8)
  assert int(new.sam.nonfinite_count) == 1


@pytest.mark.parametrize("case", FULL_POLICY, ids=lambda c: c.name)
def test_fallback_is_refused_with_the_fix(case):
  with pytest.raises(ValueError, match="skip"):
    case.make(nonfinite="fallback")


@cases
def test_multisteps_around_it_is_refused_with_the_fix(case):
  # MultiSteps would hand it the mean gradient with the last micro-batch's
  # closure: refused at trace time, naming the remedy.
  acc = optax.MultiSteps(case.make(), every_k_schedule=2)
  params = _params()
  with pytest.raises(ValueError, match="MultiSteps"):
    acc.update(jax.grad(_loss)(params), acc.init(params), params, loss_fn=_loss)
