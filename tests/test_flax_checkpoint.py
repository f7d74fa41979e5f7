"""Orbax checkpoints of a SAM training run resume bit-identically (on CPU)."""

from __future__ import annotations

import threading

import chex
import jax
import optax
import pytest

pytest.importorskip("flax")
ocp = pytest.importorskip("orbax.checkpoint")

from flax import nnx  # noqa: E402

import sam_optax  # noqa: E402
import sam_optax.flax  # noqa: E402
from tests import flax_models as fm  # noqa: E402

KEY = jax.random.key(3)
DATA = [fm.batch(20 + t) for t in range(4)]


# One transformation for all runs: it is static in the state, so the resumed
# run reuses the compiled step.
TX = optax.chain(sam_optax.sam(0.1), optax.sgd(0.3, momentum=0.9))
# rho="auto" carries its radius in the state: it must resume with it.
TX_AUTO = optax.chain(sam_optax.sam("auto"), optax.sgd(0.3, momentum=0.9))


@pytest.fixture
def no_leftover_threads():
  before = set(threading.enumerate())
  yield
  for thread in set(threading.enumerate()) - before:
    thread.join(timeout=10)
    assert not thread.is_alive(), f"checkpointing left thread {thread.name} running"


def linen_loss(model, x, y):
  return fm.cross_entropy(model(x, train=True), y)


def nnx_loss(model, x, y):
  return fm.cross_entropy(model(x), y)


@pytest.mark.parametrize("tx", [TX, TX_AUTO], ids=["rho", "auto"])
def test_linen_train_state_resumes_bit_identically(tx, tmp_path, no_leftover_threads):
  step = jax.jit(sam_optax.flax.linen_train_step(linen_loss))
  full = fm.linen_state(tx)
  for x, y in DATA:
    full, _ = step(full, x, y, key=KEY)

  half = fm.linen_state(tx)
  for x, y in DATA[:2]:
    half, _ = step(half, x, y, key=KEY)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "linen", half)
    checkpointer.wait_until_finished()

  # A new process builds a state of the same shapes (another seed) and
  # restores into it.
  fresh = fm.linen_state(tx, seed=9)
  assert fm.max_abs_diff(fresh.params, half.params) > 1e-3
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
  with ocp.StandardCheckpointer() as checkpointer:
    resumed = checkpointer.restore(tmp_path / "linen", abstract)
  assert type(resumed) is type(half)
  assert int(resumed.step) == 2
  assert sam_optax.sam_stats(resumed.opt_state) == sam_optax.sam_stats(half.opt_state)

  for x, y in DATA[2:]:
    resumed, _ = step(resumed, x, y, key=KEY)
  chex.assert_trees_all_equal(resumed.params, full.params)
  chex.assert_trees_all_equal(resumed.batch_stats, full.batch_stats)
  chex.assert_trees_all_equal(resumed.opt_state, full.opt_state)
  assert int(resumed.step) == int(full.step) == 4
  assert fm.max_abs_diff(resumed.params, half.params) > 1e-4


def make_nnx(seed=0):
  model = fm.nnx_model(seed=seed)
  return model, nnx.Optimizer(model, TX, wrt=nnx.Param)


def test_nnx_model_and_optimizer_resume_bit_identically(tmp_path, no_leftover_threads):
  step = nnx.jit(sam_optax.flax.nnx_train_step(nnx_loss))
  full_model, full_opt = make_nnx()
  for x, y in DATA:
    step(full_model, full_opt, x, y)

  model, optimizer = make_nnx()
  for x, y in DATA[:2]:
    step(model, optimizer, x, y)
  half = fm.arrays(nnx.state((model, optimizer)))
  half_params = fm.arrays(nnx.state(model, nnx.Param))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "nnx", nnx.state((model, optimizer)))
    checkpointer.wait_until_finished()

  # A new process: an abstract model and optimizer (another seed), restored.
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make_nnx(seed=4)))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "nnx", abstract)
  model, optimizer = nnx.merge(graphdef, restored)
  chex.assert_trees_all_equal(fm.arrays(nnx.state((model, optimizer))), half)
  assert int(model.dropout.rngs.count[...]) == 2

  for x, y in DATA[2:]:
    step(model, optimizer, x, y)
  chex.assert_trees_all_equal(
      fm.arrays(nnx.state((model, optimizer))),
      fm.arrays(nnx.state((full_model, full_opt))),
  )
  assert int(optimizer.step[...]) == 4
  assert fm.max_abs_diff(fm.arrays(nnx.state(model, nnx.Param)), half_params) > 1e-4
