"""GAM against a float64 transcription of the authors' ``GAM.step``.

Transcribed from ``gam/gam.py`` of ``xxgege/GAM`` (commit
``694133d9df9266a3df892087ca6b1be72ba610c0``), ``adaptive=False``, with the
arguments ``main_cifar.py`` sets (``grad_beta_2 = 1 - grad_beta_0``,
``grad_beta_3 = 1 - grad_beta_1``) and torch's ``SGD(momentum, weight_decay)``
as the base optimizer (``optimizer_helper.py``), step by step and in place,
as the code runs:

* ``get_grad()`` gives ``g_0``; ``perturb_weights(0)``:
  ``e_w_0 = g_0 · grad_rho / (‖g_0‖ + 1e-12)``, ``p += e_w_0``;
* ``get_grad()`` gives ``g_1``; ``unperturb("e_w_0")``: ``p -= e_w_0``;
* ``grad_norm_ascent``: ``grad = g_1 − g_0``,
  ``e_w_1_2 = grad · grad_norm_rho / (‖grad‖ + 1e-12)``, ``p += e_w_1_2``;
* ``get_grad()`` gives ``g_2``; ``perturb_weights(1)``:
  ``e = g_2 · grad_rho / (‖g_2‖ + 1e-12)``, ``p += e``, ``e_w_1_2 += e``;
* ``get_grad()`` gives ``g_3``; ``gradient_decompose``:
  ``pro_m = g_0 + |grad_beta_2| g_2``, ``grad = grad_beta_1 g_1 +
  grad_beta_3 g_3``, ``cosine = <pro_m, grad> / (‖grad‖‖pro_m‖ + 1e-12)``,
  ``vertical = pro_m − cosine ‖pro_m‖ grad / (‖grad‖ + 1e-12)``,
  ``grad −= grad_gamma · vertical``;
* ``unperturb("e_w_1_2")``, then the base optimizer's step.

Not copied: ``adaptive`` (off in the script), the BatchNorm momentum toggle
(a model concern) and the distributed reduction (``axis_name``).
"""

from __future__ import annotations

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import torch_layout as model

LR, MOMENTUM, WD, STEPS = 0.05, 0.9, 5e-4, 4
EPS = 1e-12

# main_cifar.py: (grad_norm_rho, grad_rho, grad_beta_0, grad_beta_1, grad_gamma)
SETTINGS = {
    "cifar100_resnet": (0.2, 0.02, 0.5, 0.6, 0.03),
    "cifar100_pyramidnet": (0.2, 0.04, 0.3, 0.5, 0.05),
    "cifar10_resnet": (0.2, 0.03, 0.1, 0.1, 0.05),
    # larger than the authors', so that every term moves the weights visibly
    "strong": (0.5, 0.2, 0.3, 0.7, 0.8),
}


def _norm(tensors):
  """``GAM._grad_norm``: ``sqrt(Σ_p Σ g²)`` over every tensor."""
  return float(np.sqrt(sum(np.sum(v * v) for v in tensors.values())))


def _gam_step(w, grad_norm_rho, grad_rho, beta0, beta1, gamma, points=None,
              quirk=None, grad_of=model.grad):
  """One ``GAM.step`` before the base optimizer: the gradient it leaves."""
  beta2, beta3 = 1 - beta0, 1 - beta1
  p = {k: v.copy() for k, v in w.items()}
  g0 = grad_of(p)
  scale = grad_rho / (_norm(g0) + EPS)  # perturb_weights(0)
  e_w_0 = {k: g0[k] * scale for k in p}
  p = {k: p[k] + e_w_0[k] for k in p}
  if points is not None:
    points.append(p)
  g1 = grad_of(p)
  p = {k: p[k] - e_w_0[k] for k in p}  # unperturb("e_w_0")
  grad = {k: g1[k] - g0[k] for k in p}  # grad_norm_ascent
  scale = grad_norm_rho / (_norm(grad) + EPS)
  e_w_1_2 = {k: grad[k] * scale for k in p}
  p = {k: p[k] + e_w_1_2[k] for k in p}
  if points is not None:
    points.append(p)
  g2 = grad_of(p)
  scale = grad_rho / (_norm(g2) + EPS)  # perturb_weights(1)
  e = {k: g2[k] * scale for k in p}
  if quirk == "third_point_from_w":  # a departure the test must catch
    p = {k: p[k] - e_w_1_2[k] for k in p}
  p = {k: p[k] + e[k] for k in p}
  e_w_1_2 = {k: e_w_1_2[k] + e[k] for k in p}
  if points is not None:
    points.append(p)
  g3 = grad_of(p)
  # gradient_decompose
  pro_m = {k: g0[k] + abs(beta2) * g2[k] for k in p}
  if quirk == "m_from_g1":
    pro_m = {k: g0[k] + abs(beta2) * g1[k] for k in p}
  grad = {k: beta1 * g1[k] + beta3 * g3[k] for k in p}
  inner = sum(np.sum(pro_m[k] * grad[k]) for k in p)
  new_norm, old_norm = _norm(grad), _norm(pro_m)
  cosine = inner / (new_norm * old_norm + EPS)
  vertical = {k: pro_m[k] - cosine * old_norm * grad[k] / (new_norm + EPS) for k in p}
  return {k: grad[k] - gamma * vertical[k] for k in p}


class _TorchSGD:
  """``torch.optim.SGD(lr, momentum, weight_decay)``, no dampening:
  ``d = g + wd·w``; ``buf = d`` at the first step, then ``μ buf + d``."""

  def __init__(self, lr, momentum, weight_decay):
    self.lr, self.momentum, self.wd, self.buf = lr, momentum, weight_decay, None

  def step(self, w, g):
    d = {k: g[k] + self.wd * w[k] for k in w}
    if self.buf is None:
      self.buf = d
    else:
      self.buf = {k: self.momentum * self.buf[k] + d[k] for k in w}
    return {k: w[k] - self.lr * self.buf[k] for k in w}


def _reference(setting, steps=STEPS, rho_at=None, quirk=None, points=None):
  """``steps`` of GAM around torch's SGD: the weights after each step."""
  grad_norm_rho, grad_rho, beta0, beta1, gamma = setting
  ratio = grad_rho / grad_norm_rho
  w, sgd, trajectory = model.start(), _TorchSGD(LR, MOMENTUM, WD), []
  for t in range(steps):
    rho = grad_norm_rho if rho_at is None else rho_at(t)
    step_points = [] if points is not None else None
    g = _gam_step(w, rho, ratio * rho, beta0, beta1, gamma, step_points, quirk)
    if points is not None:
      points.append(step_points)
    w = sgd.step(w, g)
    trajectory.append(w)
  return trajectory


def _base():
  return optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))


def _kwargs(setting):
  grad_norm_rho, grad_rho, beta0, beta1, gamma = setting
  return dict(rho=grad_norm_rho, rho_prime_ratio=grad_rho / grad_norm_rho,
              beta0=beta0, beta1=beta1, gamma=gamma)


def _library(tx, steps=STEPS, dtype=jnp.float32, record=None):
  # the reference's start (rounded through float32) in the library's dtype
  params = {k: jnp.asarray(v, dtype) for k, v in model.start().items()}
  state = tx.init(params)

  def grad_fn(p):
    if record is not None:
      jax.debug.callback(
          lambda *leaves: record.append(
              {k: np.asarray(v, np.float64) for k, v in zip(sorted(p), leaves)}
          ),
          *[p[k] for k in sorted(p)],
          ordered=True,
      )
    return jax.grad(model.loss)(p)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(model.loss)(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  trajectory = []
  for _ in range(steps):
    params, state = step(params, state)
    trajectory.append(model.numpy_of(params))
  jax.effects_barrier()
  return trajectory, state


def _assert_close(got, want, rtol=2e-5, atol=2e-6):
  for t, (a, b) in enumerate(zip(got, want, strict=True)):
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"step {t}, {k}")


def _far(a, b):
  return max(np.max(np.abs(a[-1][k] - b[-1][k])) for k in b[-1]) > 1e-4


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_matches_the_transcribed_code(name):
  setting = SETTINGS[name]
  got, state = _library(optax.chain(sam_optax.gam(**_kwargs(setting)), _base()))
  _assert_close(got, _reference(setting))
  sam_state = state[0]
  assert float(sam_state.stats.pass_taken) == 1.0
  assert int(sam_state.nonfinite_count) == 0


def test_the_points_are_the_transcribed_ones():
  """The closure runs at the three points of ``GAM.step``, in order."""
  setting = SETTINGS["strong"]
  seen, want = [], []
  got, _ = _library(
      optax.chain(sam_optax.gam(**_kwargs(setting)), _base()), 2, record=seen
  )
  ref = _reference(setting, 2, points=want)
  want = [q for step in want for q in step]
  assert len(seen) == len(want) == 6
  starts, ref_starts = [model.start()] + got[:-1], [model.start()] + ref[:-1]
  for i, (a, b) in enumerate(zip(seen, want)):
    w, v = starts[i // 3], ref_starts[i // 3]
    for k in b:  # the offsets from the weights of that step
      np.testing.assert_allclose(
          a[k] - w[k], b[k] - v[k], rtol=2e-5, atol=2e-6, err_msg=f"point {i}, {k}"
      )


@pytest.mark.parametrize("quirk", ["third_point_from_w", "m_from_g1"])
def test_a_departure_from_the_code_is_detected(quirk):
  setting = SETTINGS["strong"]
  got, _ = _library(optax.chain(sam_optax.gam(**_kwargs(setting)), _base()))
  assert _far(got, _reference(setting, quirk=quirk))


def test_every_term_matters():
  """Swapping β0 and β1, or dropping γ, moves the weights (so the tests above
  pin each coefficient)."""
  rho, grad_rho, beta0, beta1, gamma = SETTINGS["strong"]
  got, _ = _library(optax.chain(sam_optax.gam(**_kwargs(SETTINGS["strong"])), _base()))
  assert _far(got, _reference((rho, grad_rho, beta1, beta0, gamma)))
  assert _far(got, _reference((rho, grad_rho, beta0, beta1, 0.0)))
  assert _far(got, _reference((rho, 0.5 * grad_rho, beta0, beta1, gamma)))


def test_rho_schedule_scales_both_radii():
  setting = SETTINGS["cifar100_resnet"]
  kwargs = _kwargs(setting)
  kwargs["rho"] = optax.linear_schedule(0.3, 0.1, 4)
  got, _ = _library(optax.chain(sam_optax.gam(**kwargs), _base()))
  want = _reference(setting, rho_at=lambda t: 0.3 - 0.05 * t)
  _assert_close(got, want)


def test_inject_hyperparams_traces_every_hyperparameter():
  setting = SETTINGS["cifar10_resnet"]
  tx = optax.chain(
      optax.inject_hyperparams(sam_optax.gam)(**_kwargs(SETTINGS["strong"])),
      _base(),
  )
  params = model.params()
  state = tx.init(params)
  hp = state[0].hyperparams
  assert set(hp) >= {"rho", "rho_prime_ratio", "beta0", "beta1", "gamma"}
  # Set the values of another setting in the state: one compiled step.
  for key, value in _kwargs(setting).items():
    hp[key] = jnp.asarray(value, hp[key].dtype)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(model.loss)(p), s, p, loss_fn=model.loss)
    return optax.apply_updates(p, u), s

  got = []
  for _ in range(STEPS):
    params, state = step(params, state)
    got.append(model.numpy_of(params))
  assert step._cache_size() == 1
  _assert_close(got, _reference(setting))


@pytest.mark.parametrize("how", ["number", "schedule", "inject"])
def test_rho_zero_is_the_base_optimizer(how):
  kwargs = _kwargs(SETTINGS["strong"])
  if how == "number":
    tx = sam_optax.gam(**{**kwargs, "rho": 0.0})
  elif how == "schedule":
    tx = sam_optax.gam(**{**kwargs, "rho": lambda count: 0.0 * count})
  else:
    tx = optax.inject_hyperparams(sam_optax.gam)(**{**kwargs, "rho": 0.0})
  got, _ = _library(optax.chain(tx, _base()))
  want, _ = _library(_base())
  if how == "number":  # no pass compiled: bit for bit
    for a, b in zip(got, want):
      chex.assert_trees_all_equal(a, b)
  else:  # every point is w; u = g exactly, γ m⊥ is float32 rounding
    _assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_float64_with_x64_matches_tightly():
  setting = SETTINGS["strong"]
  with jax.enable_x64(True):
    got, _ = _library(
        optax.chain(sam_optax.gam(**_kwargs(setting)), _base()), dtype=jnp.float64
    )
  _assert_close(got, _reference(setting), rtol=1e-10, atol=1e-12)


def test_float32_stays_float32():
  setting = SETTINGS["cifar100_resnet"]
  tx = sam_optax.gam(**_kwargs(setting))
  params = model.params(jnp.float32)
  out, state = tx.update(
      jax.grad(model.loss)(params), tx.init(params), params, loss_fn=model.loss
  )
  assert all(v.dtype == jnp.float32 for v in out.values())
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())
  # the output before the base optimizer, against the transcription
  want = _gam_step(model.start(), *setting)
  for k in want:
    np.testing.assert_allclose(np.asarray(out[k], np.float64), want[k],
                               rtol=2e-5, atol=2e-7, err_msg=k)


def test_defaults_are_the_cifar100_resnet_setting():
  sig = inspect.signature(sam_optax.gam).parameters
  defaults = (sig["rho"].default, sig["rho_prime_ratio"].default * sig["rho"].default,
              sig["beta0"].default, sig["beta1"].default, sig["gamma"].default)
  np.testing.assert_allclose(defaults, SETTINGS["cifar100_resnet"], rtol=1e-12)
  assert sig["eps"].default == EPS  # perturb_eps
  got, _ = _library(optax.chain(sam_optax.gam(), _base()))
  _assert_close(got, _reference(SETTINGS["cifar100_resnet"]))


def test_bad_options_name_the_argument():
  for name, value in (("rho_prime_ratio", -0.1), ("beta0", 1.5), ("beta1", -0.1),
                      ("gamma", -1.0), ("eps", 0.0)):
    with pytest.raises(ValueError, match=rf"`gam`: `{name}`"):
      sam_optax.gam(**{name: value})
  for rho in ("auto", sam_optax.auto_rho(), sam_optax.guarded(0.1)):
    with pytest.raises(ValueError, match=r"`gam`: `rho` must be a real number or a schedule"):
      sam_optax.gam(rho)


def test_nonfinite_perturbed_gradient_falls_back_and_the_closure_sees_finite_points():
  params = model.params()
  grads = jax.grad(model.loss)(params)
  seen = []

  def grad_fn(p):  # NaN away from params
    jax.debug.callback(lambda *x: seen.append(x), *jax.tree.leaves(p))
    moved = jnp.any(jnp.stack([jnp.any(a != b) for a, b in
                               zip(jax.tree.leaves(p), jax.tree.leaves(params))]))
    g = jax.grad(model.loss)(p)
    return jax.tree.map(lambda x: jnp.where(moved, jnp.nan, x), g)

  for policy, want in (("fallback", grads), ("skip", jax.tree.map(jnp.zeros_like, grads))):
    tx = sam_optax.gam(nonfinite=policy)
    out, state = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, grad_fn=grad_fn))(
        grads, tx.init(params), params
    )
    jax.effects_barrier()
    chex.assert_trees_all_close(out, want)
    assert int(state.nonfinite_count) == 1
  assert seen and all(np.all(np.isfinite(x)) for point in seen for x in point)


def test_axis_name_is_per_device_gam_averaged():
  """Under ``vmap`` with ``axis_name``: each member's own GAM step on its own
  loss (here the model's loss plus a member-specific quadratic), averaged,
  as the authors' ``no_sync`` passes and final all-reduce do."""
  setting = SETTINGS["strong"]
  cs = np.asarray([0.0, 0.7, 2.0])
  anchor = {k: 0.5 * np.ones_like(v) for k, v in model.start().items()}

  def member_loss(p, c):
    extra = sum(jnp.sum((p[k] - jnp.asarray(anchor[k], p[k].dtype)) ** 2) for k in p)
    return model.loss(p) + 0.5 * c * extra

  def member_grad(w, c):
    g = model.grad(w)
    return {k: g[k] + c * (w[k] - anchor[k]) for k in w}

  params = {k: jnp.asarray(v, jnp.float32) for k, v in model.start().items()}
  for sync in (False, True):
    tx = sam_optax.gam(**_kwargs(setting), axis_name="i", sync_perturbation=sync)
    state = tx.init(params)

    def member(c, tx=tx, state=state):
      loss_fn = lambda p: member_loss(p, c)  # noqa: E731
      return tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)[0]

    out = jax.jit(jax.vmap(member, axis_name="i", out_axes=None))(jnp.asarray(cs, jnp.float32))
    per_member = [
        _gam_step(model.start(), *setting, grad_of=lambda w, c=c: member_grad(w, c))
        for c in cs
    ]
    want = {k: np.mean([m[k] for m in per_member], axis=0) for k in per_member[0]}
    err = max(float(np.max(np.abs(np.asarray(out[k], np.float64) - want[k]))) for k in want)
    if sync:  # the points come from the mean gradients instead: a different rule
      assert err > 1e-4
    else:
      assert err < 2e-5 * max(np.max(np.abs(v)) for v in want.values()), err
