"""Unusual parameter trees: empty, scalar and size-0 leaves, zero gradients,
and integer leaves (rejected with the fix in the message)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import reference
from tests.contract import CASES

cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)

# Variants whose mask is computed from the parameters reject, at `init`, a
# tree in which the mask selects nothing (an empty tree included).
MASKED = {"masked_sam", "sam_on"}


def _cubic(p):
  """``Σ w² + 0.3 w³``: a loss with a non-zero gradient almost everywhere."""
  return sum(jnp.sum(x**2 + 0.3 * x**3) for x in jax.tree.leaves(p)) + jnp.zeros(())


def _run(case, params, loss_fn, steps=3):
  """``steps`` jitted steps of ``chain(case, sgd)``; returns the last updates."""
  chained = optax.chain(case.make(), optax.sgd(0.1))

  @jax.jit
  def step(p, s):
    updates, s = chained.update(jax.grad(loss_fn)(p), s, p, **case.closure(loss_fn))
    return updates, optax.apply_updates(p, updates), s

  p, s = params, chained.init(params)
  for _ in range(steps):
    updates, p, s = step(p, s)
  return updates, p, s


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _layout(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


@cases
@pytest.mark.parametrize("empty", [{}, ()], ids=["dict", "tuple"])
def test_empty_tree(case, empty):
  tx = case.make()
  if case.name in MASKED:
    with pytest.raises(ValueError, match=r"`mask` selects no parameter"):
      tx.init(empty)
    return
  state = tx.init(empty)
  calls = []
  loss_fn = lambda p: calls.append(1) or jnp.zeros(())
  out, new_state = tx.update(empty, state, empty, **case.closure(loss_fn))
  assert out == empty and type(out) is type(empty)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert int(new_state.count) == 1
  assert np.isfinite(float(new_state.stats.grad_norm))
  updates, params, _ = _run(case, empty, loss_fn)
  assert updates == empty and params == empty


SCALARS = {"a": jnp.asarray(0.7), "b": (jnp.asarray(-1.3), jnp.asarray(0.2))}
SIZE0 = {
    "w": jnp.zeros((0, 3)),
    "b": jnp.asarray([0.5, -1.0, 2.0]),
    "e": jnp.zeros((0,)),
    "m": jnp.asarray([[0.3, -0.4], [1.1, 0.2]]),
}
MIXED = {"scalars": SCALARS, "size0": SIZE0}


@cases
def test_scalar_and_size0_leaves(case):
  updates, new_params, state = _run(case, MIXED, _cubic)
  assert _layout(updates) == _layout(MIXED)
  assert _layout(new_params) == _layout(MIXED)
  assert _finite(updates) and _finite(state)
  stats = sam_optax.sam_stats(state)
  if case.uses_clean_gradient or float(stats.grad_norm) > 0:
    assert float(stats.grad_norm) > 0
  else:  # SAMPa records no clean gradient: its pass must have run
    assert float(stats.perturbed_grad_norm) > 0


@pytest.mark.parametrize(
    "params", [SCALARS, SIZE0, MIXED], ids=["scalars", "size0", "mixed"]
)
def test_sam_on_scalar_and_size0_leaves_matches_reference(params):
  tx = sam_optax.sam(0.3)
  grads = jax.grad(_cubic)(params)
  got, _ = tx.update(grads, tx.init(params), params, loss_fn=_cubic)
  want = reference.sam_gradient(_cubic, params, 0.3)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  assert _layout(got) == _layout(params)


ALL_SIZE0 = {"w": jnp.zeros((0, 3)), "e": jnp.zeros((0,))}


@cases
@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"a": jnp.asarray(1.0), "b": jnp.ones(3)}, id="at_minimum"),
        pytest.param(ALL_SIZE0, id="all_size0"),
    ],
)
def test_zero_gradient_gives_no_nan(case, params):
  if case.name == "masked_sam" and params is ALL_SIZE0:
    with pytest.raises(ValueError, match=r"`mask` selects no parameter"):
      case.make().init(params)
    return
  def loss_fn(p):  # minimal at 1: a zero gradient there
    return sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(p)) + jnp.zeros(())

  updates, new_params, state = _run(case, params, loss_fn)
  assert _finite(updates) and _finite(state)
  assert _layout(updates) == _layout(params)
  if case.zero_gradient_is_stationary:
    chex.assert_trees_all_equal(new_params, params)


# ----------------------------------------------------------------------------
# Integer leaves.

INT_PARAMS = {"w": jnp.asarray([1.0, -2.0, 0.5]), "n": jnp.asarray(3, jnp.int32)}


def _int_loss(p):
  return jnp.sum(p["w"] ** 2 + p["w"] ** 3) * p["n"].astype(jnp.float32)


@cases
def test_integer_parameter_is_rejected_with_the_fix(case):
  tx = case.make()
  grads = jax.grad(_int_loss, allow_int=True)(INT_PARAMS)
  assert grads["n"].dtype == jax.dtypes.float0
  with pytest.raises(ValueError) as info:
    tx.update(grads, tx.init(INT_PARAMS), INT_PARAMS, **case.closure(_int_loss))
  message = str(info.value)
  assert "`params` has a leaf of dtype int32 at \"['n']\"" in message
  assert "optax.masked" in message and "separate collection" in message


@pytest.mark.parametrize(
    "leaf, dtype_text",
    [
        (jnp.asarray([True, False]), "bool"),
        (jnp.asarray([1, 2], jnp.uint8), "uint8"),
        (np.asarray([1, 2], np.int64), "int64"),
    ],
    ids=["bool", "uint8", "numpy_int"],
)
def test_non_floating_parameter_leaves_are_named(leaf, dtype_text):
  params = {"layer": [jnp.ones(2), leaf]}
  grads = {"layer": [jnp.ones(2), jnp.zeros(2)]}
  tx = sam_optax.sam(0.05)
  with pytest.raises(ValueError, match=rf"dtype {dtype_text} at \"\['layer'\]\[1\]\""):
    tx.update(grads, tx.init(params), params, grad_fn=lambda p: grads)


def test_float0_gradient_is_rejected_with_the_fix():
  params = {"w": jnp.ones(3), "v": jnp.ones(2)}
  grads = {"w": jnp.ones(3), "v": np.zeros(2, jax.dtypes.float0)}
  tx = sam_optax.sam(0.05)
  with pytest.raises(ValueError) as info:
    tx.update(grads, tx.init(params), params, grad_fn=lambda p: p)
  message = str(info.value)
  assert "`updates` (the clean gradient) has a float0 leaf" in message
  assert "allow_int=True" in message and "['v']" in message
  assert "optax.masked" in message


def test_float0_leaves_in_a_mismatched_tree_are_described():
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.ones(3), "n": np.zeros((), jax.dtypes.float0)}
  tx = sam_optax.sam(0.05)
  with pytest.raises(ValueError, match=r"(?s)tree structure.*float0"):
    tx.update(grads, tx.init(params), params, grad_fn=lambda p: p)


def test_integer_grad_fn_output_is_rejected():
  params = {"w": jnp.ones(3)}
  tx = sam_optax.sam(0.05)
  bad = lambda p: {"w": jnp.ones(3, jnp.int32)}
  with pytest.raises(
      ValueError, match=r"output of `grad_fn` has a leaf of dtype int32"
  ):
    tx.update({"w": jnp.ones(3)}, tx.init(params), params, grad_fn=bad)


def test_integer_state_in_a_separate_collection_works():
  params = {"w": INT_PARAMS["w"]}
  counters = {"n": INT_PARAMS["n"]}  # closed over, not optimized
  loss_fn = lambda p: _int_loss({**p, **counters})
  tx = optax.chain(sam_optax.sam(0.1), optax.sgd(0.05))
  grads = jax.grad(loss_fn)(params)
  updates, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
  got = optax.apply_updates(params, updates)
  want = reference.flat(params) - 0.05 * reference.flat(
      reference.sam_gradient(loss_fn, params, 0.1)
  )
  np.testing.assert_allclose(reference.flat(got), want, rtol=1e-6)


def test_optax_masked_applies_sam_to_the_floating_leaves_only():
  params = INT_PARAMS
  mask = jax.tree.map(lambda x: jnp.issubdtype(x.dtype, jnp.inexact), params)
  tx = optax.masked(optax.chain(sam_optax.sam(0.1), optax.sgd(0.05)), mask)
  is_masked = lambda x: isinstance(x, optax.MaskedNode)

  def masked_loss(masked):  # puts the masked-out leaves back
    full = jax.tree.map(
        lambda m, p: p if is_masked(m) else m, masked, params, is_leaf=is_masked
    )
    return _int_loss(full)

  @jax.jit
  def step(p, s):
    grads = jax.grad(_int_loss, allow_int=True)(p)
    # float0 gradients pass through `optax.masked` unchanged: zeros instead,
    # so that `optax.apply_updates` keeps the integer leaves as they are.
    grads = jax.tree.map(
        lambda g, x: jnp.zeros_like(x) if g.dtype == jax.dtypes.float0 else g, grads, p
    )
    updates, s = tx.update(grads, s, p, loss_fn=masked_loss)
    return optax.apply_updates(p, updates), s

  got, state = step(params, tx.init(params))
  assert got["n"].dtype == jnp.int32 and int(got["n"]) == 3
  float_loss = lambda w: _int_loss({"w": w, "n": params["n"]})
  want = reference.flat(params["w"]) - 0.05 * reference.flat(
      reference.sam_gradient(float_loss, params["w"], 0.1)
  )
  np.testing.assert_allclose(reference.flat(got["w"]), want, rtol=1e-6)
  inner = state.inner_state[0]
  assert int(inner.count) == 1 and float(inner.stats.pass_taken) == 1.0
