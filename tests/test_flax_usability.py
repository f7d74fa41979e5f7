"""A new user's first hour with `sam_optax.flax`: errors that name the fix,
keyword arguments for the loss, the `model_loss` naming (and its deprecated
old names), `sam_optax.flax` after `import sam_optax`, one compilation across
a checkpoint, and the SAM statistics returned by the steps."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")

import flax.errors  # noqa: E402
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from flax.training import train_state as flax_train_state  # noqa: E402

import sam_optax  # noqa: E402
import sam_optax.flax  # noqa: E402
from tests import flax_models as fm  # noqa: E402

RHO, LR = 0.2, 0.5
KEY = jax.random.key(7)


def sam_tx():
  return optax.chain(sam_optax.sam(RHO), optax.sgd(LR))


def ce_loss(model, x, y):
  return fm.cross_entropy(model(x, train=True), y)


def step_keys(key, step, n):
  """The documented keys of the first `n` random streams at `step`."""
  step_key = jax.random.fold_in(key, step)
  return [jax.random.fold_in(step_key, i) for i in range(n)]


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(tree)))


@contextlib.contextmanager
def no_warnings():
  """A context in which any warning is an error."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    yield


# -- 1a. A TrainState without `batch_stats` for a BatchNorm model. -----------


def test_state_without_batch_stats_shows_the_subclass_to_write():
  full = fm.linen_state(sam_tx())
  # Created as in Flax's docs for a model without BatchNorm.
  state = sam_optax.flax.TrainState.create(
      apply_fn=full.apply_fn, params=full.params, tx=sam_tx()
  )
  x, y = fm.batch()
  step = sam_optax.flax.linen_train_step(ce_loss)
  with pytest.raises(ValueError) as info:
    step(state, x, y, key=KEY)
  message = str(info.value)
  assert isinstance(info.value.__cause__, flax.errors.ScopeCollectionNotFound)
  assert "`linen_train_step`" in message and "'batch_stats'" in message
  subclass = "class TrainState(sam_optax.flax.TrainState):\n      batch_stats: Any"
  assert subclass in message
  assert 'batch_stats=variables["batch_stats"]' in message
  assert "collections=" not in message  # the default finds `batch_stats`

  # The fix it shows works.
  class TrainState(sam_optax.flax.TrainState):
    batch_stats: Any

  fixed = TrainState.create(
      apply_fn=full.apply_fn, params=full.params, batch_stats=full.batch_stats,
      tx=sam_tx(),
  )
  new, _ = step(fixed, x, y, key=KEY)
  assert fm.max_abs_diff(new.batch_stats, full.batch_stats) > 1e-4


def test_batch_stats_left_out_of_collections_names_the_argument():
  state = fm.linen_state(sam_tx())
  x, y = fm.batch()
  step = sam_optax.flax.linen_train_step(ce_loss, collections=())
  with pytest.raises(ValueError, match=r"collections=\('batch_stats',\)") as info:
    step(state, x, y, key=KEY)
  assert isinstance(info.value.__cause__, flax.errors.ScopeCollectionNotFound)


def test_closure_without_model_state_names_the_argument():
  state = fm.linen_state(sam_tx())
  x, y = fm.batch()
  closure = sam_optax.flax.linen_closure(
      state.apply_fn, ce_loss, x, y, rngs={"dropout": KEY}
  )
  with pytest.raises(ValueError, match=r"model_state=\{'batch_stats'") as info:
    closure(state.params)
  assert isinstance(info.value.__cause__, flax.errors.ScopeCollectionNotFound)


# -- 1b. A `loss(params, x, y)` given where `model_loss(model, ...)` goes. ---


class Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(x)


def _dense_linen():
  x = jnp.arange(8.0).reshape(4, 2)
  y = jnp.ones((4, 1))
  params = Dense().init(jax.random.key(0), x)["params"]
  state = sam_optax.flax.TrainState.create(
      apply_fn=Dense().apply, params=params, tx=sam_tx()
  )
  return state, x, y


def test_linen_params_style_loss_explains_the_signature():
  state, x, y = _dense_linen()

  def loss(params, x, y):  # the Quickstart's loss
    return jnp.mean((Dense().apply({"params": params}, x) - y) ** 2)

  with pytest.raises(TypeError) as info:
    jax.jit(sam_optax.flax.linen_train_step(loss))(state, x, y)
  message = str(info.value)
  assert isinstance(
      info.value.__cause__, flax.errors.ApplyScopeInvalidVariablesTypeError
  )
  assert "`linen_train_step`" in message
  assert "model_loss(model, *args, **kwargs)" in message
  example = "def model_loss(model, x, y):\n      return jnp.mean((model(x) - y) ** 2)"
  assert example in message
  assert "first parameter is named `params`" in message
  assert "loss_fn=lambda p: loss(p, x, y)" in message

  # The same hint from the closure built by hand, and for a loss that
  # indexes its "parameters" (the name `p` gives no hint: the error does).
  def indexing(p, x, y):
    return jnp.mean((x @ p["Dense_0"]["kernel"] - y) ** 2)

  closure = sam_optax.flax.linen_closure(state.apply_fn, indexing, x, y)
  hint = r"`linen_closure`: `model_loss` is called"
  with pytest.raises(TypeError, match=hint) as info:
    closure(state.params)
  assert "first parameter is named" not in str(info.value)

  # The example in the message works.
  def model_loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  new, loss_value = sam_optax.flax.linen_train_step(model_loss)(state, x, y)
  chex.assert_trees_all_close(loss_value, loss(state.params, x, y))
  assert int(new.step) == 1


def _linear_nnx():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  return model, nnx.Optimizer(model, sam_tx(), wrt=nnx.Param)


def test_nnx_params_style_loss_explains_the_signature():
  model, optimizer = _linear_nnx()
  x, y = jnp.arange(8.0).reshape(4, 2), jnp.ones((4, 1))
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, x, y):  # an NNX functional-style loss
    return jnp.mean((nnx.merge(graphdef, params, rest)(x) - y) ** 2)

  with pytest.raises(TypeError) as info:
    nnx.jit(sam_optax.flax.nnx_train_step(loss))(model, optimizer, x, y)
  message = str(info.value)
  # What nnx.merge raises when handed a module in place of an nnx.State.
  assert isinstance(info.value.__cause__, ValueError)
  assert "Incorrect number of leaves" in str(info.value.__cause__)
  assert "`nnx_train_step`" in message
  assert "model_loss(model, *args, **kwargs)" in message
  assert "def model_loss(model, x, y):" in message
  assert "first parameter is named `params`" in message

  def indexing(p, x, y):
    return jnp.mean((x @ p["kernel"] - y) ** 2)

  with pytest.raises(TypeError, match=r"`nnx_train_step`: `model_loss` is called"):
    sam_optax.flax.nnx_train_step(indexing)(model, optimizer, x, y)
  with pytest.raises(TypeError, match=r"`nnx_closure`: `model_loss` is called"):
    sam_optax.flax.nnx_closure(model, indexing, x, y)(nnx.state(model, nnx.Param))
  assert int(optimizer.step[...]) == 0  # nothing was applied


def test_other_errors_of_the_loss_pass_through_unchanged():
  state, x, y = _dense_linen()

  def broken(model, x, y):
    raise ValueError("my own bug")

  with pytest.raises(ValueError, match=r"^my own bug") as info:
    sam_optax.flax.linen_train_step(broken)(state, x, y)
  assert info.value.__cause__ is None
  model, optimizer = _linear_nnx()
  with pytest.raises(ValueError, match=r"^my own bug") as info:
    sam_optax.flax.nnx_train_step(broken)(model, optimizer, x, y)
  assert info.value.__cause__ is None

  def typo(model, x, y):
    return model.missing_layer(x)

  with pytest.raises(AttributeError, match=r"missing_layer"):
    sam_optax.flax.nnx_train_step(typo)(model, optimizer, x, y)


# -- 1c. A second random stream missing from `rng_collections`. -------------


class Noisy(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8)(x)
    x = x + 0.1 * jax.random.normal(self.make_rng("noise"), x.shape)
    x = nn.Dropout(0.5, deterministic=False)(x)
    return nn.Dense(1)(x)


def test_missing_random_stream_names_rng_collections():
  x, y = jnp.arange(8.0).reshape(4, 2), jnp.ones((4, 1))
  params = Noisy().init(jax.random.key(0), x)["params"]
  state = sam_optax.flax.TrainState.create(
      apply_fn=Noisy().apply, params=params, tx=sam_tx()
  )

  def mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  with pytest.raises(ValueError) as info:
    jax.jit(sam_optax.flax.linen_train_step(mse))(state, x, y, key=KEY)
  message = str(info.value)
  assert isinstance(info.value.__cause__, flax.errors.InvalidRngError)
  assert "'noise'" in message
  assert "rng_collections=('dropout', 'noise')" in message
  # Without a key, the message asks for the key and the stream.
  both = r"without `key`.*rng_collections=\('dropout', 'noise'\)"
  with pytest.raises(ValueError, match=both):
    sam_optax.flax.linen_train_step(mse)(state, x, y)
  # By hand, it names `rngs`.
  closure = sam_optax.flax.linen_closure(
      state.apply_fn, mse, x, y, rngs={"dropout": KEY}
  )
  with pytest.raises(ValueError, match=r"rngs=\{'dropout': \.\.\., 'noise': key\}"):
    closure(state.params)

  # The fix: both streams get the documented keys.
  step = jax.jit(
      sam_optax.flax.linen_train_step(mse, rng_collections=("dropout", "noise"))
  )
  _, loss = step(state, x, y, key=KEY)
  dropout_key, noise_key = step_keys(KEY, 0, 2)
  out = Noisy().apply(
      {"params": params}, x, rngs={"dropout": dropout_key, "noise": noise_key}
  )
  chex.assert_trees_all_close(loss, jnp.mean((out - y) ** 2), rtol=1e-6)


# -- 1d. Keyword arguments of the step reach the loss, in both passes. ------


def linen_masked(model, x, y, *, mask):
  per_example = optax.softmax_cross_entropy_with_integer_labels(
      model(x, train=True), y
  )
  return jnp.sum(per_example * mask) / jnp.sum(mask)


def test_linen_step_forwards_keyword_arguments_to_both_passes():
  state = fm.linen_state(sam_tx())
  x, y = fm.batch(4)
  mask = (jnp.arange(x.shape[0]) % 3 != 0).astype(jnp.float32)
  step = jax.jit(sam_optax.flax.linen_train_step(linen_masked))
  new, loss = step(state, x, y, key=KEY, mask=mask)

  # By hand: a `params -> loss` closure with explicit `model.apply` and mask.
  (dropout_key,) = step_keys(KEY, 0, 1)

  def closure_with(mask):
    def closure(params):
      logits, _ = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, x, train=True,
          mutable=["batch_stats"], rngs={"dropout": dropout_key},
      )
      per = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.sum(per * mask) / jnp.sum(mask)

    return closure

  masked = closure_with(mask)
  want_loss, grads = jax.value_and_grad(masked)(state.params)
  updates, _ = state.tx.update(grads, state.opt_state, state.params, loss_fn=masked)
  want = optax.apply_updates(state.params, updates)
  chex.assert_trees_all_close(loss, want_loss, rtol=1e-6)
  chex.assert_trees_all_close(new.params, want, rtol=1e-5, atol=1e-6)
  # The test can fail: without the mask in the perturbed pass, or in both,
  # the step is another.
  unmasked = closure_with(jnp.ones_like(mask))
  updates, _ = state.tx.update(grads, state.opt_state, state.params, loss_fn=unmasked)
  assert fm.max_abs_diff(optax.apply_updates(state.params, updates), want) > 1e-5
  plain, _ = step(state, x, y, key=KEY, mask=jnp.ones_like(mask))
  assert fm.max_abs_diff(plain.params, want) > 1e-5


def test_nnx_step_forwards_keyword_arguments_to_both_passes():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
  y = jnp.asarray(np.random.default_rng(1).normal(size=(6, 1)), jnp.float32)
  mask = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])[:, None]

  def model_loss(model, x, y, *, mask):
    return jnp.sum(mask * (jnp.tanh(model(x)) - y) ** 2) / jnp.sum(mask)

  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.as_pure(params)

  # By hand, with pure arrays and the mask in the closure.
  def closure_with(mask):
    return lambda p: model_loss(nnx.merge(graphdef, p), x, y, mask=mask)

  tx = sam_tx()
  masked = closure_with(mask)
  want_loss, grads = jax.value_and_grad(masked)(params)
  updates, _ = tx.update(grads, tx.init(params), params, loss_fn=masked)
  want = optax.apply_updates(params, updates)

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  loss = nnx.jit(sam_optax.flax.nnx_train_step(model_loss))(
      model, optimizer, x, y, mask=mask
  )
  chex.assert_trees_all_close(loss, want_loss, rtol=1e-6)
  chex.assert_trees_all_close(
      nnx.as_pure(nnx.state(model, nnx.Param)), want, rtol=1e-5, atol=1e-6
  )
  unmasked = closure_with(jnp.ones_like(mask))
  updates, _ = tx.update(grads, tx.init(params), params, loss_fn=unmasked)
  assert fm.max_abs_diff(optax.apply_updates(params, updates), want) > 1e-5


def test_nnx_keyword_graph_nodes_are_snapshotted():
  model = fm.nnx_model(record=True)
  optimizer = nnx.Optimizer(model, sam_tx(), wrt=nnx.Param)
  rngs = nnx.Rngs(dropout=7)
  x, y = fm.batch(5)

  def model_loss(model, x, y, *, rngs):
    return fm.cross_entropy(model(x, dropout_key=rngs.dropout()), y)

  fm.MASKS.clear()
  nnx.jit(sam_optax.flax.nnx_train_step(model_loss))(model, optimizer, x, y, rngs=rngs)
  jax.effects_barrier()
  assert len(fm.MASKS) == 2
  np.testing.assert_array_equal(fm.MASKS[0], fm.MASKS[1])
  assert int(rngs.dropout.count[...]) == 1  # advanced by the clean pass only


# -- 2. `model_loss` and the closures; the old names still work. ------------


def test_deprecated_linen_names_warn_and_give_the_same_results():
  state = fm.linen_state(sam_tx())
  x, y = fm.batch(6)
  common = {
      "model_state": {"batch_stats": state.batch_stats},
      "rngs": {"dropout": KEY},
  }
  with no_warnings():
    new = sam_optax.flax.linen_closure(state.apply_fn, ce_loss, x, y, **common)
    want = new(state.params)
  with pytest.warns(DeprecationWarning, match=r"`sam_optax.flax.linen_closure`"):
    old = sam_optax.flax.linen_loss_fn(state.apply_fn, ce_loss, x, y, **common)
  chex.assert_trees_all_equal(old(state.params), want)
  with pytest.warns(DeprecationWarning, match=r"`model_loss=`"):
    by_keyword = sam_optax.flax.linen_closure(
        state.apply_fn, loss_fn=lambda model: ce_loss(model, x, y), **common
    )
  chex.assert_trees_all_equal(by_keyword(state.params)[:2], want[:2])

  with no_warnings():
    want_state, want_loss = sam_optax.flax.linen_train_step(model_loss=ce_loss)(
        state, x, y, key=KEY
    )
  with pytest.warns(DeprecationWarning, match=r"linen_train_step\(loss_fn=\.\.\.\)"):
    old_step = sam_optax.flax.linen_train_step(loss_fn=ce_loss)
  got_state, got_loss = old_step(state, x, y, key=KEY)
  chex.assert_trees_all_equal(got_loss, want_loss)
  chex.assert_trees_all_equal(got_state.params, want_state.params)
  with pytest.raises(TypeError, match=r"both `model_loss` and `loss_fn`"):
    sam_optax.flax.linen_train_step(ce_loss, loss_fn=ce_loss)
  with pytest.raises(TypeError, match=r"missing the model-level loss"):
    sam_optax.flax.linen_train_step()


def nnx_ce(model, x, y):
  return fm.cross_entropy(model(x), y)


def test_deprecated_nnx_names_warn_and_give_the_same_results():
  x, y = fm.batch(7)
  model = fm.nnx_model()
  params = nnx.state(model, nnx.Param)
  with no_warnings():
    want = sam_optax.flax.nnx_closure(model, nnx_ce, x, y)(params)
  with pytest.warns(DeprecationWarning, match=r"`sam_optax.flax.nnx_closure`"):
    old = sam_optax.flax.nnx_loss_fn(model, nnx_ce, x, y)
  chex.assert_trees_all_equal(old(params), want)
  with pytest.warns(DeprecationWarning, match=r"`model_loss=`"):
    by_keyword = sam_optax.flax.nnx_closure(
        model, loss_fn=lambda model: nnx_ce(model, x, y)
    )
  chex.assert_trees_all_equal(by_keyword(params), want)

  models = [fm.nnx_model() for _ in range(2)]
  optimizers = [nnx.Optimizer(m, sam_tx(), wrt=nnx.Param) for m in models]
  with no_warnings():
    want_loss = sam_optax.flax.nnx_train_step(model_loss=nnx_ce)(
        models[0], optimizers[0], x, y
    )
  with pytest.warns(DeprecationWarning, match=r"nnx_train_step\(loss_fn=\.\.\.\)"):
    old_step = sam_optax.flax.nnx_train_step(loss_fn=nnx_ce)
  got_loss = old_step(models[1], optimizers[1], x, y)
  chex.assert_trees_all_equal(got_loss, want_loss)
  chex.assert_trees_all_equal(
      fm.arrays(nnx.state(models[1])), fm.arrays(nnx.state(models[0]))
  )


# -- 3. `sam_optax.flax` after `import sam_optax`, without importing Flax. ---


def test_flax_submodule_is_reachable_lazily():
  code = textwrap.dedent("""
      import sys
      import sam_optax
      assert "flax" not in sys.modules, "import sam_optax imported flax"
      assert "sam_optax.flax" not in sys.modules
      state_cls = sam_optax.flax.TrainState
      assert "flax" in sys.modules
      assert state_cls is sys.modules["sam_optax.flax"].TrainState
      assert not hasattr(sam_optax, "no_such_name")
      print("ok")
  """)
  done = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
      check=False,
  )
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "ok"


# -- 4. Flax's own TrainState with a SAM `tx`. -------------------------------


def test_flax_train_state_apply_gradients_points_to_ours():
  state, x, y = _dense_linen()
  theirs = flax_train_state.TrainState.create(
      apply_fn=state.apply_fn, params=state.params, tx=sam_tx()
  )

  def loss_fn(params):
    return jnp.mean((theirs.apply_fn({"params": params}, x) - y) ** 2)

  with pytest.raises((TypeError, ValueError)) as info:
    theirs.apply_gradients(grads=jax.grad(loss_fn)(theirs.params), loss_fn=loss_fn)
  assert "sam_optax.flax.TrainState" in str(info.value)


# -- 5. One compilation: fresh state, later steps, restored state. ----------


def _compilations(state, tmp_path):
  """Compilations of a jitted step: two steps, then restored states.

  Orbax restores arrays committed to a device, which alone makes `jax.jit`
  compile again; the arrays of the fresh state are committed likewise, so
  that `step` alone can make a difference.
  """
  ocp = pytest.importorskip("orbax.checkpoint")
  device = jax.devices()[0]
  state = jax.tree.map(
      lambda a: jax.device_put(a, device) if isinstance(a, jax.Array) else a, state
  )
  x, y = jnp.arange(8.0).reshape(4, 2), jnp.ones((4, 1))

  def model_loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  step = jax.jit(sam_optax.flax.linen_train_step(model_loss))
  state, _ = step(state, x, y)
  state, _ = step(state, x, y)
  restored, _ = step(jax.tree.map(jnp.asarray, state), x, y)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "state", abstract)
  assert int(restored.step) == 2
  restored, _ = step(restored, x, y)
  assert int(restored.step) == 3
  return step._cache_size()  # noqa: SLF001


def test_create_stores_the_step_as_an_int32_array(tmp_path):
  state, _, _ = _dense_linen()
  assert isinstance(state.step, jax.Array)
  assert state.step.dtype == jnp.int32 and state.step.shape == ()
  assert not state.step.weak_type
  assert int(state.step) == 0
  assert _compilations(state, tmp_path / "array") == 1
  # Flax's Python int compiles three times (the test can fail).
  assert _compilations(state.replace(step=0), tmp_path / "int") == 3


# -- 6. The steps return the SAM statistics on request. ---------------------


def test_linen_step_returns_stats():
  state = fm.linen_state(sam_tx())
  x, y = fm.batch(8)
  step = jax.jit(sam_optax.flax.linen_train_step(ce_loss, with_stats=True))
  new, loss, stats = step(state, x, y, key=KEY)
  assert isinstance(stats, sam_optax.SAMStats)

  (dropout_key,) = step_keys(KEY, 0, 1)

  def loss_on(params):
    logits, _ = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_key},
    )
    return fm.cross_entropy(logits, y)

  want_loss, grads = jax.value_and_grad(loss_on)(state.params)
  chex.assert_trees_all_close(loss, want_loss, rtol=1e-6)
  chex.assert_trees_all_close(stats.grad_norm, global_norm(grads), rtol=1e-5)
  assert float(stats.pass_taken) == 1.0 and float(stats.rho) == pytest.approx(RHO)
  assert float(stats.perturbed_loss) > float(loss)
  chex.assert_trees_all_equal(stats, sam_optax.sam_stats(new.opt_state))

  plain = fm.linen_state(optax.sgd(LR))
  new, _, stats = step(plain, x, y, key=KEY)
  chex.assert_trees_all_equal(stats, sam_optax.SAMStats.zeros())
  chex.assert_trees_all_close(
      new.params, jax.tree.map(lambda w, g: w - LR * g, state.params, grads),
      rtol=1e-5, atol=1e-6,
  )


def test_nnx_step_returns_stats():
  x, y = fm.batch(9)
  model = fm.nnx_model()
  clean = nnx.clone(model)  # same weights, statistics and RNG counters
  grads = nnx.as_pure(nnx.grad(nnx_ce)(clean, x, y))
  want_loss = nnx_ce(nnx.clone(model), x, y)

  optimizer = nnx.Optimizer(model, sam_tx(), wrt=nnx.Param)
  step = nnx.jit(sam_optax.flax.nnx_train_step(nnx_ce, with_stats=True))
  loss, stats = step(model, optimizer, x, y)
  assert isinstance(stats, sam_optax.SAMStats)
  chex.assert_trees_all_close(loss, want_loss, rtol=1e-6)
  chex.assert_trees_all_close(stats.grad_norm, global_norm(grads), rtol=1e-5)
  assert float(stats.pass_taken) == 1.0 and float(stats.perturbed_loss) > 0

  plain_model = fm.nnx_model()
  plain = nnx.Optimizer(plain_model, optax.sgd(LR), wrt=nnx.Param)
  _, stats = step(plain_model, plain, x, y)
  chex.assert_trees_all_equal(stats, sam_optax.SAMStats.zeros())
  assert int(plain.step[...]) == 1
