"""bSAM against a float64 transcription of the authors' ``build_bsam_optimizer``.

Transcribed from team-approx-bayes/bayesian-sam (commit 936eec1, 2023):
``optim.py`` (``build_bsam_optimizer``: ``init``, ``_bsam_gradient``,
``step``), ``util.py`` (``normal_like_tree``, ``ece``), ``train.py``
(``wdecay = priorprec / ndata``, ``ndata *= dafactor``, the learning-rate
factor) and ``test.py`` (posterior samples for the model average), with
``msharpness = 1`` (one group: the library has no batch split):

* ``rngkeys = split(rngkey, 2)``; the noise is ``normal_like_tree(w,
  rngkeys[0])`` (``split(key, L + 1)``, leaf ``i`` from key ``i + 1``);
  the next step's key is ``rngkeys[1]``;
* ``noisy = w + sqrt(1 / (N s)) * noise``, ``g = grad(noisy)``;
  ``perturbed = w + rho * g / s``, ``g_adv = grad(perturbed)``;
  ``gs = sqrt(s * g ** 2)``;
* ``gm = b1 gm + (1 - b1) (g_adv + wdecay w)``; ``w -= lr * lrfactor * gm / s``;
  ``s = b2 s + (1 - b2) (gs + damping + wdecay)``.

The noise is drawn with ``jax.random`` in the reference too (the authors'
code draws with it), from the same seed; the gradients are the hand-written
float64 NumPy ones of ``tests/torch_layout.py``.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import calibration
from tests import torch_layout as model

N_DATA, PRIOR, DAMPING, B1, B2, STEPS = 40.0, 25.0, 0.1, 0.9, 0.999, 4
KEYS = ("bias", "dense", "kernel")  # jax.tree order of the parameter dict


def _normal_like_tree(shapes, key, dtype):
  """``util.normal_like_tree``: split into L + 1, leaves from keys[1:]."""
  all_keys = jax.random.split(key, len(KEYS) + 1)
  noise = {
      k: np.asarray(jax.random.normal(all_keys[i + 1], shapes[k], dtype), np.float64)
      for i, k in enumerate(KEYS)
  }
  return noise, all_keys[0]


def _reference(lr_at, rho, steps, seed, dtype, s_init=1.0):
  """``steps`` of the authors' bSAM step (msharpness = 1), float64 NumPy."""
  wdecay = PRIOR / N_DATA
  w = model.start()
  gm = {k: np.zeros_like(v) for k, v in w.items()}
  s = {k: s_init * np.ones_like(v) for k, v in w.items()}
  rngkey = jax.random.PRNGKey(seed)
  out = []
  for t in range(steps):
    rngkeys = jax.random.split(rngkey, 2)
    noise, _ = _normal_like_tree({k: v.shape for k, v in w.items()},
                                 rngkeys[0], dtype)
    noisy = {k: w[k] + np.sqrt(1.0 / (N_DATA * s[k])) * noise[k] for k in w}
    g = model.grad(noisy)
    perturbed = {k: w[k] + rho * g[k] / s[k] for k in w}
    g_adv = model.grad(perturbed)
    gs = {k: np.sqrt(s[k] * g[k] ** 2.0) for k in w}
    gm = {k: B1 * gm[k] + (1 - B1) * (g_adv[k] + wdecay * w[k]) for k in w}
    w = {k: w[k] - lr_at(t) * gm[k] / s[k] for k in w}
    s = {k: B2 * s[k] + (1 - B2) * (gs[k] + DAMPING + wdecay) for k in w}
    rngkey = rngkeys[1]
    out.append(dict(w=w, gm=gm, s=s, points=(noisy, perturbed),
                    loss=model.loss_and_grad(perturbed)[0]))
  return out


def _tx(lr, rho, seed=0, **kw):
  return sam_optax.bsam(lr, rho, num_data=N_DATA, b1=B1, b2=B2,
                        prior_precision=PRIOR, damping=DAMPING, key=seed, **kw)


def _warmup(t):
  """A learning-rate factor as the authors' loop's: linear warm-up, then cosine."""
  return 0.3 * (t + 1) / 3 if t < 2 else 0.3 * 0.5 * (1 + np.cos(np.pi * (t - 2) / 4))


@pytest.mark.parametrize("rho,lr", [(0.05, 0.1), (0.3, "schedule"), (0.0, 0.2)])
def test_matches_authors_bsam_float64(rho, lr):
  """Every closure point, the weights, momentum and precision over 4 steps."""
  lr_at = _warmup if lr == "schedule" else (lambda t: lr)
  with jax.enable_x64(True):
    ref = _reference(lr_at, rho, STEPS, seed=3, dtype=jnp.float64)
    tx = _tx((lambda c: jnp.asarray(_warmup(int(c)))) if lr == "schedule" else lr,
             rho, seed=3)
    params = {k: jnp.asarray(v) for k, v in model.start().items()}  # float64
    state = tx.init(params)
    for t in range(STEPS):
      points = []

      def grad_fn(p):
        points.append(model.numpy_of(p))
        return {k: jnp.asarray(v) for k, v in model.grad(model.numpy_of(p)).items()}

      updates, state = tx.update(params, state, params, grad_fn=grad_fn)
      params = optax.apply_updates(params, updates)
      assert len(points) == 2
      for got, want in zip(points, ref[t]["points"]):
        for k in KEYS:
          np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-14)
      for k in KEYS:
        np.testing.assert_allclose(params[k], ref[t]["w"][k], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(state.momentum[k], ref[t]["gm"][k],
                                   rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(state.precision[k], ref[t]["s"][k],
                                   rtol=1e-12, atol=1e-14)
      assert int(state.count) == t + 1


def test_matches_authors_bsam_float32_jit_loss_fn():
  """The usual jitted step with a loss closure, float32, init precision 2."""
  ref = _reference(lambda t: 0.1, 0.05, STEPS, seed=11, dtype=jnp.float32, s_init=2.0)
  tx = _tx(0.1, 0.05, seed=11, init_precision=2.0)
  params = model.params()
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(model.loss)(p), s, p, loss_fn=model.loss)
    return optax.apply_updates(p, u), s

  for t in range(STEPS):
    params, state = step(params, state)
    for k in KEYS:
      np.testing.assert_allclose(params[k], ref[t]["w"][k], rtol=2e-5, atol=2e-6)
      np.testing.assert_allclose(state.precision[k], ref[t]["s"][k], rtol=2e-6)
    stats = sam_optax.sam_stats(state)
    np.testing.assert_allclose(stats.perturbed_loss, ref[t]["loss"], rtol=2e-5)
    assert float(stats.pass_taken) == 1.0 and float(stats.rho) == pytest.approx(0.05)


def test_clean_gradient_is_dead_code_under_jit():
  """The gradient passed as ``updates`` is not used: XLA removes its pass."""
  tx = _tx(0.1, 0.05)
  params = model.params()
  state = tx.init(params)

  def with_clean(p, s):
    return tx.update(jax.grad(model.loss)(p), s, p, loss_fn=model.loss)

  def without(p, s):
    return tx.update(p, s, p, loss_fn=model.loss)

  def flops(f):
    cost = jax.jit(f).lower(params, state).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]

  np.testing.assert_allclose(flops(with_clean), flops(without), rtol=1e-6)


def test_defaults_and_initial_state():
  sig = inspect.signature(sam_optax.bsam)
  defaults = {k: v.default for k, v in sig.parameters.items()}
  assert defaults["rho"] == 0.01  # the authors' CIFAR commands
  assert defaults["b1"] == 0.9 and defaults["b2"] == 0.999
  assert defaults["prior_precision"] == 40.0 and defaults["damping"] == 0.1
  assert defaults["init_precision"] == 1.0 and defaults["key"] == 0
  assert sig.parameters["learning_rate"].default is inspect.Parameter.empty
  assert sig.parameters["num_data"].kind is inspect.Parameter.KEYWORD_ONLY
  assert sig.parameters["num_data"].default is inspect.Parameter.empty
  params = {"a": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.zeros(4)}
  state = sam_optax.bsam(0.5, num_data=10).init(params)
  assert isinstance(state, sam_optax.BSAMState)
  assert state.precision["a"].dtype == jnp.float32  # widened
  np.testing.assert_array_equal(state.precision["b"], np.ones(4))
  np.testing.assert_array_equal(state.momentum["a"], np.zeros((2, 3)))
  assert float(state.num_data) == 10.0 and int(state.count) == 0
  # The key of seed 0 is the authors' PRNGKey(0).
  np.testing.assert_array_equal(state.key.key, jax.random.PRNGKey(0))


def test_bf16_params_keep_their_dtype():
  params = {"w": jnp.array([0.5, -1.0], jnp.bfloat16)}
  loss_fn = lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2)
  tx = sam_optax.bsam(0.1, num_data=100)
  state = tx.init(params)
  updates, state = tx.update(params, state, params, loss_fn=loss_fn)
  assert updates["w"].dtype == jnp.bfloat16
  assert state.momentum["w"].dtype == jnp.float32


@pytest.mark.parametrize("kwargs,name", [
    (dict(learning_rate=-0.1), "learning_rate"),
    (dict(rho=-1.0), "rho"),
    (dict(num_data=0), "num_data"),
    (dict(num_data=-5.0), "num_data"),
    (dict(b1=1.0), "b1"),
    (dict(b2=-0.1), "b2"),
    (dict(prior_precision=-1.0), "prior_precision"),
    (dict(damping=float("nan")), "damping"),
    (dict(init_precision=0.0), "init_precision"),
    (dict(key=-1), "key"),
])
def test_bad_hyperparameters(kwargs, name):
  args = dict(learning_rate=0.1, num_data=100.0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=rf"`bsam`: `{name}`"):
    sam_optax.bsam(**args)


def test_num_data_is_required():
  with pytest.raises(TypeError, match="num_data"):
    sam_optax.bsam(0.1)  # pylint: disable=missing-kwoa


def test_update_errors():
  tx = sam_optax.bsam(0.1, num_data=10)
  params = jnp.ones(3)
  state = tx.init(params)
  with pytest.raises(TypeError, match="needs a loss closure"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="not both"):
    tx.update(params, state, params, loss_fn=jnp.sum, grad_fn=lambda p: p)
  with pytest.raises(ValueError, match="`updates`"):
    tx.update(jnp.ones(4), state, params, loss_fn=jnp.sum)
  with pytest.raises(ValueError, match="int32"):
    tx.init(jnp.ones(3, jnp.int32))
  with pytest.raises(ValueError, match="complex"):
    tx.init(jnp.ones(3, jnp.complex64))


def test_fresh_noise_every_step_and_seed_dependence():
  params = jnp.zeros(5)
  points = []

  def grad_fn(p):
    points.append(np.asarray(p))
    return jnp.zeros_like(p)

  for seed in (0, 0, 1):
    tx = sam_optax.bsam(0.1, num_data=4, key=seed)
    state = tx.init(params)
    for _ in range(2):
      _, state = tx.update(params, state, params, grad_fn=grad_fn)
  noisy = points[0::2]  # the ascent points are m (zero gradient)
  assert not np.allclose(noisy[0], noisy[1])  # a new draw at step 2
  np.testing.assert_array_equal(noisy[0], noisy[2])  # same seed, same draws
  assert not np.allclose(noisy[0], noisy[4])  # another seed
  np.testing.assert_array_equal(points[1], np.zeros(5))


def _trained_state():
  params = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.full((2, 2), 0.25)}
  tx = sam_optax.bsam(0.1, num_data=50.0)
  state = tx.init(params)
  precision = {"a": jnp.array([1.0, 4.0, 0.25]),
               "b": jnp.array([[2.0, 9.0], [1.0, 16.0]])}
  return params, state._replace(precision=precision), precision


def test_samples_have_the_posterior_mean_and_variance():
  params, state, precision = _trained_state()
  k = 40000
  samples = sam_optax.bsam_sample(params, state, jax.random.key(5), k)
  for name in params:
    x = np.asarray(samples[name], np.float64)
    assert x.shape == (k,) + params[name].shape
    var = 1.0 / (50.0 * np.asarray(precision[name]))
    # mean: 5 standard errors; variance: 5 standard errors of the sample
    # variance of a Gaussian, var * sqrt(2 / k).
    assert np.all(np.abs(x.mean(0) - params[name]) < 5 * np.sqrt(var / k))
    assert np.all(np.abs(x.var(0) - var) < 5 * var * np.sqrt(2.0 / k))


def test_samples_follow_the_authors_test_script():
  """``test.py``: ``noise, rngkey = normal_like_tree(w, rngkey)`` per sample."""
  params, state, precision = _trained_state()
  leaves = ("a", "b")
  got = sam_optax.bsam_sample(params, state, jax.random.PRNGKey(2), 3)
  one = sam_optax.bsam_sample(params, state, jax.random.PRNGKey(2))
  rngkey = jax.random.PRNGKey(2)
  for i in range(3):
    all_keys = jax.random.split(rngkey, len(leaves) + 1)
    for j, name in enumerate(leaves):
      z = np.asarray(jax.random.normal(all_keys[j + 1], params[name].shape), np.float64)
      std = np.sqrt(1.0 / (50.0 * np.asarray(precision[name])))
      want = np.asarray(params[name]) + std * z
      np.testing.assert_allclose(got[name][i], want, rtol=1e-6, atol=1e-7)
      if i == 0:
        np.testing.assert_allclose(one[name], want, rtol=1e-6, atol=1e-7)
    rngkey = all_keys[0]


def test_sample_errors_and_wrappers():
  params, state, _ = _trained_state()
  with pytest.raises(ValueError, match="holds no `BSAMState`"):
    sam_optax.bsam_sample(params, optax.sgd(0.1).init(params), jax.random.key(0))
  with pytest.raises(ValueError, match="num_samples"):
    sam_optax.bsam_sample(params, state, jax.random.key(0), 0)
  with pytest.raises(ValueError, match="precision"):
    sam_optax.bsam_sample({"a": params["a"]}, state, jax.random.key(0))
  tx = optax.inject_hyperparams(sam_optax.bsam)(learning_rate=0.1, num_data=50.0)
  wrapped = tx.init(params)
  loss_fn = lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))
  _, wrapped = jax.jit(lambda s: tx.update(params, s, params, loss_fn=loss_fn))(wrapped)
  assert int(wrapped.inner_state.count) == 1
  sample = sam_optax.bsam_sample(params, wrapped, jax.random.key(0))
  assert jax.tree.structure(sample) == jax.tree.structure(params)


def test_model_average_example():
  """A logistic model: the averaged prediction is less confident than the mean's."""
  x = jnp.array([[1.0, 2.0], [-1.0, 0.5], [0.3, -2.0]])
  w = jnp.array([[2.0, -1.0], [1.0, 1.5]])
  tx = sam_optax.bsam(0.1, num_data=2.0)  # few data: a wide posterior
  state = tx.init(w)
  samples = sam_optax.bsam_sample(w, state, jax.random.key(0), 256)
  probs = jax.vmap(lambda p: jax.nn.softmax(x @ p))(samples).mean(0)
  at_mean = jax.nn.softmax(x @ w)
  assert bool(jnp.all(probs.max(-1) < at_mean.max(-1)))


# ---------------------------------------------------------------- calibration


def _authors_ece(probs, y_onehot, bins=20):
  """``util.ece`` of the authors (from gpleiss), transcribed in NumPy."""
  edges = np.linspace(0, 1, bins + 1)
  conf = probs.max(1)
  acc = probs.argmax(1) == y_onehot.argmax(1)
  ece = 0.0
  for lo, hi in zip(edges[:-1], edges[1:]):
    in_bin = (conf >= lo) & (conf <= hi)
    p = in_bin.astype(np.float64).mean()
    if p > 0:
      ece += abs(conf[in_bin].mean() - acc[in_bin].mean()) * p
  return ece


def test_ece_by_hand():
  # Confidences 0.9 (right), 0.7 (wrong), 0.65 (right), 0.4 (right), 0.95 (wrong).
  probs = np.array([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.2, 0.65, 0.15],
                    [0.4, 0.35, 0.25], [0.025, 0.025, 0.95]])
  labels = np.array([0, 1, 1, 0, 0])
  # Five bins of width 0.2: (0.2, 0.4] holds 0.4; (0.6, 0.8] holds 0.7, 0.65;
  # (0.8, 1] holds 0.9, 0.95.
  want = (1 * abs(1.0 - 0.4) + 2 * abs(0.5 - 0.675) + 2 * abs(0.5 - 0.925)) / 5
  r = calibration.reliability(probs, labels, num_bins=5)
  assert float(r.ece) == pytest.approx(want, rel=1e-6)
  np.testing.assert_array_equal(r.count, [0, 1, 0, 2, 2])
  np.testing.assert_allclose(r.confidence, [0, 0.4, 0, 0.675, 0.925], rtol=1e-6)
  np.testing.assert_allclose(r.accuracy, [0, 1, 0, 0.5, 0.5], rtol=1e-6)
  np.testing.assert_allclose(r.edges, np.linspace(0, 1, 6), atol=1e-7)
  assert float(calibration.expected_calibration_error(probs, labels, 5)) == \
      pytest.approx(want, rel=1e-6)
  # One-hot labels give the same.
  onehot = np.eye(3)[labels]
  assert float(calibration.expected_calibration_error(probs, onehot, 5)) == \
      pytest.approx(want, rel=1e-6)


def test_ece_matches_the_authors_off_the_edges():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(500, 10)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  labels = rng.integers(0, 10, 500)
  labels[:250] = probs[:250].argmax(1)  # half right by construction
  want = _authors_ece(probs, np.eye(10)[labels], bins=20)
  got = calibration.expected_calibration_error(probs, labels, num_bins=20)
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_ece_boundary_goes_to_the_lower_bin():
  # 0.5 lies on the edge of two bins: (0, 0.5] here (the authors' code
  # would count it in both).
  probs = np.array([[0.5, 0.5], [0.9, 0.1]])
  r = calibration.reliability(probs, np.array([1, 0]), num_bins=2)
  np.testing.assert_array_equal(r.count, [1, 1])
  assert float(r.ece) == pytest.approx((0.5 + 0.1) / 2)


@pytest.mark.parametrize("probs,labels,bins,match", [
    (np.ones((3,)), np.zeros(3, int), 15, "shape"),
    (np.ones((3, 2), int), np.zeros(3, int), 15, "floating"),
    (np.ones((3, 2)), np.zeros(4, int), 15, "labels"),
    (np.ones((3, 2)), np.zeros(3), 15, "labels"),
    (np.ones((3, 2)), np.zeros(3, int), 0, "num_bins"),
])
def test_ece_errors(probs, labels, bins, match):
  with pytest.raises(ValueError, match=match):
    calibration.expected_calibration_error(probs, labels, bins)
