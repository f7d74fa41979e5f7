"""RWP and ESAM (random perturbations) against their papers' update rules.

The random draws are not reproduced here: each test records the point where
the transform evaluated the loss (``jax.debug.callback``), derives the
perturbation from it, and checks that perturbation's law and the update
computed from it in float64 NumPy.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax._transforms.esam import num_selected
from tests import problems
from tests.reference import flat, grad_at, unflatten


def _close(got, params, want_vector, rtol=1e-4, atol=1e-6):
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: np.asarray(x, np.float64), got),
      unflatten(params, want_vector), rtol=rtol, atol=atol,
  )


def _recording(fn, points):
  """``fn`` that also appends the point it is evaluated at to ``points``."""

  def wrapped(p):
    jax.debug.callback(lambda q: points.append(q), p)
    return fn(p)

  return wrapped


def _counting(fn, calls):
  def wrapped(p):
    jax.debug.callback(lambda: calls.append(1))
    return fn(p)

  return wrapped


def _leafwise_f64(a, b):
  return jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


# ------------------------------------------------------------------------ RWP
# The contract checks run over rwp too (`tests/contract.py`, CASES).


@pytest.mark.parametrize("gamma, alpha", [(0.05, 0.5), (0.2, 0.3), (0.1, 1.0)])
def test_rwp_matches_paper(gamma, alpha):
  params, loss_fn = problems.mlp_problem(seed=51)
  points = []
  tx = sam_optax.rwp(gamma, alpha, key=3)
  g = jax.grad(loss_fn)(params)
  update = jax.jit(
      lambda g, s, p: tx.update(g, s, p, grad_fn=_recording(jax.grad(loss_fn), points))
  )
  got, state = update(g, tx.init(params), params)
  jax.effects_barrier()
  (point,) = points
  # u = α ∇L(w + ε) + (1 − α) g, at the point where the gradient was taken.
  want = alpha * grad_at(loss_fn, params, flat(point)) + (1 - alpha) * flat(g)
  _close(got, params, want)
  eps = _leafwise_f64(point, params)
  assert all(np.all(e != 0) for e in jax.tree.leaves(eps))
  np.testing.assert_allclose(float(sam_optax.sam_stats(state).rho), gamma, rtol=1e-6)


def _rwp_noise_draws(params, gamma, steps, **kwargs):
  """ε of ``steps`` consecutive RWP steps, read off a quadratic's gradient.

  With ``L = ½‖w‖²`` and ``alpha = 1`` the update is ``∇L(w + ε) = w + ε``.
  """
  loss_fn = lambda p: 0.5 * sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(p))
  tx = sam_optax.rwp(gamma, alpha=1.0, **kwargs)
  step = jax.jit(lambda s: tx.update(params, s, params, loss_fn=loss_fn))
  state, draws = tx.init(params), []
  for _ in range(steps):
    u, state = step(state)
    draws.append(_leafwise_f64(u, params))
  return jax.tree.map(lambda *xs: np.stack(xs), *draws)


def _noise_params():
  rng = np.random.RandomState(5)
  dense = rng.randn(64, 16) * np.logspace(-1, 1, 16)[None, :]  # column norms 0.1x-10x
  conv = rng.randn(3, 3, 4, 8) * np.logspace(-1, 1, 8)
  rows = rng.randn(16, 64) * np.logspace(-1, 1, 16)[:, None]
  return {
      "dense": jnp.asarray(dense, jnp.float32),
      "conv": jnp.asarray(conv, jnp.float32),
      "rows": jnp.asarray(rows, jnp.float32),
      "bias": jnp.asarray(rng.randn(300), jnp.float32),
      "scale": jnp.asarray(2.0, jnp.float32),
  }


def _standardized_per_filter(eps, w, gamma, axis):
  """``ε / (γ ‖W_i‖)`` with the filters ``W_i`` the slices along ``axis``."""
  w = np.asarray(w, np.float64)
  others = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
  norms = np.sqrt(np.sum(w * w, axis=others, keepdims=True))
  return eps / (gamma * norms[None])


@pytest.mark.parametrize("filter_axis", ["last", "first"])
def test_rwp_noise_is_filterwise_gaussian(filter_axis):
  params, gamma, steps = _noise_params(), 0.1, 30
  draws = _rwp_noise_draws(params, gamma, steps, key=11, filter_axis=filter_axis)
  axis = -1 if filter_axis == "last" else 0
  for name in ("dense", "conv", "rows"):
    z = _standardized_per_filter(draws[name], params[name], gamma, axis)
    z = np.moveaxis(z, axis % z.ndim if axis < 0 else axis + 1, -1)
    z = z.reshape(-1, z.shape[-1])  # (draws, filters)
    # Every filter's noise is N(0, 1) after dividing by γ ‖W_i‖ (>= 576 draws each).
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=0.12)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=0.12)
  # 1-D and 0-D leaves: i.i.d. with std γ ‖w‖ (the whole leaf's norm).
  zb = draws["bias"] / (gamma * np.linalg.norm(np.asarray(params["bias"], np.float64)))
  np.testing.assert_allclose([zb.mean(), zb.std()], [0.0, 1.0], atol=0.05)
  zs = draws["scale"] / (gamma * 2.0)
  assert zs.shape == (steps,) and 0.5 < zs.std() < 1.6


def test_rwp_filter_axis_matters():
  # Filter norms taken along the wrong axis would not standardize the noise.
  params, gamma = _noise_params(), 0.1
  draws = _rwp_noise_draws(params, gamma, 10, key=12, filter_axis="last")
  z = _standardized_per_filter(draws["rows"], params["rows"], gamma, 0)
  stds = z.reshape(10, 16, 64).transpose(1, 0, 2).reshape(16, -1).std(axis=1)
  assert stds.max() / stds.min() > 10


def test_rwp_fresh_noise_every_step_and_reproducible_keys():
  params = {"dense": _noise_params()["dense"]}
  a = _rwp_noise_draws(params, 0.1, 3, key=0)
  assert not np.allclose(a["dense"][0], a["dense"][1])
  assert not np.allclose(a["dense"][1], a["dense"][2])
  # An int seed, its typed key and its legacy uint32 key give the same state.
  init_key = lambda key: np.asarray(sam_optax.rwp(key=key).init(params).variant.perturbation.key)
  for same in (jax.random.key(0), jax.random.PRNGKey(0), np.int32(0)):
    np.testing.assert_array_equal(init_key(same), init_key(0))
  b = _rwp_noise_draws(params, 0.1, 1, key=1)
  assert not np.allclose(a["dense"][0], b["dense"][0])
  c = _rwp_noise_draws(params, 0.1, 1, key=jax.random.key(0, impl="rbg"))
  assert np.all(np.isfinite(c["dense"])) and np.any(c["dense"] != 0)


def test_rwp_zero_gradient_still_perturbs():
  # Unlike SAM, the perturbation does not vanish with the gradient.
  params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
  loss_fn = lambda p: sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(p))
  tx = sam_optax.rwp(0.1, 0.5)
  grads = jax.grad(loss_fn)(params)
  u, state = jax.jit(lambda s: tx.update(grads, s, params, loss_fn=loss_fn))(tx.init(params))
  leaves = jax.tree.leaves(u)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
  assert any(bool(jnp.any(x != 0)) for x in leaves)
  assert all(bool(jnp.isfinite(x)) for x in sam_optax.sam_stats(state))


def test_rwp_gamma_schedule_at_zero_is_the_gradient_at_w():
  params, loss_fn = problems.mlp_problem(seed=52)
  calls = []
  tx = sam_optax.rwp(lambda t: jnp.where(t % 2 == 0, 0.0, 0.05), 0.5)
  grad_fn = _counting(jax.grad(loss_fn), calls)
  step = jax.jit(lambda g, s: tx.update(g, s, params, grad_fn=grad_fn))
  g = jax.grad(loss_fn)(params)
  s = tx.init(params)
  for t in range(6):
    u, s = step(g, s)
    jax.effects_barrier()
    assert float(sam_optax.sam_stats(s).pass_taken) == t % 2
    if t % 2 == 0:  # no noise at gamma = 0: the gradient at w itself
      chex.assert_trees_all_close(u, g, rtol=1e-6, atol=1e-8)
  assert len(calls) == 6  # one pass per step: no conditional around it


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": -0.1}, r"`rwp`: `gamma` must lie in \[0, inf\); got gamma=-0.1"),
        ({"alpha": 1.5}, r"`rwp`: `alpha` must lie in \[0, 1\]; got alpha=1.5"),
        ({"key": -1}, r"`rwp`: `key` must be a non-negative int seed or a JAX PRNG key"),
        ({"key": 0.5}, r"`key`.*got key=0.5"),
        ({"key": jnp.zeros(3)}, r"`key`"),
        ({"filter_axis": 0}, r"`rwp`: `filter_axis` must be \"last\".*got filter_axis=0"),
    ],
)
def test_rwp_invalid_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sam_optax.rwp(**kwargs)


# ----------------------------------------------------------------------- ESAM


def per_example_loss(params, batch):
  """The cross-entropy of each example under ``problems.mlp_loss``'s model."""
  x, y = batch
  h = jnp.tanh(x @ params["layer1"]["w"] + params["layer1"]["b"])
  w2, b2 = params["layer2"]
  logits = ((h @ w2 + b2) * params["temperature"]).astype(jnp.float32)
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def _esam_problem(seed=61, n=20, dtype=jnp.float32):
  params = problems.mlp_params(seed, dtype)
  batch = problems.mlp_batch(seed + 1, n=n, dtype=dtype)
  return params, batch, (lambda p: per_example_loss(p, batch))


def _esam_step(tx, params, losses_fn, clean_losses=True):
  g = jax.grad(lambda p: losses_fn(p).mean())(params)
  extra = {"clean_losses": losses_fn(params)} if clean_losses else {}
  out = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=losses_fn, **extra))(
      g, tx.init(params), params
  )
  jax.effects_barrier()
  return g, out


def _reference_esam(params, batch, g, point, rho, beta, gamma):
  """(ε check, selected set S, SDS gradient) from the paper, given the point."""
  eps_leaves = jax.tree.leaves(_leafwise_f64(point, params))
  kept = [bool(np.any(e != 0)) for e in eps_leaves]
  gm = np.concatenate([np.ravel(np.asarray(gl, np.float64)) * k for gl, k in zip(jax.tree.leaves(g), kept)])
  norm = np.linalg.norm(gm)
  want_eps = rho / beta * gm / norm if norm > 0 else np.zeros_like(gm)
  np.testing.assert_allclose(np.concatenate([np.ravel(e) for e in eps_leaves]), want_eps, rtol=1e-4, atol=1e-6)
  after = np.asarray(per_example_loss(point, batch), np.float64)
  before = np.asarray(per_example_loss(params, batch), np.float64)
  sharpness = after - before
  order = np.argsort(-sharpness, kind="stable")
  k = int(np.ceil(gamma * len(sharpness) - 1e-9))
  if k < len(sharpness):  # the test data must not sit on a tie
    assert sharpness[order[k - 1]] - sharpness[order[k]] > 1e-6
  selected = np.sort(order[:k])
  x, y = batch
  sub = (x[selected], y[selected])
  want = flat(jax.grad(lambda p: per_example_loss(p, sub).mean())(point))
  return kept, selected, want, after[selected].mean()


@pytest.mark.parametrize("rho, beta, gamma", [(0.3, 0.5, 0.3), (0.5, 0.6, 0.5), (0.2, 1.0, 0.75)])
def test_esam_matches_paper(rho, beta, gamma):
  params, batch, losses_fn = _esam_problem()
  tx = sam_optax.esam(rho, beta, gamma, key=5)
  points, masks = [], []
  loss_fn = _recording(losses_fn, points)
  g = jax.grad(lambda p: losses_fn(p).mean())(params)
  clean = losses_fn(params)
  step = jax.jit(lambda s: tx.update(g, s, params, loss_fn=loss_fn, clean_losses=clean))
  state = tx.init(params)
  for _ in range(6):  # the same weights, a fresh mask at every step
    points.clear()
    got, state = step(state)
    jax.effects_barrier()
    (point,) = points
    kept, _, want, selected_loss = _reference_esam(params, batch, g, point, rho, beta, gamma)
    _close(got, params, want)
    np.testing.assert_allclose(float(sam_optax.sam_stats(state).perturbed_loss), selected_loss, rtol=1e-5)
    masks.append(kept)
  masks = np.asarray(masks)
  if beta < 1:  # whole tensors are dropped, at random
    assert 0 < masks.mean() < 1 and len({tuple(m) for m in masks}) > 1
  else:
    assert masks.all()


def test_esam_unselected_examples_have_no_influence():
  params, batch, losses_fn = _esam_problem(seed=63, n=16)
  x, y = batch
  g = jax.grad(lambda p: losses_fn(p).mean())(params)
  # Huge clean losses make examples 8..15 the least sharp: with gamma = 0.5,
  # exactly examples 0..7 are selected.
  suppressed = np.arange(16) >= 8
  clean = jnp.where(suppressed, 1e4, losses_fn(params))
  tx = sam_optax.esam(0.3, 0.5, 0.5, key=4)

  @jax.jit
  def run(xb, yb):
    fn = lambda p: per_example_loss(p, (xb, yb))
    return tx.update(g, tx.init(params), params, loss_fn=fn, clean_losses=clean)[0]

  base = run(x, y)
  rng = np.random.RandomState(0)
  x2 = jnp.where(suppressed[:, None], 50.0 * jnp.asarray(rng.randn(16, 5), x.dtype), x)
  y2 = jnp.where(suppressed, (y + 1) % 3, y)
  chex.assert_trees_all_close(run(x2, y2), base, rtol=1e-6, atol=1e-7)
  # The selected examples do matter.
  x3 = x.at[0].multiply(3.0)
  assert not np.allclose(flat(run(x3, y)), flat(base))
  # And the result is the gradient over examples 0..7 alone, at the same point.
  points = []
  fn = _recording(lambda p: per_example_loss(p, (x, y)), points)
  jax.jit(lambda s: tx.update(g, s, params, loss_fn=fn, clean_losses=clean))(tx.init(params))
  jax.effects_barrier()
  want = flat(jax.grad(lambda p: per_example_loss(p, (x[:8], y[:8])).mean())(points[0]))
  _close(base, params, want)


def test_esam_clean_losses_are_recomputed_when_not_passed():
  params, _, losses_fn = _esam_problem(seed=64)
  tx = sam_optax.esam(0.3, 0.5, 0.5, key=2)
  g = jax.grad(lambda p: losses_fn(p).mean())(params)

  def run(**extra):
    calls = []
    fn = _counting(losses_fn, calls)
    u, _ = jax.jit(lambda s: tx.update(g, s, params, loss_fn=fn, **extra))(tx.init(params))
    jax.effects_barrier()
    return u, len(calls)

  a, with_clean = run(clean_losses=losses_fn(params))
  b, without = run()
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)
  # One forward at w + ε; one more at w when `clean_losses` is not passed.
  assert (with_clean, without) == (1, 2)


def test_esam_with_beta_and_gamma_one_is_sam():
  params, _, losses_fn = _esam_problem(seed=65)
  _, (a, _) = _esam_step(sam_optax.esam(0.2, 1.0, 1.0), params, losses_fn)
  mean_loss = lambda p: losses_fn(p).mean()
  sam = sam_optax.sam(0.2)
  b, _ = sam.update(jax.grad(mean_loss)(params), sam.init(params), params, loss_fn=mean_loss)
  chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7)


def test_esam_mask_is_per_leaf_with_probability_beta():
  # With L = ½‖w‖² and grad_fn (no data selection), the update is w + ε.
  rng = np.random.RandomState(7)
  params = [jnp.asarray(rng.randn(5), jnp.float32) for _ in range(40)]
  grad_fn = lambda p: p
  rho, beta = 0.5, 0.3
  tx = sam_optax.esam(rho, beta, key=9)
  step = jax.jit(lambda s: tx.update(params, s, params, grad_fn=grad_fn))
  state, kept = tx.init(params), []
  for _ in range(25):
    u, state = step(state)
    eps = _leafwise_f64(u, params)
    k = np.array([np.all(e != 0) for e in eps])
    assert all(np.all(e != 0) or np.all(e == 0) for e in eps)  # whole leaves
    kept.append(k)
    if k.any():
      np.testing.assert_allclose(np.sqrt(sum(np.sum(e * e) for e in eps)), rho / beta, rtol=1e-4)
  assert abs(np.mean(kept) - beta) < 0.05


@pytest.mark.parametrize(
    "gamma, batch, k", [(0.5, 32, 16), (0.3, 10, 3), (0.01, 10, 1), (1.0, 7, 7), (0.34, 3, 2), (0.7, 10, 7)]
)
def test_esam_number_of_selected_examples(gamma, batch, k):
  assert int(num_selected(gamma, batch)) == k


def test_esam_gamma_can_be_injected():
  params, _, losses_fn = _esam_problem(seed=66)
  injected = optax.inject_hyperparams(sam_optax.esam)(rho=0.3, beta=0.5, gamma=0.25, key=1)
  plain = sam_optax.esam(0.3, 0.5, 0.25, key=1)
  _, (a, sa) = _esam_step(injected, params, losses_fn)
  _, (b, _) = _esam_step(plain, params, losses_fn)
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)
  assert set(sa.hyperparams) == {"rho", "beta", "gamma", "key", "eps"}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_esam_per_example_losses_keep_dtypes(dtype):
  params, _, losses_fn = _esam_problem(seed=67, dtype=dtype)
  tx = optax.chain(sam_optax.esam(0.1, 0.5, 0.5), optax.adam(1e-3))
  _, (u, s) = _esam_step(tx, params, losses_fn)
  dtypes = lambda t: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), t)
  assert dtypes(u) == dtypes(params)
  assert dtypes(s) == dtypes(tx.init(params))


def test_esam_bad_per_example_losses():
  params, _, losses_fn = _esam_problem(seed=68)
  tx = sam_optax.esam(0.1)
  g = jax.grad(lambda p: losses_fn(p).mean())(params)
  with pytest.raises(TypeError, match=r"`esam`: `loss_fn` must return a vector of per-example losses"):
    tx.update(g, tx.init(params), params, loss_fn=lambda p: jnp.stack([losses_fn(p)] * 2, 1))
  with pytest.raises(ValueError, match=r"`esam`: `clean_losses` must have the shape.*\(20,\); got \(3,\)"):
    tx.update(g, tx.init(params), params, loss_fn=losses_fn, clean_losses=jnp.zeros(3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": -0.1}, r"`esam`: `rho` must lie in \[0, inf\); got rho=-0.1"),
        ({"beta": 0.0}, r"`esam`: `beta` must lie in \(0, 1\]; got beta=0.0"),
        ({"gamma": 1.5}, r"`esam`: `gamma` must lie in \(0, 1\]; got gamma=1.5"),
        ({"key": True}, r"`esam`: `key` must be"),
    ],
)
def test_esam_invalid_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sam_optax.esam(**kwargs)
