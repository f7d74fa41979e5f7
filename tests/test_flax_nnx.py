"""Flax NNX: `nnx_closure` and `nnx_train_step` with BatchNorm and dropout."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")

from flax import nnx  # noqa: E402

import sam_optax  # noqa: E402
import sam_optax.flax  # noqa: E402
from tests import flax_models as fm  # noqa: E402

RHO, LR = 0.2, 0.5


def sam_tx():
  return optax.chain(sam_optax.sam(RHO), optax.sgd(LR, momentum=0.9))


def ce_loss(model, x, y):
  return fm.cross_entropy(model(x), y)


def pure(model, kind):
  return nnx.as_pure(nnx.state(model, kind))


@nnx.jit
def hand_written_step(model, x, y):
  """One SAM step from the paper on clones of `model`, which is left as is."""
  clean = nnx.clone(model)  # its BatchStats and RNG counter advance
  g = nnx.grad(ce_loss)(clean, x, y)
  g = pure(g, nnx.Param)
  norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
  w = pure(model, nnx.Param)
  perturbed = nnx.clone(model)
  nnx.update(perturbed, jax.tree.map(lambda wi, gi: wi + RHO * gi / norm, w, g))
  g_adv = pure(nnx.grad(ce_loss)(perturbed, x, y), nnx.Param)
  # First step of SGD with momentum: the trace is the gradient itself.
  params = jax.tree.map(lambda wi, u: wi - LR * u, w, g_adv)
  plain = jax.tree.map(lambda wi, gi: wi - LR * gi, w, g)
  return params, pure(clean, nnx.BatchStat), pure(perturbed, nnx.BatchStat), plain


def make(record=False):
  model = fm.nnx_model(record=record)
  return model, nnx.Optimizer(model, sam_tx(), wrt=nnx.Param)


def test_one_step_matches_hand_written_two_passes():
  model, optimizer = make()
  x, y = fm.batch(1)
  want_params, clean_stats, adv_stats, plain_params = hand_written_step(model, x, y)
  forward = nnx.clone(model)
  forward(x)  # a single clean forward pass

  loss = nnx.jit(sam_optax.flax.nnx_train_step(ce_loss))(model, optimizer, x, y)

  chex.assert_trees_all_close(
      pure(model, nnx.Param), want_params, rtol=1e-5, atol=1e-6
  )
  chex.assert_trees_all_close(
      pure(model, nnx.BatchStat), pure(forward, nnx.BatchStat), rtol=1e-6, atol=1e-7
  )
  chex.assert_trees_all_close(pure(model, nnx.BatchStat), clean_stats)
  # The RNG stream advanced once (the clean pass), as in plain training.
  assert int(model.dropout.rngs.count[...]) == 1
  assert int(optimizer.step[...]) == 1
  assert float(loss) > 0
  # The test can fail: the perturbed pass's statistics differ, and so does
  # plain SGD.
  assert fm.max_abs_diff(clean_stats, adv_stats) > 1e-5
  assert fm.max_abs_diff(plain_params, want_params) > 1e-4


def test_perturbed_pass_reuses_the_dropout_mask():
  model, optimizer = make(record=True)
  x, y = fm.batch(2)
  before = nnx.clone(model)
  train_step = nnx.jit(sam_optax.flax.nnx_train_step(ce_loss))
  fm.MASKS.clear()
  train_step(model, optimizer, x, y)
  train_step(model, optimizer, x, y)
  jax.effects_barrier()
  assert len(fm.MASKS) == 4  # clean and perturbed pass of two steps
  np.testing.assert_array_equal(fm.MASKS[0], fm.MASKS[1])
  np.testing.assert_array_equal(fm.MASKS[2], fm.MASKS[3])
  assert not np.array_equal(fm.MASKS[0], fm.MASKS[2])  # a new mask each step
  masks = list(fm.MASKS)
  fm.MASKS.clear()
  before(x)  # a clean forward pass from the state before the first step
  jax.effects_barrier()
  np.testing.assert_array_equal(fm.MASKS[0], masks[0])


def test_closure_by_hand_equals_train_step():
  x, y = fm.batch(3)

  @nnx.jit
  def by_hand(model, optimizer, x, y):
    closure = sam_optax.flax.nnx_closure(model, ce_loss, x, y)
    loss, grads = nnx.value_and_grad(ce_loss)(model, x, y)
    optimizer.update(model, grads, loss_fn=closure)
    return loss

  a, opt_a = make()
  b, opt_b = make()
  loss_a = by_hand(a, opt_a, x, y)
  loss_b = nnx.jit(sam_optax.flax.nnx_train_step(ce_loss))(b, opt_b, x, y)
  chex.assert_trees_all_close(loss_a, loss_b)
  chex.assert_trees_all_close(
      fm.arrays(nnx.state(a)), fm.arrays(nnx.state(b)), rtol=1e-6, atol=1e-7
  )
  stats = sam_optax.sam_stats(nnx.as_pure(opt_a.opt_state))
  assert float(stats.perturbed_loss) > 0


def test_eager_equals_jit():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
  y = jnp.arange(8) % 2
  models = [fm.TinyNet(nnx.Rngs(0, dropout=1)) for _ in range(2)]
  optimizers = [nnx.Optimizer(m, sam_tx(), wrt=nnx.Param) for m in models]
  step = sam_optax.flax.nnx_train_step(ce_loss)
  step(models[0], optimizers[0], x, y)
  nnx.jit(step)(models[1], optimizers[1], x, y)
  chex.assert_trees_all_close(
      fm.arrays(nnx.state(models[0])), fm.arrays(nnx.state(models[1])),
      rtol=1e-5, atol=1e-6,
  )
  assert int(models[0].dropout.rngs.count[...]) == 1
  assert fm.max_abs_diff(
      pure(models[0], nnx.BatchStat), pure(fm.TinyNet(nnx.Rngs(0)), nnx.BatchStat)
  ) > 1e-4


def test_rngs_passed_as_an_argument_are_snapshotted():
  model, optimizer = make(record=True)
  rngs = nnx.Rngs(dropout=7)
  x, y = fm.batch(5)

  def model_loss(model, x, y, rngs):
    return fm.cross_entropy(model(x, dropout_key=rngs.dropout()), y)

  fm.MASKS.clear()
  nnx.jit(sam_optax.flax.nnx_train_step(model_loss))(model, optimizer, x, y, rngs)
  jax.effects_barrier()
  assert len(fm.MASKS) == 2
  np.testing.assert_array_equal(fm.MASKS[0], fm.MASKS[1])
  assert int(rngs.dropout.count[...]) == 1  # advanced by the clean pass only
  assert int(model.dropout.rngs.count[...]) == 0  # the model's stream is unused


def test_aux_is_returned_and_other_optimizers_ignore_the_closure():
  x, y = fm.batch(6)

  def loss_with_aux(model, x, y):
    logits = model(x)
    return fm.cross_entropy(logits, y), jnp.mean(logits.argmax(-1) == y)

  a = fm.nnx_model()
  opt_a = nnx.Optimizer(a, optax.adam(1e-2), wrt=nnx.Param)
  loss, acc = nnx.jit(sam_optax.flax.nnx_train_step(loss_with_aux))(a, opt_a, x, y)
  assert acc.shape == () and loss.shape == ()

  b = fm.nnx_model()
  opt_b = nnx.Optimizer(b, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def plain(model, optimizer, x, y):
    grads = nnx.grad(lambda m: loss_with_aux(m, x, y)[0])(model)
    optimizer.update(model, grads)

  plain(b, opt_b, x, y)
  chex.assert_trees_all_close(fm.arrays(nnx.state(a)), fm.arrays(nnx.state(b)))


def test_errors_name_the_argument():
  model, optimizer = make()
  x, y = fm.batch()
  step = sam_optax.flax.nnx_train_step(ce_loss)
  with pytest.raises(TypeError, match=r"`optimizer` must be an `nnx.Optimizer`"):
    step(model, sam_tx(), x, y)
  with pytest.raises(TypeError, match=r"ModelAndOptimizer"):
    step(model, nnx.ModelAndOptimizer(model, sam_tx()), x, y)
  with pytest.raises(TypeError, match=r"`model` must be an NNX module"):
    sam_optax.flax.nnx_closure(ce_loss, model, x, y)
  with pytest.raises(TypeError, match=r"`model_loss` must return a scalar loss"):
    sam_optax.flax.nnx_train_step(lambda m, x, y: m(x))(model, optimizer, x, y)
