"""Flax Linen: `TrainState`, `linen_closure` and `linen_train_step`."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")

import flax.linen as nn  # noqa: E402
from flax.training import train_state as flax_train_state  # noqa: E402

import sam_optax  # noqa: E402
import sam_optax.flax  # noqa: E402
from tests import flax_models as fm  # noqa: E402

RHO, LR = 0.2, 0.5
KEY = jax.random.key(42)


def sam_tx():
  return optax.chain(sam_optax.sam(RHO), optax.sgd(LR, momentum=0.9))


def ce_loss(model, x, y):
  return fm.cross_entropy(model(x, train=True), y)


@jax.jit
def hand_written_step(state, x, y, dropout_key):
  """One SAM step from the paper, written out with explicit `model.apply`."""

  def loss_and_stats(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_key},
    )
    return fm.cross_entropy(logits, y), updates["batch_stats"]

  (_, clean_stats), g = jax.value_and_grad(loss_and_stats, has_aux=True)(
      state.params
  )
  norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
  w_adv = jax.tree.map(lambda w, gi: w + RHO * gi / norm, state.params, g)
  (_, adv_stats), g_adv = jax.value_and_grad(loss_and_stats, has_aux=True)(w_adv)
  # First step of SGD with momentum: the trace is the gradient itself.
  params = jax.tree.map(lambda w, u: w - LR * u, state.params, g_adv)
  plain = jax.tree.map(lambda w, gi: w - LR * gi, state.params, g)
  return params, clean_stats, adv_stats, plain


def step_key(key, step):
  """The documented key of collection 0 at `step`."""
  return jax.random.fold_in(jax.random.fold_in(key, step), 0)


def test_one_step_matches_hand_written_two_passes():
  state = fm.linen_state(sam_tx())
  x, y = fm.batch(1)
  train_step = jax.jit(sam_optax.flax.linen_train_step(ce_loss))
  new_state, loss = train_step(state, x, y, key=KEY)

  want_params, clean_stats, adv_stats, plain_params = hand_written_step(
      state, x, y, step_key(KEY, 0)
  )
  chex.assert_trees_all_close(new_state.params, want_params, rtol=1e-5, atol=1e-6)
  # BatchNorm statistics are those of one clean forward pass.
  chex.assert_trees_all_close(
      new_state.batch_stats, clean_stats, rtol=1e-6, atol=1e-7
  )
  assert int(new_state.step) == 1
  assert float(loss) > 0
  # The test can fail: the perturbed pass's statistics, a second momentum
  # update of the statistics, plain SGD and another dropout key all give
  # something else.
  assert fm.max_abs_diff(clean_stats, adv_stats) > 1e-5
  assert fm.max_abs_diff(new_state.batch_stats, state.batch_stats) > 1e-4
  assert fm.max_abs_diff(plain_params, want_params) > 1e-4
  # ... and so does a different dropout key in the reference.
  other, _, _, _ = hand_written_step(state, x, y, step_key(KEY, 1))
  assert fm.max_abs_diff(other, want_params) > 1e-4


def test_perturbed_pass_reuses_the_dropout_mask():
  state = fm.linen_state(sam_tx(), record=True)
  x, y = fm.batch(2)
  train_step = jax.jit(sam_optax.flax.linen_train_step(ce_loss))
  fm.MASKS.clear()
  state, _ = train_step(state, x, y, key=KEY)
  state, _ = train_step(state, x, y, key=KEY)
  jax.effects_barrier()
  assert len(fm.MASKS) == 4  # clean and perturbed pass of two steps
  first, second = fm.MASKS[:2], fm.MASKS[2:]
  np.testing.assert_array_equal(first[0], first[1])
  np.testing.assert_array_equal(second[0], second[1])
  assert not np.array_equal(first[0], second[0])  # a new mask each step
  # It is the mask of a clean forward pass with the documented key.
  fm.MASKS.clear()
  state.apply_fn(
      {"params": state.params, "batch_stats": state.batch_stats},
      x,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": step_key(KEY, 0)},
  )
  jax.effects_barrier()
  np.testing.assert_array_equal(fm.MASKS[0], first[0])


def test_closure_by_hand_equals_train_step():
  state = fm.linen_state(sam_tx())
  x, y = fm.batch(3)
  dropout_key = step_key(KEY, 0)

  @jax.jit
  def by_hand(state):
    closure = sam_optax.flax.linen_closure(
        state.apply_fn,
        ce_loss,
        x,
        y,
        model_state={"batch_stats": state.batch_stats},
        rngs={"dropout": dropout_key},
    )
    (loss, (model_state, _)), grads = jax.value_and_grad(closure, has_aux=True)(
        state.params
    )
    state = state.apply_gradients(
        grads=grads, loss_fn=closure, batch_stats=model_state["batch_stats"]
    )
    return state, loss

  got, loss = by_hand(state)
  want, want_loss = jax.jit(sam_optax.flax.linen_train_step(ce_loss))(
      state, x, y, key=KEY
  )
  chex.assert_trees_all_close(got.params, want.params, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(got.batch_stats, want.batch_stats)
  chex.assert_trees_all_close(loss, want_loss)
  assert float(sam_optax.sam_stats(got.opt_state).perturbed_loss) > 0


def test_train_step_returns_aux_and_works_without_batch_stats():
  class NoStats(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(fm.CLASSES)(x.reshape(x.shape[0], -1))

  x, y = fm.batch(4)
  model = NoStats()
  state = sam_optax.flax.TrainState.create(
      apply_fn=model.apply,
      params=model.init(jax.random.key(0), x)["params"],
      tx=sam_tx(),
  )

  def loss_with_aux(model, x, y):
    logits = model(x)
    return fm.cross_entropy(logits, y), {"acc": jnp.mean(logits.argmax(-1) == y)}

  new_state, (loss, aux) = jax.jit(sam_optax.flax.linen_train_step(loss_with_aux))(
      state, x, y
  )
  loss_fn = lambda p: loss_with_aux(lambda x: model.apply({"params": p}, x), x, y)
  chex.assert_trees_all_close(loss, loss_fn(state.params)[0])
  assert set(aux) == {"acc"}
  grads = jax.grad(lambda p: loss_fn(p)[0])(state.params)
  want = state.apply_gradients(grads=grads, loss_fn=loss_fn)
  chex.assert_trees_all_close(new_state.params, want.params, rtol=1e-6, atol=1e-7)


def _dense_state(tx, state_cls):
  model = nn.Dense(2)
  x = jnp.arange(6.0).reshape(3, 2)
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p: jnp.mean((model.apply({"params": p}, x) - 1.0) ** 2)
  return state_cls.create(apply_fn=model.apply, params=params, tx=tx), loss_fn


@pytest.mark.parametrize(
    "make_tx",
    [lambda: optax.sgd(0.1), lambda: optax.adam(0.1), lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))],
)
@pytest.mark.parametrize("pass_closure", [False, True])
def test_without_sam_apply_gradients_is_flax(make_tx, pass_closure):
  ours, loss_fn = _dense_state(make_tx(), sam_optax.flax.TrainState)
  theirs, _ = _dense_state(make_tx(), flax_train_state.TrainState)
  for _ in range(3):
    g = jax.grad(loss_fn)(ours.params)
    extra = {"loss_fn": loss_fn} if pass_closure else {}
    ours = ours.apply_gradients(grads=g, **extra)
    theirs = theirs.apply_gradients(grads=jax.grad(loss_fn)(theirs.params))
  chex.assert_trees_all_equal(ours.params, theirs.params)
  chex.assert_trees_all_equal(ours.opt_state, theirs.opt_state)
  assert ours.step == theirs.step == 3


def test_apply_gradients_forwards_grad_fn_and_loss_fn():
  state, loss_fn = _dense_state(sam_tx(), sam_optax.flax.TrainState)
  g = jax.grad(loss_fn)(state.params)
  by_loss = state.apply_gradients(grads=g, loss_fn=loss_fn)
  by_grad = state.apply_gradients(grads=g, grad_fn=jax.grad(loss_fn))
  updates, opt_state = state.tx.update(g, state.opt_state, state.params, loss_fn=loss_fn)
  chex.assert_trees_all_close(by_loss.params, optax.apply_updates(state.params, updates))
  chex.assert_trees_all_close(by_grad.params, by_loss.params, rtol=1e-6)
  chex.assert_trees_all_close(by_loss.opt_state, opt_state)
  # SAM moved away from the plain SGD step.
  plain, _ = _dense_state(optax.sgd(LR, momentum=0.9), sam_optax.flax.TrainState)
  assert fm.max_abs_diff(plain.apply_gradients(grads=g).params, by_loss.params) > 1e-5


def test_apply_gradients_without_closure_names_the_fix():
  state, loss_fn = _dense_state(sam_tx(), sam_optax.flax.TrainState)
  g = jax.grad(loss_fn)(state.params)
  with pytest.raises(TypeError, match=r"apply_gradients.*`loss_fn`"):
    state.apply_gradients(grads=g)


def test_train_step_errors_name_the_argument():
  x, y = fm.batch()
  state = fm.linen_state(sam_tx())
  step = sam_optax.flax.linen_train_step(ce_loss)
  with pytest.raises(ValueError, match=r"without `key`"):
    step(state, x, y)
  flax_state = flax_train_state.TrainState.create(
      apply_fn=state.apply_fn, params=state.params, tx=sam_tx()
  )
  with pytest.raises(TypeError, match=r"sam_optax.flax.TrainState"):
    step(flax_state, x, y, key=KEY)
  bad = sam_optax.flax.linen_train_step(ce_loss, collections=("batch_stats", "cache"))
  with pytest.raises(ValueError, match=r"`collections` names \['cache'\]"):
    bad(state, x, y, key=KEY)
  with pytest.raises(TypeError, match=r"`model_loss` must return a scalar loss"):
    sam_optax.flax.linen_train_step(lambda m, x, y: m(x, train=True))(
        state, x, y, key=KEY
    )
  with pytest.raises(ValueError, match=r"must not contain 'params'"):
    sam_optax.flax.linen_closure(
        state.apply_fn, ce_loss, model_state={"params": state.params}
    )
  with pytest.raises(TypeError, match=r"`apply_fn` must be callable"):
    sam_optax.flax.linen_closure(None, ce_loss)

