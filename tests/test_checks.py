"""Mistakes that run silently unless looked for, and the checks that find them.

Each test first reproduces the mistake as it behaves without the checks
(no error; the run is quietly wrong), then shows the check naming it. The
figures a check reports are compared with float64 numpy computations of the
same two gradients, taken here independently of the transform.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems, reference

RHO, LR = 0.05, 0.1


def _loss_of(batch):
  return lambda p: problems.mlp_loss(p, batch)


def _figures(u, g):
  """cosine, norm ratio and relative difference of two gradients, in float64."""
  u, g = reference.flat(u), reference.flat(g)
  ng = np.linalg.norm(g)
  return (
      float(u @ g / (np.linalg.norm(u) * ng)),
      float(np.linalg.norm(u) / ng),
      float(np.linalg.norm(u - g) / ng),
  )


def _train(tx, steps, params, loss_fn):
  step = jax.jit(
      lambda p, s: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(
          tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
      )
  )
  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params


# ------------------------------------------------------------- chain order


def test_base_optimizer_before_sam_runs_silently_and_diverges():
  params, loss_fn = problems.mlp_problem(seed=0)
  wrong = optax.chain(optax.sgd(LR), sam_optax.sam(RHO))  # base first
  right = optax.chain(sam_optax.sam(RHO), optax.sgd(LR))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing is said without the checks
    worse = loss_fn(_train(wrong, 30, params, loss_fn))
  better = loss_fn(_train(right, 30, params, loss_fn))
  start = float(loss_fn(params))
  assert not float(worse) <= start  # larger, or already NaN
  assert float(better) < start


def test_check_step_names_the_chain_order():
  params, loss_fn = problems.mlp_problem(seed=0)
  tx = optax.chain(optax.sgd(LR), sam_optax.sam(RHO))
  grads = jax.grad(loss_fn)(params)
  with pytest.raises(ValueError) as err:
    sam_optax.check_step(tx, grads, tx.init(params), params, loss_fn=loss_fn)
  message = str(err.value)
  assert "points against it" in message
  assert "optax.chain(sam_optax.sam(...), optax.sgd(lr))" in message
  # The figures are those of the sgd output -LR*g against g.
  cosine = float(re.search(r"cosine (-?[\d.]+)", message).group(1))
  ratio = float(re.search(r"norm ratio ([\d.e-]+)", message).group(1))
  assert cosine == pytest.approx(-1.0, abs=1e-3)
  assert ratio == pytest.approx(LR, rel=1e-3)


def test_debug_checks_warn_once_in_a_jitted_loop():
  params, loss_fn = problems.mlp_problem(seed=1)
  tx = optax.chain(optax.sgd(LR), sam_optax.sam(RHO))
  with sam_optax.debug_checks():
    with pytest.warns(sam_optax.SetupWarning, match="points against it") as record:
      _train(tx, 3, params, loss_fn)
      jax.effects_barrier()
  assert len([w for w in record if w.category is sam_optax.SetupWarning]) == 1


# ----------------------------------------------------- agreeing setups pass


@pytest.mark.parametrize(
    "make",
    [
        lambda: sam_optax.sam(RHO),
        lambda: sam_optax.sam("auto"),
        lambda: sam_optax.asam(0.5),
        lambda: sam_optax.gsam(RHO, alpha=0.1),
        lambda: sam_optax.looksam(RHO, k=2),
        lambda: sam_optax.vasso(RHO),
        lambda: sam_optax.friendly_sam(RHO),
        lambda: sam_optax.esam(RHO),
        lambda: sam_optax.rwp(gamma=0.01, key=0),
    ],
    ids=["sam", "auto", "asam", "gsam", "looksam", "vasso", "friendly", "esam", "rwp"],
)
def test_a_correct_step_passes_and_reports_the_independent_figures(make):
  params, loss_fn = problems.mlp_problem(seed=2)
  tx = optax.chain(make(), optax.sgd(LR))
  grads = jax.grad(loss_fn)(params)
  found = sam_optax.check_step(tx, grads, tx.init(params), params, loss_fn=loss_fn)
  assert len(found) == 1 and found[0].ok
  cosine, ratio, rel = _figures(grads, jax.grad(loss_fn)(params))
  assert found[0].cosine == pytest.approx(cosine, abs=1e-5)
  assert found[0].norm_ratio == pytest.approx(ratio, abs=1e-5)
  assert found[0].relative_difference == pytest.approx(rel, abs=1e-5)


def test_a_loss_scale_passed_as_such_is_no_mismatch():
  params, loss_fn = problems.mlp_problem(seed=3)
  scale = 1024.0
  scaled = lambda p: scale * loss_fn(p)
  tx = optax.chain(sam_optax.sam(RHO), optax.sgd(LR))
  grads = jax.grad(scaled)(params)
  found = sam_optax.check_step(
      tx, grads, tx.init(params), params, loss_fn=scaled, loss_scale=scale
  )
  assert found[0].ok


def test_per_device_steps_compare_each_members_own_gradients():
  params = problems.mlp_params(seed=4)
  batches = [problems.mlp_batch(20 + i) for i in range(2)]
  xs = jnp.stack([b[0] for b in batches])
  ys = jnp.stack([b[1] for b in batches])
  tx = sam_optax.sam(RHO, axis_name="d")
  state = tx.init(params)

  def member(x, y, shift):
    loss_fn = _loss_of((x, y))
    closure = _loss_of((x + shift, y))  # member 1's closure is off
    return tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=closure)

  with pytest.raises(ValueError, match="another batch") as err:
    sam_optax.check_step(
        optax.GradientTransformationExtraArgs(
            tx.init,
            lambda g, s, p, **kw: jax.vmap(member, axis_name="d")(
                xs, ys, jnp.asarray([0.0, 1.0])
            ),
        ),
        None,
        None,
        params,
    )
  assert err.value.args[0].count("another batch") == 1  # member 0 agrees


# ---------------------------------------- closure on another batch / scale


def test_closure_on_another_batch_is_named():
  params = problems.mlp_params(seed=5)
  clean, other = problems.mlp_batch(1), problems.mlp_batch(2)
  tx = optax.chain(sam_optax.sam(RHO), optax.sgd(LR))
  grads = jax.grad(_loss_of(clean))(params)
  state = tx.init(params)
  # Without the check: runs and returns a finite update.
  updates, _ = tx.update(grads, state, params, loss_fn=_loss_of(other))
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  with pytest.raises(ValueError, match=r"(?s)does not compute the loss.*another batch"):
    sam_optax.check_step(tx, grads, state, params, loss_fn=_loss_of(other))


def test_a_rescaled_gradient_is_named_as_such():
  params, loss_fn = problems.mlp_problem(seed=6)
  tx = optax.chain(optax.scale(0.5), sam_optax.sam(RHO), optax.sgd(LR))
  grads = jax.grad(loss_fn)(params)
  with pytest.raises(ValueError, match="Same direction, another scale") as err:
    sam_optax.check_step(tx, grads, tx.init(params), params, loss_fn=loss_fn)
  assert "norm ratio 0.5" in str(err.value)


def test_the_tolerance_is_the_callers():
  params = problems.mlp_params(seed=7)
  x, y = problems.mlp_batch(1)
  nudged = _loss_of((x + 1e-3, y))  # a closure a hair away from the clean loss
  grads = jax.grad(_loss_of((x, y)))(params)
  tx = optax.chain(sam_optax.sam(RHO), optax.sgd(LR))
  rel = _figures(grads, jax.grad(nudged)(params))[2]
  assert 0 < rel < 1e-2
  sam_optax.check_step(tx, grads, tx.init(params), params, loss_fn=nudged)
  with pytest.raises(ValueError, match="does not compute the loss"):
    sam_optax.check_step(
        tx, grads, tx.init(params), params, loss_fn=nudged, rtol=rel / 2
    )
  with pytest.raises(ValueError, match="`rtol` must be a positive number"):
    sam_optax.check_step(tx, grads, tx.init(params), params, loss_fn=nudged, rtol=0)


def test_a_non_finite_gradient_is_reported_not_compared():
  params, loss_fn = problems.mlp_problem(seed=8)
  tx = optax.chain(sam_optax.sam(RHO), optax.sgd(LR))
  grads = jax.tree.map(lambda g: g * jnp.nan, jax.grad(loss_fn)(params))
  with pytest.raises(ValueError, match="not finite"):
    sam_optax.check_step(tx, grads, tx.init(params), params, loss_fn=loss_fn)


def test_nothing_to_check_is_an_error():
  params, loss_fn = problems.mlp_problem(seed=9)
  tx = optax.sgd(LR)
  with pytest.raises(ValueError, match="no sharpness-aware transform"):
    sam_optax.check_step(
        tx, jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn
    )


# ------------------------------------------------- zero cost when they are off


def _compiled_text(tx, params, loss_fn):
  def step(p, s):
    return tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)

  return jax.jit(step).lower(params, tx.init(params)).as_text()


def test_the_check_is_compiled_only_while_on():
  params, loss_fn = problems.mlp_problem(seed=10)
  tx = optax.chain(sam_optax.sam(RHO), optax.sgd(LR))
  off = _compiled_text(tx, params, loss_fn)
  with sam_optax.debug_checks():
    on = _compiled_text(tx, params, loss_fn)
  after = _compiled_text(tx, params, loss_fn)
  callback = "callback"
  assert callback not in off and callback in on
  assert after == off  # the context manager restored the setting
  sam_optax.debug_checks(True)  # the call form turns it on for the session
  try:
    assert callback in _compiled_text(tx, params, loss_fn)
  finally:
    sam_optax.debug_checks(False)
  assert callback not in _compiled_text(tx, params, loss_fn)
  with pytest.raises(TypeError, match="`enabled` must be True or False"):
    sam_optax.debug_checks("yes")


def test_the_environment_variable_turns_the_checks_on():
  code = textwrap.dedent(
      """
      import warnings, jax, optax, sam_optax
      from tests import problems
      params, loss_fn = problems.mlp_problem(seed=0)
      tx = optax.chain(optax.sgd(0.1), sam_optax.sam(0.05))
      with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tx.update(jax.grad(loss_fn)(params), tx.init(params), params,
                  loss_fn=loss_fn)
        jax.effects_barrier()
      print(sum(x.category is sam_optax.SetupWarning for x in w))
      """
  )
  for value, want in (("1", "1"), ("0", "0")):
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "SAM_OPTAX_CHECKS": value,
             "JAX_PLATFORMS": "cpu"},
    )
    assert out.stdout.strip().splitlines()[-1] == want


# ------------------------------------------------------------- Flax models


flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402
import flax.linen as nn  # noqa: E402

_as_pure = getattr(nnx, "as_pure", None) or nnx.pure


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


def _linen_setup():
  x, y = problems.mlp_batch(3)
  variables = _Net().init(jax.random.key(0), x, train=False)
  return x, y, variables["params"], {"batch_stats": variables["batch_stats"]}


def _linen_loss(params, model_state, x, y, key, train=True):
  logits, _ = _Net().apply(
      {"params": params, **model_state}, x, train=train,
      rngs={"dropout": key}, mutable=["batch_stats"],
  )
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_linen_closure_with_other_dropout_keys_is_named():
  x, y, params, model_state = _linen_setup()
  tx = optax.chain(sam_optax.sam(RHO), optax.sgd(LR))
  clean_key, other_key = jax.random.key(1), jax.random.key(2)
  grads = jax.grad(_linen_loss)(params, model_state, x, y, clean_key)
  right = lambda p: _linen_loss(p, model_state, x, y, clean_key)
  wrong = lambda p: _linen_loss(p, model_state, x, y, other_key)
  assert sam_optax.check_step(tx, grads, tx.init(params), params, loss_fn=right)[0].ok
  with pytest.raises(ValueError, match=r"(?s)does not compute the loss.*dropout keys"):
    sam_optax.check_step(tx, grads, tx.init(params), params, loss_fn=wrong)


def test_linen_closure_with_batchnorm_in_eval_mode_is_named():
  x, y, params, model_state = _linen_setup()
  key = jax.random.key(1)

  def loss(p, train):  # no dropout here: the BatchNorm mode alone differs
    logits, _ = _Net().apply(
        {"params": p, **model_state}, x, train=train, rngs={"dropout": key},
        mutable=["batch_stats"],
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx = optax.chain(sam_optax.sam(RHO), optax.sgd(LR))
  grads = jax.grad(loss)(params, True)
  with pytest.raises(ValueError, match="BatchNorm in another mode"):
    sam_optax.check_step(
        tx, grads, tx.init(params), params, loss_fn=lambda p: loss(p, False)
    )


class _NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(5, 16, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(nnx.relu(self.linear(x))))


def _nnx_loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _nnx_step(closure_first: bool):
  @nnx.jit
  def step(model, optimizer, x, y):
    def closure_now():
      graphdef, _, rest = nnx.split(model, nnx.Param, ...)
      rest = _as_pure(rest)  # a snapshot of the RNG state now
      return lambda p: _nnx_loss(nnx.merge(graphdef, p, rest), x, y)

    closure = closure_now() if closure_first else None
    grads = nnx.grad(_nnx_loss)(model, x, y)  # draws a dropout mask
    if closure is None:  # built after the clean pass: the next mask
      closure = closure_now()
    optimizer.update(model, grads, loss_fn=closure)

  return step


def test_nnx_closure_built_after_the_clean_pass_is_named():
  x, y = problems.mlp_batch(4, n=16)
  tx = optax.chain(sam_optax.sam(RHO), optax.sgd(LR))
  # Built before the clean pass: both passes draw the same mask, no warning.
  model = _NNXNet(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  with sam_optax.debug_checks(), warnings.catch_warnings():
    warnings.simplefilter("error", sam_optax.SetupWarning)
    _nnx_step(closure_first=True)(model, optimizer, x, y)
    jax.effects_barrier()
  # Built after it: silent without the checks, named with them.
  model = _NNXNet(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  with warnings.catch_warnings():
    warnings.simplefilter("error", sam_optax.SetupWarning)
    _nnx_step(closure_first=False)(model, optimizer, x, y)
    jax.effects_barrier()
  model = _NNXNet(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  with sam_optax.debug_checks():
    with pytest.warns(sam_optax.SetupWarning, match=r"(?s)dropout keys.*\*before\*"):
      _nnx_step(closure_first=False)(model, optimizer, x, y)
      jax.effects_barrier()


def test_nnx_optimizer_update_without_the_closure_shows_where_it_goes():
  model = _NNXNet(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(
      model, optax.chain(sam_optax.sam(RHO), optax.sgd(LR)), wrt=nnx.Param
  )
  x, y = problems.mlp_batch(4, n=16)
  grads = nnx.grad(_nnx_loss)(model, x, y)
  with pytest.raises(TypeError, match=r"(?s)nnx.Optimizer.update.*optimizer\.update\("
                     r"model, grads, loss_fn=closure\)"):
    optimizer.update(model, grads)


# -------------------------------------------- integer leaves, at init time


def _int_params():
  return {"w": jnp.linspace(-1.0, 1.0, 4), "n": jnp.asarray(3, jnp.int32)}


def _int_loss(p):
  return jnp.sum((p["w"] - 0.5) ** 2) * p["n"].astype(jnp.float32)


def test_integer_leaves_are_rejected_at_init():
  tx = optax.chain(sam_optax.sam(RHO), optax.sgd(LR))
  with pytest.raises(ValueError, match=r"`params` has a leaf of dtype int32 at \"\['n'\]\""):
    tx.init(_int_params())
  with pytest.raises(ValueError, match="dtype bool"):
    sam_optax.asam(0.5).init({"w": jnp.ones(2), "on": jnp.asarray(True)})


def test_the_masked_recipe_in_the_error_runs_as_printed():
  params = _int_params()
  with pytest.raises(ValueError) as err:
    sam_optax.sam(RHO).init(params)
  message = str(err.value)
  code = textwrap.dedent(message[message.index("    mask = "):])
  tx = optax.chain(sam_optax.sam(RHO), optax.sgd(LR))
  grads = jax.grad(_int_loss, allow_int=True)(params)
  grads = jax.tree.map(  # float0 for the integer leaf: a zero update there
      lambda g, x: jnp.zeros_like(x) if g.dtype == jax.dtypes.float0 else g,
      grads, params,
  )
  namespace = dict(jax=jax, jnp=jnp, optax=optax, tx=tx, params=params,
                   loss_fn=_int_loss, grads=grads)
  build, update = code.split("updates, opt_state = ")
  exec(build, namespace)  # noqa: S102  (the masked tx and the closure)
  namespace["opt_state"] = namespace["tx"].init(params)
  exec("updates, opt_state = " + update, namespace)  # noqa: S102
  got = optax.apply_updates(params, namespace["updates"])
  float_loss = lambda w: _int_loss({"w": w, "n": params["n"]})
  want = reference.flat(params["w"]) - LR * reference.flat(
      reference.sam_gradient(float_loss, params["w"], RHO)
  )
  np.testing.assert_allclose(reference.flat(got["w"]), want, rtol=1e-6)
  assert int(got["n"]) == 3


def test_vmapped_steps_report_each_member():
  # Under vmap the first-step conditional becomes a select: each member of
  # the batch is checked and reported on its own.
  params, loss_fn = problems.mlp_problem(seed=11)
  tx = optax.chain(optax.sgd(LR), sam_optax.sam(RHO))
  states = jax.vmap(lambda _: tx.init(params))(jnp.arange(3))

  def member(state):
    return tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)

  with sam_optax.debug_checks(), warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    jax.vmap(member)(states)
    jax.effects_barrier()
  found = [w for w in record if w.category is sam_optax.SetupWarning]
  assert len(found) == 3 and all("points against it" in str(w.message) for w in found)


def test_flax_subpackage_is_listed_without_being_imported():
  assert "flax" in dir(sam_optax) and "check_step" in dir(sam_optax)
