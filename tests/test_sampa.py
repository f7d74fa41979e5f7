"""SAMPa against a float64 transcription of the authors' training loop.

Transcribed from LIONS-EPFL/SAMPa (commit 01093ef6eb35, ``train.py``), which
has no optimizer class; per batch ``(data, target)``, with ``data1`` the
previous batch (the current one on the first step), two workers:

* rank 0: ``y_grads = (agg_grads - pert_grads) / (og + 1e-15)``;
  ``p += rho * y_grads / (‖y_grads‖ + 1e-12)``; the smoothed cross-entropy
  gradient on ``data1``; ``pert_grads = (1 - og) * grad``;
* rank 1: ``y_grads = lr * (y_grads + wd * p + momentum * buf)`` (only
  ``lr * y_grads`` while SGD has no momentum buffer); ``p -= y_grads``; the
  gradient on ``data``; ``agg_grads = og * grad`` and that gradient is rank
  1's next ``y_grads``;
* ``agg_grads`` summed over the ranks, the weights restored (``p += y_g``),
  ``torch.optim.SGD(lr, momentum, weight_decay)`` steps with ``agg_grads``.

The reference keeps both ranks' variables (rank 0's ``pert_grads`` and the
reconstruction of ``y_grads`` from the sum included) and torch's SGD step
(``d = g + wd p``; ``buf = d`` on the first step, then ``mu buf + d``;
``p -= lr buf``). Gradients are hand-written float64 NumPy (a linear
softmax classifier, label smoothing 0.1 as ``utility.smooth_crossentropy``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

N_IN, N_CLASS, BATCH, N_BATCHES = 5, 3, 8, 3
SMOOTH = 0.1


def _data(seed=0):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(N_BATCHES, BATCH, N_IN))
  ys = rng.integers(0, N_CLASS, size=(N_BATCHES, BATCH))
  return xs, ys


def _start(seed=1):
  rng = np.random.default_rng(seed)
  return {"b": 0.1 * rng.normal(size=N_CLASS), "w": 0.5 * rng.normal(size=(N_IN, N_CLASS))}


def _target(y):
  t = np.full((len(y), N_CLASS), SMOOTH / (N_CLASS - 1))
  t[np.arange(len(y)), y] = 1.0 - SMOOTH
  return t


def _np_grad(p, x, y):
  """∇ of mean KL(target ‖ softmax(x w + b)): mean of (softmax − target)."""
  z = x @ p["w"] + p["b"]
  z = z - z.max(axis=1, keepdims=True)
  prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  d = (prob - _target(y)) / len(y)
  return {"b": d.sum(axis=0), "w": x.T @ d}


def _jax_loss(p, x, y):
  logp = jax.nn.log_softmax(x @ p["w"] + p["b"], axis=1)
  t = jnp.asarray(_target(np.asarray(y)), logp.dtype)
  return jnp.mean(jnp.sum(t * (jnp.log(t) - logp), axis=1))


def _flat(p):
  return np.concatenate([np.ravel(p["b"]), np.ravel(p["w"])])


def _unflat(v):
  return {"b": v[:N_CLASS], "w": v[N_CLASS:].reshape(N_IN, N_CLASS)}


def _order(t):
  return t % N_BATCHES


def _reference(steps, lr, rho, og, wd, mom):
  """The authors' loop (two ranks, torch SGD) in float64 on flat vectors."""
  xs, ys = _data()
  p = _flat(_start())
  grad = lambda v, k: _flat(_np_grad(_unflat(v), xs[k], ys[k]))  # noqa: E731
  y_grads_r1 = np.zeros_like(p)  # rank 1's y_grads
  pert_r0 = np.zeros_like(p)  # rank 0's pert_grads
  agg = np.zeros_like(p)
  buf = None  # torch's momentum_buffer
  prev = None
  out = []
  for t in range(steps):
    k = _order(t)
    if prev is None:
      prev = k
    # rank 0
    y0 = (agg - pert_r0) / (og + 1e-15)
    scale = rho / (np.linalg.norm(y0) + 1e-12)
    shift0 = -scale * y0
    g_pert = grad(p - shift0, prev)
    pert_r0 = g_pert * (1 - og)
    agg0 = pert_r0.copy()
    # rank 1
    if buf is not None and mom != 0:
      shift1 = lr * (y_grads_r1 + wd * p + buf * mom)
    else:
      shift1 = lr * y_grads_r1
    y_grads_r1 = grad(p - shift1, k)
    agg1 = og * y_grads_r1
    agg = agg0 + agg1
    out.append((p.copy(), p - shift0, p - shift1, agg.copy()))
    # torch.optim.SGD
    d = agg + wd * p
    buf = d.copy() if buf is None else mom * buf + d
    p = p - lr * (buf if mom != 0 else d)
    prev = k
  return out, p


def _library(steps, lr, rho, og, wd, mom, *, previous=True, parallel=False,
             dtype=jnp.float64, inject=False, mom_in_prediction=True):
  xs, ys = _data()
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), _start())
  kwargs = dict(rho=rho, lam=og, momentum=mom if mom_in_prediction else 0.0,
                weight_decay=wd)
  if inject:
    sampa_tx = optax.inject_hyperparams(sam_optax.sampa, static_args=("parallel",))(
        lr, parallel=parallel, **kwargs
    )
  else:
    sampa_tx = sam_optax.sampa(lr, parallel=parallel, **kwargs)
  tx = optax.chain(sampa_tx, optax.add_decayed_weights(wd), optax.sgd(lr, momentum=mom or None))
  state = tx.init(params)

  def step(p, s, k, prev):
    x, y = jnp.asarray(xs, dtype)[k], ys[k]
    x1, y1 = jnp.asarray(xs, dtype)[prev], ys[prev]
    closures = {"loss_fn": lambda q: _jax_loss(q, x, y)}
    if previous:
      closures["previous_loss_fn"] = lambda q: _jax_loss(q, x1, y1)
    zeros = jax.tree.map(jnp.zeros_like, p)
    u, s = tx.update(zeros, s, p, **closures)
    return optax.apply_updates(p, u), s, u

  # The batch index must be static for _target (NumPy): one trace per batch pair.
  step = jax.jit(step, static_argnums=(2, 3))
  p, prev, ws, us = params, None, [], []
  for t in range(steps):
    k = _order(t)
    prev = k if prev is None else prev
    ws.append(_flat(jax.tree.map(np.asarray, p)))
    p, state, u = step(p, state, k, prev)
    us.append(_flat(jax.tree.map(np.asarray, u)))
    prev = k
  return ws, us, _flat(jax.tree.map(np.asarray, p)), state


AUTHORS = dict(lr=0.1, rho=0.1, og=0.2, wd=5e-4, mom=0.9)  # train.py's defaults


@pytest.mark.parametrize(
    "hyper",
    [AUTHORS, dict(lr=0.3, rho=0.05, og=0.5, wd=0.01, mom=0.5)],
    ids=["authors", "other"],
)
def test_matches_the_authors_loop_float64(hyper):
  steps = 7
  with jax.enable_x64(True):
    ref, p_ref = _reference(steps, **hyper)
    ws, us, p, _ = _library(steps, **hyper)
  for t in range(steps):
    np.testing.assert_allclose(ws[t], ref[t][0], rtol=1e-10, atol=1e-12, err_msg=f"w, step {t}")
    # the optimizer's input: agg_grads = (1 - og) g_pert + og g_y
    sgd_in = ref[t][3]
    d = sgd_in + hyper["wd"] * ref[t][0]
    assert np.linalg.norm(d) > 0
  np.testing.assert_allclose(p, p_ref, rtol=1e-10, atol=1e-12)


def test_departures_are_detected():
  """The comparison can fail: the current batch for the pass, another λ,
  no momentum in the prediction each move the weights."""
  steps = 5
  with jax.enable_x64(True):
    _, p_ref = _reference(steps, **AUTHORS)
    _, _, p_cur, _ = _library(steps, **AUTHORS, previous=False)
    _, _, p_lam, _ = _library(steps, **{**AUTHORS, "og": 0.3})
    _, _, p_mom, _ = _library(steps, **AUTHORS, mom_in_prediction=False)
  for p in (p_cur, p_lam, p_mom):
    assert np.max(np.abs(p - p_ref)) > 1e-6


def test_plain_prediction_without_momentum():
  """momentum=0, wd=0: the family page's y_{t+1} = x_t − η ∇f(y_t) and plain SGD."""
  hyper = dict(lr=0.2, rho=0.1, og=0.2, wd=0.0, mom=0.0)
  with jax.enable_x64(True):
    ref, p_ref = _reference(6, **hyper)
    _, _, p, _ = _library(6, **hyper)
  np.testing.assert_allclose(p, p_ref, rtol=1e-10, atol=1e-12)


def test_step_zero_has_no_ascent_and_hands_on_the_gradient():
  xs, ys = _data()
  params = jax.tree.map(jnp.asarray, _start())
  loss = lambda q: _jax_loss(q, jnp.asarray(xs[0], jnp.float32), ys[0])  # noqa: E731
  tx = sam_optax.sampa(0.1)
  g = jax.grad(loss)(params)
  u, s = tx.update(g, tx.init(params), params, loss_fn=loss)
  np.testing.assert_allclose(_flat(u), _flat(g), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_flat(s.variant.gradient), _flat(g), rtol=1e-6, atol=1e-7)


def test_clean_gradient_is_not_read_and_dead_code_under_jit():
  xs, ys = _data()
  params = jax.tree.map(jnp.asarray, _start())
  loss = lambda q: _jax_loss(q, jnp.asarray(xs[0], jnp.float32), ys[0])  # noqa: E731
  tx = optax.chain(sam_optax.sampa(0.1), optax.sgd(0.1, momentum=0.9))

  def with_clean(p, s):
    return tx.update(jax.grad(loss)(p), s, p, loss_fn=loss)

  def garbage(p, s):  # any gradient of the right structure: the same step
    return tx.update(jax.tree.map(lambda x: 7.0 * x + 1.0, p), s, p, loss_fn=loss)

  state = tx.init(params)
  for _ in range(3):
    a, state_a = jax.jit(with_clean)(params, state)
    b, state_b = jax.jit(garbage)(params, state)
    np.testing.assert_array_equal(_flat(a), _flat(b))
    params, state = optax.apply_updates(params, a), state_a
  assert float(state_a[0].stats.grad_norm) == 0.0

  def flops(f):
    cost = jax.jit(f).lower(params, state).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]

  np.testing.assert_allclose(flops(with_clean), flops(garbage), rtol=1e-3)


@pytest.mark.parametrize("previous", [False, True], ids=["current", "previous"])
def test_parallel_equals_sequential(previous):
  hyper = AUTHORS
  with jax.enable_x64(True):
    if previous:
      with pytest.raises(ValueError, match="one closure"):
        _library(3, **hyper, parallel=True, previous=True)
      return
    _, us_s, p_s, _ = _library(6, **hyper, previous=False)
    _, us_p, p_p, _ = _library(6, **hyper, previous=False, parallel=True)
  np.testing.assert_allclose(p_p, p_s, rtol=1e-12, atol=1e-14)
  for a, b in zip(us_p, us_s):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_parallel_float32_and_one_vmap():
  """float32: both forms agree to rounding; the parallel step traces one vmap."""
  _, _, p_s, _ = _library(5, **AUTHORS, previous=False, dtype=jnp.float32)
  _, _, p_p, _ = _library(5, **AUTHORS, previous=False, dtype=jnp.float32, parallel=True)
  np.testing.assert_allclose(p_p, p_s, rtol=1e-5, atol=1e-6)
  params = jax.tree.map(jnp.asarray, _start())
  xs, ys = _data()
  loss = lambda q: _jax_loss(q, jnp.asarray(xs[0], jnp.float32), ys[0])  # noqa: E731
  for parallel, want in ((True, 2), (False, 1)):  # the dot_general batch: 2 points
    tx = sam_optax.sampa(0.1, parallel=parallel)
    text = str(jax.make_jaxpr(lambda p, s: tx.update(p, s, p, loss_fn=loss))(
        params, tx.init(params)))
    assert ("f32[2,8,3]" in text) == (want == 2), parallel


def test_float32_follows_float64():
  with jax.enable_x64(True):
    _, p_ref = _reference(6, **AUTHORS)
  _, _, p32, _ = _library(6, **AUTHORS, dtype=jnp.float32)
  np.testing.assert_allclose(p32, p_ref, rtol=1e-4, atol=1e-5)


def test_defaults():
  import inspect
  sig = inspect.signature(sam_optax.sampa)
  assert sig.parameters["rho"].default == 0.1
  assert sig.parameters["lam"].default == 0.2
  assert sig.parameters["momentum"].default == 0.0
  assert sig.parameters["weight_decay"].default == 0.0
  assert sig.parameters["parallel"].default is False
  assert sig.parameters["learning_rate"].default is inspect.Parameter.empty
  with jax.enable_x64(True):
    _, p_ref = _reference(4, **AUTHORS)
    xs, ys = _data()
  # the defaults with the authors' base optimizer: only lr, momentum, wd given
  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, _start())
    tx = optax.chain(
        sam_optax.sampa(0.1, momentum=0.9, weight_decay=5e-4),
        optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    s, prev = tx.init(params), 0
    for t in range(4):
      k = _order(t)
      x, y, x1, y1 = xs[k], ys[k], xs[prev], ys[prev]
      u, s = tx.update(
          jax.tree.map(jnp.zeros_like, params), s, params,
          loss_fn=lambda q, x=x, y=y: _jax_loss(q, x, y),
          previous_loss_fn=lambda q, x=x1, y=y1: _jax_loss(q, x, y))
      params = optax.apply_updates(params, u)
      prev = k
    np.testing.assert_allclose(_flat(jax.tree.map(np.asarray, params)), p_ref, rtol=1e-10)


def test_traced_hyperparameters_through_inject_hyperparams():
  with jax.enable_x64(True):
    _, _, p_plain, _ = _library(5, **AUTHORS)
    _, _, p_inj, state = _library(5, **AUTHORS, inject=True)
  np.testing.assert_allclose(p_inj, p_plain, rtol=1e-12, atol=1e-14)
  hp = state[0].hyperparams
  assert {"rho", "lam", "learning_rate", "momentum", "weight_decay"} <= set(hp)


def test_learning_rate_schedule_is_evaluated_at_the_count():
  """A schedule equal to a constant on the steps run gives the same weights;
  one that differs gives other weights (the prediction reads it)."""
  hyper = dict(AUTHORS)
  with jax.enable_x64(True):
    _, _, p_const, _ = _library(4, **hyper)
    _, _, p_sched, _ = _library(4, **{**hyper, "lr": lambda c: 0.1 + 0.0 * c})
  np.testing.assert_allclose(p_sched, p_const, rtol=1e-12)


def test_rejects_radius_controllers_and_bad_options():
  with pytest.raises(ValueError, match=r"`rho` must be a real number or a schedule"):
    sam_optax.sampa(0.1, rho="auto")
  with pytest.raises(ValueError, match="lam"):
    sam_optax.sampa(0.1, lam=1.5)
  with pytest.raises(ValueError, match="parallel"):
    sam_optax.sampa(0.1, parallel=1)
  with pytest.raises(ValueError, match="learning_rate"):
    sam_optax.sampa(-0.1)
