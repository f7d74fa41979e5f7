"""The compiled shape of a step, and the caller's choice of the pass.

* A transform without a policy compiles no conditional, whether ``rho`` is a
  Python number, an array, a schedule or an ``inject_hyperparams`` value,
  and a traced ``rho`` gives the result of the same number.
* The default non-finite guard holds no extra buffer: the compiled step needs
  ``optax.contrib.sam``'s temporary memory (XLA's deterministic figure).
* ``sam_pass`` from the training loop: two programs without a conditional
  whose alternation reproduces LookSAM's own schedule, and plain SAM on
  chosen steps; a traced ``sam_pass`` is rejected with the fix.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems, reference
from tests.contract import CASES

_NO_POLICY = [c for c in CASES if "policy" not in c.kwargs and c.name not in (
    "looksam", "ae_sam")]


def _conditionals(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().as_text().count("conditional(")


def _forms(case, rho):
  """The same transform with ``rho`` as a number, array, schedule, injected."""
  return {
      "number": case.make(rho=rho),
      "array": case.make(rho=jnp.asarray(rho, jnp.float32)),
      "schedule": case.make(rho=optax.constant_schedule(rho)),
  }


@pytest.mark.parametrize("case", _NO_POLICY, ids=lambda c: c.name)
def test_no_conditional_and_same_result_for_every_form_of_rho(case):
  params, loss_fn = problems.mlp_problem(seed=70)
  rho = case.kwargs["rho"]
  results = {}
  for form, tx in _forms(case, rho).items():
    state = tx.init(params)

    def update(g, s, p, tx=tx):
      return tx.update(g, s, p, **case.closure(loss_fn))

    grads = jax.grad(loss_fn)(params)
    # the Fisher mask's periodic refresh is its one conditional (not the pass)
    allowed = 1 if case.name == "fisher_masked_sam" else 0
    assert _conditionals(update, grads, state, params) == allowed, form
    out, state = jax.jit(update)(grads, state, params)
    out, _ = jax.jit(update)(grads, state, params)  # a second step
    results[form] = out
  for form in ("array", "schedule"):
    chex.assert_trees_all_close(
        results[form], results["number"], rtol=1e-6, atol=1e-7
    )


def test_injected_rho_compiles_no_conditional_and_no_loop():
  params, loss_fn = problems.mlp_problem(seed=71)
  tx = optax.inject_hyperparams(sam_optax.sam)(rho=0.1)
  grads = jax.grad(loss_fn)(params)
  state = tx.init(params)
  text = jax.jit(
      lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn)
  ).lower(grads, state, params).compile().as_text()
  assert "conditional(" not in text and "while(" not in text
  out, _ = tx.update(grads, state, params, loss_fn=loss_fn)
  chex.assert_trees_all_close(
      out, reference.sam_gradient(loss_fn, params, 0.1), rtol=1e-5, atol=1e-6
  )
  # the number of passes is not a traced hyperparameter
  assert "num_ascent_steps" not in state.hyperparams


def test_a_zero_traced_rho_evaluates_at_w_and_is_no_sam_step():
  params, loss_fn = problems.mlp_problem(seed=72)
  tx = sam_optax.sam(optax.linear_schedule(0.0, 0.1, 10))
  grads = jax.grad(loss_fn)(params)
  out, state = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))(
      grads, tx.init(params), params
  )
  chex.assert_trees_all_close(out, grads, rtol=1e-6, atol=1e-7)
  assert float(state.stats.pass_taken) == 0.0
  assert float(state.stats.rho) == 0.0


def _mlp_temp_bytes(tx, closure):
  rng = np.random.RandomState(0)
  sizes = (64, 256, 256, 10)
  params = [
      (jnp.asarray(rng.randn(a, b) / np.sqrt(a), jnp.float32), jnp.zeros(b))
      for a, b in zip(sizes[:-1], sizes[1:])
  ]
  x = jnp.asarray(rng.randn(32, 64), jnp.float32)
  y = jnp.asarray(rng.randint(0, 10, 32))

  def loss_fn(p):
    h = x
    for i, (w, b) in enumerate(p):
      h = h @ w + b
      h = jax.nn.relu(h) if i < len(p) - 1 else h
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

  def step(p, s):
    g = jax.grad(loss_fn)(p)
    kw = {"loss_fn": loss_fn} if closure == "loss_fn" else {
        "grad_fn": lambda q, _: jax.grad(loss_fn)(q)}
    u, s = tx.update(g, s, p, **kw)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, tx.init(params)).compile()
  p_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  return compiled.memory_analysis().temp_size_in_bytes / p_bytes


def test_default_guard_needs_the_memory_of_optax_contrib_sam():
  base = optax.sgd(0.01, momentum=0.9)
  peer = optax.contrib.sam(
      base, optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
      opaque_mode=True,
  )
  peer_p = _mlp_temp_bytes(peer, "contrib")
  for nonfinite in ("skip", "propagate"):
    ours = _mlp_temp_bytes(
        optax.chain(sam_optax.sam(0.05, nonfinite=nonfinite), base), "loss_fn")
    assert ours <= peer_p + 0.05, (nonfinite, ours, peer_p)
  for rho in (jnp.asarray(0.05), optax.constant_schedule(0.05)):
    ours = _mlp_temp_bytes(optax.chain(sam_optax.sam(rho), base), "loss_fn")
    assert ours <= peer_p + 0.05, (rho, ours, peer_p)
  # the clean-gradient fallback holds g: one parameter size more
  held = _mlp_temp_bytes(
      optax.chain(sam_optax.sam(0.05, nonfinite="fallback"), base), "loss_fn")
  assert held >= peer_p + 0.9


# ------------------------------------------------------------------ sam_pass


def test_looksam_with_sam_pass_from_the_loop_is_looksam():
  params, loss_fn = problems.mlp_problem(seed=73)
  k, steps = 3, 8
  tx = optax.chain(sam_optax.looksam(0.2, k=k, alpha=0.7), optax.sgd(0.2))

  def step(p, s, sam_pass=None):
    u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn,
                     sam_pass=sam_pass)
    return optax.apply_updates(p, u), s

  host = jax.jit(step, static_argnames="sam_pass")
  for choice in (True, False):
    assert _conditionals(lambda p, s, c=choice: step(p, s, c), params,
                         tx.init(params)) == 0
  assert _conditionals(step, params, tx.init(params)) == 1  # its own policy
  own = jax.jit(step)
  p1, s1 = params, tx.init(params)
  p2, s2 = params, tx.init(params)
  for t in range(steps):
    p1, s1 = own(p1, s1)
    p2, s2 = host(p2, s2, sam_pass=(t % k == 0))
    chex.assert_trees_all_close(p2, p1, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(s2, s1, rtol=1e-6, atol=1e-7)


def test_sam_pass_false_is_the_clean_gradient_and_true_is_sam():
  params, loss_fn = problems.mlp_problem(seed=74)
  grads = jax.grad(loss_fn)(params)
  tx = sam_optax.sam(0.1)
  state = tx.init(params)
  off, s_off = tx.update(grads, state, params, loss_fn=loss_fn, sam_pass=False)
  chex.assert_trees_all_equal(off, grads)
  assert float(s_off.stats.pass_taken) == 0.0
  on, s_on = tx.update(grads, state, params, loss_fn=loss_fn, sam_pass=True)
  chex.assert_trees_all_close(
      on, reference.sam_gradient(loss_fn, params, 0.1), rtol=1e-5, atol=1e-6)
  assert float(s_on.stats.pass_taken) == 1.0
  calls = []
  tx.update(grads, state, params, sam_pass=False,
            grad_fn=lambda p: calls.append(p) or jax.grad(loss_fn)(p))
  assert calls == []  # no pass traced at all


def test_sam_pass_reaches_sam_through_a_chain_and_numpy_bools():
  params, loss_fn = problems.mlp_problem(seed=75)
  grads = jax.grad(loss_fn)(params)
  tx = optax.chain(sam_optax.sam(0.1), optax.sgd(1.0))
  u, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn,
                   sam_pass=np.bool_(False))
  chex.assert_trees_all_close(u, jax.tree.map(lambda g: -g, grads))


def test_a_traced_sam_pass_names_the_fix():
  params, loss_fn = problems.mlp_problem(seed=76)
  tx = sam_optax.sam(0.1)
  step = jax.jit(lambda g, s, p, c: tx.update(g, s, p, loss_fn=loss_fn,
                                              sam_pass=c))
  with pytest.raises(ValueError, match=r"`sam_pass`.*static_argnames"):
    step(jax.grad(loss_fn)(params), tx.init(params), params, True)
  with pytest.raises(ValueError, match=r"`sam_pass` must be None"):
    tx.update(params, tx.init(params), params, loss_fn=loss_fn, sam_pass=1)


# -------------------------------------------------------- non-finite policies


def _poisoned_at_perturbed_points(loss_fn, params):
  """A loss that is NaN away from ``params`` (the perturbed point)."""
  anchor = jax.tree.map(jnp.asarray, params)

  def loss(p):
    moved = sum(jnp.sum(jnp.abs(a - b)) for a, b in zip(
        jax.tree.leaves(p), jax.tree.leaves(anchor)))
    return jnp.where(moved > 0, jnp.nan, 1.0) * loss_fn(p)

  return loss


@pytest.mark.parametrize("nonfinite", ["skip", "fallback", "propagate"])
def test_nonfinite_policies_hand_on_zero_clean_or_nonfinite(nonfinite):
  params, loss_fn = problems.mlp_problem(seed=77)
  grads = jax.grad(loss_fn)(params)
  bad_loss = _poisoned_at_perturbed_points(loss_fn, params)
  tx = sam_optax.sam(0.1, nonfinite=nonfinite)
  out, state = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=bad_loss))(
      grads, tx.init(params), params)
  assert int(state.nonfinite_count) == 1
  leaves = jax.tree.leaves(out)
  if nonfinite == "skip":
    assert all(np.all(np.asarray(x) == 0) for x in leaves)
    assert float(state.stats.pass_taken) == 0.0
  elif nonfinite == "fallback":
    chex.assert_trees_all_equal(out, grads)
    assert float(state.stats.pass_taken) == 0.0
  else:
    assert all(np.all(np.isnan(np.asarray(x))) for x in leaves)
  default, _ = sam_optax.sam(0.1).update(  # the default policy is "skip"
      grads, tx.init(params), params, loss_fn=bad_loss)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(default))


# --------------------------------------------------------- Flax step builders


def test_linen_and_nnx_step_builders_take_sam_pass():
  pytest.importorskip("flax")
  from flax import nnx
  import sam_optax.flax
  from tests import flax_models as fm

  def ce(model, x, y):
    return fm.cross_entropy(model(x, train=True), y)

  x, y = fm.batch(seed=5)
  key = jax.random.key(3)
  k = 2
  make_tx = lambda: optax.chain(sam_optax.looksam(0.2, k=k), optax.sgd(0.1))
  own = jax.jit(sam_optax.flax.linen_train_step(ce))
  host = jax.jit(sam_optax.flax.linen_train_step(ce), static_argnames="sam_pass")
  a = b = fm.linen_state(make_tx())
  for t in range(4):
    a, _ = own(a, x, y, key=key)
    b, _ = host(b, x, y, key=key, sam_pass=(t % k == 0))
    chex.assert_trees_all_close(b.params, a.params, rtol=1e-6, atol=1e-7)
  assert float(sam_optax.sam_stats(b.opt_state).pass_taken) == 0.0

  def ce_nnx(model, x, y):
    return fm.cross_entropy(model(x), y)

  models = [fm.nnx_model(seed=1), fm.nnx_model(seed=1)]
  opts = [nnx.Optimizer(m, make_tx(), wrt=nnx.Param) for m in models]
  own = nnx.jit(sam_optax.flax.nnx_train_step(ce_nnx))
  host = nnx.jit(sam_optax.flax.nnx_train_step(ce_nnx),
                 static_argnames="sam_pass")
  for t in range(4):
    own(models[0], opts[0], x, y)
    host(models[1], opts[1], x, y, sam_pass=(t % k == 0))
    chex.assert_trees_all_close(
        nnx.state(models[1], nnx.Param), nnx.state(models[0], nnx.Param),
        rtol=1e-6, atol=1e-7)
