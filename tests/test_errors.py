"""Misuse gets an error that names the argument and the fix."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import sam_optax
from tests import problems


def _setup():
  params, loss_fn = problems.mlp_problem()
  tx = sam_optax.sam(0.05)
  return params, loss_fn, tx, tx.init(params), jax.grad(loss_fn)(params)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": -0.1}, r"`rho` must lie in \[0, inf\); got rho=-0.1"),
        ({"rho": float("nan")}, r"`rho` must be a number, got rho=nan"),
        ({"rho": "0.1"}, r'`rho` must be a number, a schedule, "auto"'),
        ({"rho": jnp.ones(2)}, r"`rho` must be a real number or a schedule"),
        ({"eps": 0.0}, r"`eps` must lie in \(0, inf\); got eps=0.0"),
        ({"eps": -1e-3}, r"`eps`"),
        ({"eps": lambda t: 1e-12}, r"`eps` must be a number, not a schedule"),
        ({"rho": True}, r"`rho` must be a real number or a schedule, got rho=True"),
        ({"rho": float("inf")}, r"`rho` must be finite; got rho=inf"),
        ({"rho": 1 + 2j}, r"`rho` must be a real number or a schedule"),
        ({"rho": jnp.asarray(1 + 2j)}, r"`rho` must be a real number"),
    ],
)
def test_invalid_hyperparameters_raise_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sam_optax.sam(**kwargs)


def test_valid_edge_hyperparameters_are_accepted():
  sam_optax.sam(0)
  sam_optax.sam(jnp.asarray(0.1))
  sam_optax.sam(optax.constant_schedule(0.1))


def test_missing_closure_shows_the_call():
  params, _, tx, state, grads = _setup()
  with pytest.raises(TypeError) as info:
    tx.update(grads, state, params)
  message = str(info.value)
  assert "`sam`" in message and "`loss_fn`" in message and "`grad_fn`" in message
  assert "tx.update(grads, opt_state, params, loss_fn=loss_fn)" in message


def test_missing_params():
  _, loss_fn, tx, state, grads = _setup()
  with pytest.raises(ValueError, match=r"needs the current parameters"):
    tx.update(grads, state, None, loss_fn=loss_fn)


def test_both_closures_rejected():
  params, loss_fn, tx, state, grads = _setup()
  with pytest.raises(ValueError, match=r"either `loss_fn` or `grad_fn`"):
    tx.update(grads, state, params, loss_fn=loss_fn, grad_fn=jax.grad(loss_fn))


def test_non_callable_closure():
  params, _, tx, state, grads = _setup()
  with pytest.raises(TypeError, match=r"`loss_fn` must be callable"):
    tx.update(grads, state, params, loss_fn=1.0)


def test_non_scalar_loss():
  params, loss_fn, tx, state, grads = _setup()
  x, y = problems.mlp_batch()

  def per_example(p):
    return jnp.ones(x.shape[0]) * loss_fn(p)

  with pytest.raises(TypeError, match=r"scalar loss.*shape \(32,\).*\.mean\(\)"):
    tx.update(grads, state, params, loss_fn=per_example)


def test_loss_returning_three_values():
  params, loss_fn, tx, state, grads = _setup()
  with pytest.raises(TypeError, match=r"length 3"):
    tx.update(grads, state, params, loss_fn=lambda p: (loss_fn(p), 1, 2))


def test_integer_loss():
  params, _, tx, state, grads = _setup()
  with pytest.raises(TypeError, match=r"floating-point loss"):
    tx.update(grads, state, params, loss_fn=lambda p: jnp.asarray(1))


def test_grad_fn_with_wrong_structure_shows_both_trees():
  params, loss_fn, tx, state, grads = _setup()
  bad = lambda p: jax.grad(loss_fn)(p)["layer1"]
  with pytest.raises(ValueError) as info:
    tx.update(grads, state, params, grad_fn=bad)
  message = str(info.value)
  assert "output of `grad_fn`" in message and "tree structure" in message
  assert "layer2" in message  # the params tree is shown


def test_grad_fn_with_wrong_shape_names_the_leaf():
  params, loss_fn, tx, state, grads = _setup()

  def bad(p):
    g = jax.grad(loss_fn)(p)
    g["layer1"]["b"] = jnp.zeros(7)
    return g

  with pytest.raises(ValueError, match=r"shape \(7,\) at \"\['layer1'\]\['b'\]\""):
    tx.update(grads, state, params, grad_fn=bad)


def test_updates_not_matching_params():
  params, loss_fn, tx, state, grads = _setup()
  with pytest.raises(ValueError, match=r"`updates` \(the clean gradient\) does not have the tree structure"):
    tx.update(grads["layer1"], state, params, loss_fn=loss_fn)


def test_with_sam_rejects_non_optimizer():
  with pytest.raises(TypeError, match=r"`optimizer` must be an optax"):
    sam_optax.with_sam(0.1)


def test_schedule_of_the_wrong_arity_is_named_at_construction():
  with pytest.raises(TypeError, match=r"`sam`: a `rho` schedule must take one argument"):
    sam_optax.sam(lambda: 0.05)
  with pytest.raises(TypeError, match=r"`gsam`: a `rho` schedule"):
    sam_optax.gsam(lambda count, total: 0.05)
  sam_optax.sam(lambda count, scale=1.0: 0.05 * scale)  # defaults are fine


def test_negative_scheduled_rho_is_zero_and_recorded_so():
  params, loss_fn, _, _, grads = _setup()
  tx = sam_optax.sam(lambda count: -0.1)
  out, state = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))(
      grads, tx.init(params), params
  )
  # ρ = 0: the gradient at w itself, no SAM step
  chex.assert_trees_all_close(out, grads, rtol=1e-6, atol=1e-7)
  stats = sam_optax.sam_stats(state)
  assert float(stats.rho) == 0.0 and float(stats.pass_taken) == 0.0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: sam_optax.sam(eps=0.0), r"^`sam`: `eps`"),
        (lambda: sam_optax.asam(eta=-1.0), r"^`asam`: `eta`"),
        (lambda: sam_optax.asam(eta=0.0), r"^`asam`: `eta` must lie in \(0, inf\); got eta=0.0"),
        (lambda: sam_optax.looksam(k=0), r"^`looksam`: `k`"),
        (lambda: sam_optax.rwp(alpha=2.0), r"^`rwp`: `alpha`"),
        (lambda: sam_optax.ae_sam(total_steps=10, delta=1.0), r"^`ae_sam`: `delta`"),
        (lambda: sam_optax.fisher_masked_sam(sparsity=1.5), r"^`fisher_masked_sam`: `sparsity` must lie in \[0, 1\]"),
        # a part called directly names itself
        (lambda: sam_optax.perturbations.adaptive(eta=-1.0), r"^`adaptive`: `eta`"),
        (lambda: sam_optax.policies.every(0), r"^`every`: `k`"),
    ],
)
def test_errors_name_the_function_the_user_called(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_adaptive_policy_needs_the_run_length():
  with pytest.raises(TypeError, match=r"total_steps"):
    sam_optax.policies.adaptive()  # pylint: disable=missing-kwoa


def test_loss_returning_a_dict_asks_for_a_pair():
  params, loss_fn, tx, state, grads = _setup()
  with pytest.raises(TypeError, match=r"`sam`: `loss_fn` must return a scalar loss or a `\(loss, aux\)` pair, but it returned a dict"):
    tx.update(grads, state, params, loss_fn=lambda p: {"loss": loss_fn(p)})


def test_axis_name_outside_a_mapped_context():
  params, loss_fn, _, _, grads = _setup()
  tx = sam_optax.sam(0.05, axis_name="batch")
  with pytest.raises(ValueError, match=r"`sam`: `axis_name='batch'` names an axis that is not bound.*shard_map"):
    tx.update(grads, tx.init(params), params, loss_fn=loss_fn)


def test_nan_without_a_lower_bound_is_called_nan():
  with pytest.raises(ValueError, match=r"`lambda_start` must be a number, got lambda_start=nan"):
    sam_optax.ae_sam(lambda_start=float("nan"), total_steps=10)


def test_msam_rejects_integer_leaves_at_init():
  with pytest.raises(ValueError, match=r"`msam`: `params` has a leaf of dtype int32"):
    sam_optax.msam(optax.sgd(0.1, momentum=0.9)).init(
        {"w": jnp.ones(2), "n": jnp.asarray(1, jnp.int32)}
    )
