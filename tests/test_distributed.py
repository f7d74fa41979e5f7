"""Data-parallel SAM on 8 fake CPU devices, against a loop over shards.

The reference (float64 NumPy, one device) splits the batch into shards, forms
groups of shards, builds one perturbation per group from the group's mean
clean gradient, takes every shard's gradient at its group's perturbed point
and averages over all shards: per-device SAM is groups of one, synchronized
SAM is one group of all.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from tests import problems
from tests.reference import flat, grad_at, unflatten

N = 8  # devices
PER = 4  # examples per device
RHO = 0.3


def _batch(dtype=jnp.float32, n=N * PER):
  return problems.mlp_batch(seed=3, n=n, dtype=dtype)


def _shard_loss(batch, s, per=PER):
  x, y = batch
  part = (x[s * per:(s + 1) * per], y[s * per:(s + 1) * per])
  return lambda p: problems.mlp_loss(p, part)


def grouped_reference(params, batch, rho, groups, perturb=None, per=PER):
  """Mean over shards of ∇L_s(w + ε_{group(s)}), ε from the group mean."""
  if perturb is None:
    perturb = lambda g, w: rho * g / np.linalg.norm(g)  # noqa: E731
  w = flat(params)
  shards = [s for group in groups for s in group]
  grads = {s: grad_at(_shard_loss(batch, s, per), params, w) for s in shards}
  out = np.zeros_like(w)
  for group in groups:
    g = np.mean([grads[s] for s in group], axis=0)
    eps = perturb(g, w)
    for s in group:
      out += grad_at(_shard_loss(batch, s, per), params, w + eps)
  return out / len(shards)


def _groups(mode, n=N):
  if mode == "per_device":
    return [[s] for s in range(n)]
  if mode == "sync":
    return [list(range(n))]
  m = int(mode.split("=")[1])
  return [list(range(i, i + m)) for i in range(0, n, m)]


def _options(mode):
  if mode == "per_device":
    return {}
  if mode == "sync":
    return {"sync_perturbation": True}
  return {"group_size": int(mode.split("=")[1])}


def _mesh():
  return jax.make_mesh((N,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))


def _shard_map_update(tx, *, check_vma=True, cast=True):
  """One ``tx.update`` per device inside ``jax.shard_map``."""

  def local(params, state, x, y):
    loss_fn = lambda p: problems.mlp_loss(p, (x, y))  # noqa: E731
    at = jax.lax.pcast(params, "batch", to="varying") if cast else params
    grads = jax.grad(loss_fn)(at)
    return tx.update(grads, state, params, loss_fn=loss_fn)

  return jax.jit(
      jax.shard_map(
          local,
          mesh=_mesh(),
          in_specs=(P(), P(), P("batch"), P("batch")),
          out_specs=(P(), P()),
          check_vma=check_vma,
      )
  )


MODES = ("per_device", "sync", "group=2", "group=4")


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_shard_map_matches_grouped_reference(mode, check_vma):
  params, batch = problems.mlp_params(0), _batch()
  tx = sam_optax.sam(RHO, axis_name="batch", **_options(mode))
  update = _shard_map_update(tx, check_vma=check_vma, cast=check_vma)
  out, state = update(params, tx.init(params), *batch)
  expected = grouped_reference(params, batch, RHO, _groups(mode))
  np.testing.assert_allclose(flat(out), expected, rtol=2e-4, atol=1e-6)
  assert int(state.count) == 1
  assert float(state.stats.pass_taken) == 1.0


def test_modes_differ():
  """The three modes are different computations on this problem."""
  params, batch = problems.mlp_params(0), _batch()
  per_device, sync, pairs = (
      grouped_reference(params, batch, RHO, _groups(m))
      for m in ("per_device", "sync", "group=2")
  )
  for a, b in ((per_device, sync), (per_device, pairs), (sync, pairs)):
    assert np.linalg.norm(a - b) > 1e-3 * np.linalg.norm(a)


def test_shard_map_replicated_gradient_is_rejected():
  """check_vma=True sums the gradient of replicated params: a clear error."""
  params, batch = problems.mlp_params(0), _batch()
  tx = sam_optax.sam(RHO, axis_name="batch")
  update = _shard_map_update(tx, check_vma=True, cast=False)
  with pytest.raises(ValueError, match=r"pcast\(params, 'batch', to='varying'\)"):
    update(params, tx.init(params), *batch)


@pytest.mark.parametrize("mode", ["per_device", "sync", "group=4"])
def test_pmap_matches_grouped_reference(mode):
  params, batch = problems.mlp_params(0), _batch()
  tx = sam_optax.sam(RHO, axis_name="i", **_options(mode))

  def local(params, state, x, y):
    loss_fn = lambda p: problems.mlp_loss(p, (x, y))  # noqa: E731
    return tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)

  x, y = batch
  out, state = jax.pmap(local, axis_name="i", in_axes=(None, None, 0, 0))(
      params, tx.init(params), x.reshape(N, PER, -1), y.reshape(N, PER)
  )
  expected = grouped_reference(params, batch, RHO, _groups(mode))
  for d in range(N):  # every replica holds the same update and state
    np.testing.assert_allclose(
        flat(jax.tree.map(lambda a: a[d], out)), expected, rtol=2e-4, atol=1e-6
    )
  chex.assert_trees_all_equal(
      jax.tree.map(lambda a: a[0], state), jax.tree.map(lambda a: a[-1], state)
  )


def _microbatch_step(tx, groups):
  """m-sharpness on one device: the batch as ``groups`` vmapped micro-batches."""

  def step(params, state, x, y):
    x = x.reshape(groups, -1, *x.shape[1:])
    y = y.reshape(groups, -1)

    def member(x, y):
      loss_fn = lambda p: problems.mlp_loss(p, (x, y))  # noqa: E731
      grads = jax.grad(loss_fn)(params)
      return tx.update(grads, state, params, loss_fn=loss_fn)

    return jax.vmap(member, axis_name="micro", out_axes=None)(x, y)

  return step


@pytest.mark.parametrize("members,mode", [(6, "per_device"), (6, "group=3"), (6, "group=2"), (4, "sync")])
def test_vmap_microbatches_match_grouped_reference(members, mode):
  """Ring (group of 3) and doubling (group of 2) exchanges, and the extremes."""
  per = 4
  params, batch = problems.mlp_params(1), _batch(n=members * per)
  tx = sam_optax.sam(RHO, axis_name="micro", **_options(mode))
  step = jax.jit(_microbatch_step(tx, members))
  out, _ = step(params, tx.init(params), *batch)
  expected = grouped_reference(
      params, batch, RHO, _groups(mode, members), per=per
  )
  np.testing.assert_allclose(flat(out), expected, rtol=2e-4, atol=1e-6)


def test_vmap_microbatches_cost_two_passes():
  """Clean and perturbed passes of the micro-batches: 2x a plain gradient."""
  params, batch = problems.mlp_params(1), _batch(n=256)
  tx = sam_optax.sam(RHO, axis_name="micro")
  step = _microbatch_step(tx, 8)

  def plain(params, x, y):
    return jax.grad(lambda p: problems.mlp_loss(p, (x, y)))(params)

  def flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

  ratio = flops(step, params, tx.init(params), *batch) / flops(plain, params, *batch)
  assert 1.8 < ratio < 2.3, ratio


def test_training_under_shard_map_matches_reference():
  """Three chained steps; params and state stay replicated."""
  params, batch = problems.mlp_params(0), _batch()
  base = optax.sgd(0.1, momentum=0.9)
  tx = optax.chain(sam_optax.sam(RHO, axis_name="batch"), base)
  update = _shard_map_update(tx)
  ref_params, ref_state = params, base.init(params)
  state = tx.init(params)
  for _ in range(3):
    u = grouped_reference(ref_params, batch, RHO, _groups("per_device"))
    updates, ref_state = base.update(
        unflatten(ref_params, u), ref_state, ref_params
    )
    ref_params = optax.apply_updates(ref_params, updates)
    updates, state = update(params, state, *batch)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(flat(params), flat(ref_params), rtol=2e-4, atol=1e-6)
  assert int(sam_optax.sam_stats(state).pass_taken) == 1


def test_asam_under_shard_map():
  params, batch = problems.mlp_params(0), _batch()
  eta = 0.01
  tx = sam_optax.asam(RHO, eta=eta, axis_name="batch")
  out, _ = _shard_map_update(tx)(params, tx.init(params), *batch)

  def perturb(g, w):
    t = np.abs(w) + eta
    return RHO * t * t * g / np.linalg.norm(t * g)

  expected = grouped_reference(params, batch, RHO, _groups("per_device"), perturb)
  np.testing.assert_allclose(flat(out), expected, rtol=2e-4, atol=1e-6)


def test_bfloat16_under_shard_map():
  params = problems.mlp_params(0, jnp.bfloat16)
  batch = _batch(jnp.bfloat16)
  tx = sam_optax.sam(RHO, axis_name="batch")
  out, _ = _shard_map_update(tx)(params, tx.init(params), *batch)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(out))
  expected = grouped_reference(
      problems.mlp_params(0), _batch(), RHO, _groups("per_device")
  )
  got = flat(out)
  assert np.linalg.norm(got - expected) < 0.05 * np.linalg.norm(expected)


def test_stateful_variant_state_stays_replicated():
  """LookSAM's stored direction is agreed on; with k=1 it equals SAM."""
  params, batch = problems.mlp_params(0), _batch()
  look = sam_optax.looksam(RHO, k=1, axis_name="batch")
  out, state = _shard_map_update(look)(params, look.init(params), *batch)
  expected = grouped_reference(params, batch, RHO, _groups("per_device"))
  np.testing.assert_allclose(flat(out), expected, rtol=2e-4, atol=1e-6)
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.is_fully_replicated


def _fsdp_spec(x):
  """Shard the first axis divisible by the device count; else replicate."""
  for i, d in enumerate(np.shape(x)):
    if d % N == 0:
      return P(*([None] * i + ["fsdp"]))
  return P()


def _fsdp_problem():
  rng = np.random.RandomState(0)
  params = {
      "w1": jnp.asarray(rng.randn(16, 64) / 4, jnp.float32),
      "b1": jnp.zeros((64,), jnp.float32),
      "w2": jnp.asarray(rng.randn(64, 8) / 8, jnp.float32),
      "b2": jnp.zeros((3,), jnp.float32) + 0.1,
  }
  x = jnp.asarray(rng.randn(64, 16), jnp.float32)
  y = jnp.asarray(rng.randint(0, 8, 64))

  def loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + jnp.pad(p["b2"], (0, 5))  # b2: replicated
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, x, y, loss


def _fsdp_step(tx, loss):
  def step(params, state, x, y):
    loss_fn = lambda p: loss(p, x, y)  # noqa: E731
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  return step


def test_fsdp_sharded_jit_matches_single_device_and_keeps_shardings():
  params, x, y, loss = _fsdp_problem()
  tx = optax.chain(sam_optax.sam(RHO), optax.adam(1e-2))
  step = jax.jit(_fsdp_step(tx, loss))
  ref_params, ref_state = params, tx.init(params)
  for _ in range(3):
    ref_params, ref_state = step(ref_params, ref_state, x, y)

  mesh = jax.make_mesh((N,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  shard = lambda a: jax.device_put(a, NamedSharding(mesh, _fsdp_spec(a)))  # noqa: E731
  p = jax.tree.map(shard, params)
  xs = jax.device_put(x, NamedSharding(mesh, P("fsdp")))
  ys = jax.device_put(y, NamedSharding(mesh, P("fsdp")))
  state = jax.jit(tx.init)(p)
  first = None
  for _ in range(3):
    p, state = step(p, state, xs, ys)
    shardings = jax.tree.map(lambda a: a.sharding, (p, state))
    if first is None:
      first = shardings
    assert shardings == first  # stable from step to step
  for leaf, ref in zip(jax.tree.leaves(p), jax.tree.leaves(params)):
    assert leaf.sharding.spec == _fsdp_spec(ref)
  # Adam's moments are sharded like the parameters they belong to.
  mu = state[1][0].mu
  for leaf, ref in zip(jax.tree.leaves(mu), jax.tree.leaves(params)):
    assert leaf.sharding.is_equivalent_to(
        NamedSharding(mesh, _fsdp_spec(ref)), ref.ndim
    )
  np.testing.assert_allclose(flat(p), flat(ref_params), rtol=1e-4, atol=1e-6)


def _all_gathered_elements(tx, loss, params, x, y, mesh):
  shard = lambda a: jax.device_put(a, NamedSharding(mesh, _fsdp_spec(a)))  # noqa: E731
  p = jax.tree.map(shard, params)
  xs = jax.device_put(x, NamedSharding(mesh, P("fsdp")))
  ys = jax.device_put(y, NamedSharding(mesh, P("fsdp")))
  state = jax.jit(tx.init)(p)
  hlo = jax.jit(_fsdp_step(tx, loss)).lower(p, state, xs, ys).compile().as_text()
  total = 0
  for shape in re.findall(r"= \w+\[([\d,]*)\][^\n]*? all-gather\(", hlo):
    total += int(np.prod([int(d) for d in shape.split(",") if d]))
  return total


def test_fsdp_sam_gathers_no_more_than_two_base_steps():
  """SAM's own work (norms, ε, w + ε) gathers no parameters."""
  params, x, y, loss = _fsdp_problem()
  mesh = jax.make_mesh((N,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  base = optax.adam(1e-2)
  base_elems = _all_gathered_elements(base, loss, params, x, y, mesh)
  sam_elems = _all_gathered_elements(
      optax.chain(sam_optax.sam(RHO), base), loss, params, x, y, mesh
  )
  assert base_elems > 0  # the forward pass gathers the sharded weights
  assert sam_elems <= 2 * base_elems, (sam_elems, base_elems)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sync_perturbation": True}, "need `axis_name`"),
        ({"group_size": 2}, "need `axis_name`"),
        ({"axis_name": "b", "group_size": 0}, "group_size"),
        ({"axis_name": "b", "group_size": 2, "sync_perturbation": True}, "not both"),
        ({"axis_name": 3}, "axis_name"),
        ({"axis_name": "b", "sync_perturbation": 1}, "sync_perturbation"),
    ],
)
def test_bad_distributed_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sam_optax.sam(0.1, **kwargs)


def test_group_size_must_divide_axis():
  params, batch = problems.mlp_params(0), _batch()
  tx = sam_optax.sam(RHO, axis_name="batch", group_size=3)
  with pytest.raises(ValueError, match="must divide"):
    _shard_map_update(tx)(params, tx.init(params), *batch)


# ------------------------------------------- stateful variants under shard_map
# Each member builds its perturbation from its (group's) clean gradient and the
# agreed state, then updates that state locally; the agreed state for the next
# step is the mean of the members' float states (booleans from member 0).


def _unit(v):
  n = np.linalg.norm(v)
  return v / n if n > 0 else np.zeros_like(v)


class _VaSSO:
  """Li & Giannakis 2023: d_t = (1-θ) d_{t-1} + θ g_t (d_0 = g_0)."""

  theta = 0.9
  make = staticmethod(lambda **kw: sam_optax.vasso(RHO, theta=0.9, **kw))

  def init(self, n):
    return {"d": np.zeros(n)}

  def direction(self, t, g, st):
    d = g if t == 0 else (1 - self.theta) * st["d"] + self.theta * g
    return {"d": d}, _unit(d)

  def combine(self, t, g, g_p, st):
    return g_p, st

  @staticmethod
  def library_state(state):
    return {"d": flat(state.variant.perturbation.d)}


class _FriendlySAM:
  """Li et al. 2024: d = g - σ m_{t-1}, m_t = λ m_{t-1} + (1-λ) g (d = m = g at 0)."""

  sigma, lam = 1.0, 0.6
  make = staticmethod(lambda **kw: sam_optax.friendly_sam(RHO, sigma=1.0, lam=0.6, **kw))

  def init(self, n):
    return {"m": np.zeros(n)}

  def direction(self, t, g, st):
    if t == 0:
      return {"m": g}, _unit(g)
    m = self.lam * st["m"] + (1 - self.lam) * g
    return {"m": m}, _unit(g - self.sigma * st["m"])

  def combine(self, t, g, g_p, st):
    return g_p, st

  @staticmethod
  def library_state(state):
    return {"m": flat(state.variant.perturbation.momentum)}


class _LookSAM:
  """Liu et al. 2022 with k = 2: g_v stored on steps 0, 2, ...; reused between."""

  k, alpha = 2, 0.7
  make = staticmethod(lambda **kw: sam_optax.looksam(RHO, k=2, alpha=0.7, **kw))

  def init(self, n):
    return {"g_v": np.zeros(n)}

  def direction(self, t, g, st):
    return st, (_unit(g) if t % self.k == 0 else None)

  def combine(self, t, g, g_p, st):
    if g_p is None:
      g_v = st["g_v"]
      return g + self.alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v, st
    return g_p, {"g_v": g_p - (g_p @ g) / (g @ g) * g}

  @staticmethod
  def library_state(state):
    return {"g_v": flat(state.variant.direction.g_v)}


class _FisherMask:
  """Zhong et al. 2022: M = top half of Σ g² since the last refresh (every 2 steps)."""

  every = 2
  make = staticmethod(
      lambda **kw: sam_optax.fisher_masked_sam(RHO, sparsity=0.5, refresh_every=2, **kw)
  )

  def init(self, n):
    return {"mask": np.zeros(n), "score": np.zeros(n)}

  def direction(self, t, g, st):
    score, mask = st["score"] + g * g, st["mask"]
    if t % self.every == 0:
      k = int(np.round(0.5 * score.size))
      mask = np.zeros(score.size)
      mask[np.argsort(-score, kind="stable")[:k]] = 1.0
      score = np.zeros_like(score)
    return {"mask": mask, "score": score}, mask * g / np.linalg.norm(g)

  def combine(self, t, g, g_p, st):
    return g_p, st

  @staticmethod
  def library_state(state):
    s = state.variant.perturbation
    return {
        "mask": flat(jax.tree.map(lambda m: m.astype(jnp.float32), s.mask)),
        "score": flat(s.score),
    }


STATEFUL = {"vasso": _VaSSO, "friendly_sam": _FriendlySAM, "looksam": _LookSAM,
            "fisher_masked_sam": _FisherMask}
STATEFUL_LR = 0.2


def stateful_reference(variant, params, batch, groups, steps, per=PER):
  """Outputs and agreed states of ``steps`` steps with ``w ← w − lr u`` (float64)."""
  w = flat(params)
  state = variant.init(w.size)
  shards = [s for group in groups for s in group]
  outs, states = [], []
  for t in range(steps):
    local = {s: grad_at(_shard_loss(batch, s, per), params, w) for s in shards}
    total, members = np.zeros_like(w), []
    for group in groups:
      g = np.mean([local[s] for s in group], axis=0)
      member, d = variant.direction(t, g, state)
      for s in group:
        g_p = None if d is None else grad_at(_shard_loss(batch, s, per), params, w + RHO * d)
        out, new = variant.combine(t, g, g_p, member)
        total += out
        members.append(new)
    state = {
        key: members[0][key] if key == "mask" else np.mean([m[key] for m in members], axis=0)
        for key in state
    }
    u = total / len(shards)
    outs.append(u)
    states.append(state)
    w = w - STATEFUL_LR * u
  return outs, states


@pytest.mark.parametrize("mode", ["per_device", "group=2"])
@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_stateful_variants_under_shard_map_match_per_shard_reference(name, mode):
  """Three steps: the outputs and the agreed state (the members' mean)."""
  variant = STATEFUL[name]()
  params, batch = problems.mlp_params(2), _batch()
  tx = variant.make(axis_name="batch", **_options(mode))
  update = _shard_map_update(tx)
  want_u, want_state = stateful_reference(variant, params, batch, _groups(mode), 3)
  state = tx.init(params)
  for t in range(3):
    u, state = update(params, state, *batch)
    msg = f"{name}/{mode}, step {t}"
    np.testing.assert_allclose(flat(u), want_u[t], rtol=1e-4, atol=1e-6, err_msg=msg)
    got = variant.library_state(state)
    assert set(got) == set(want_state[t])
    for key in got:
      np.testing.assert_allclose(
          got[key], want_state[t][key], rtol=1e-4, atol=1e-6, err_msg=f"{msg}: {key}"
      )
    assert int(state.nonfinite_count) == 0
    for leaf in jax.tree.leaves(state):
      assert leaf.sharding.is_fully_replicated
    params = jax.tree.map(lambda p, x: p - STATEFUL_LR * x, params, u)


def test_the_members_states_differ_so_the_mean_matters():
  """Per-device VaSSO averages differ from member 0's: the agreed mean is testable."""
  variant = _VaSSO()
  params, batch = problems.mlp_params(2), _batch()
  g0 = grad_at(_shard_loss(batch, 0), params, flat(params))
  _, states = stateful_reference(variant, params, batch, _groups("per_device"), 1)
  assert np.linalg.norm(states[0]["d"] - g0) > 0.1 * np.linalg.norm(g0)


# ------------------------------------------------- rho="auto" under shard_map


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("mode", ["per_device", "sync", "group=2"])
def test_auto_rho_under_shard_map_agrees_on_the_law_of_the_mean_change(mode, check_vma):
  """Two steps: the output at the radius in force, the radius from mean c."""
  params, batch = problems.mlp_params(0), _batch()
  tx = sam_optax.sam("auto", axis_name="batch", **_options(mode))
  update = _shard_map_update(tx, check_vma=check_vma, cast=check_vma)
  law = sam_optax.auto_rho()
  state, log_rho, n = tx.init(params), np.log(law.init), 0
  for _ in range(2):
    rho = float(np.exp(log_rho))
    out, state = update(params, state, *batch)
    expected = grouped_reference(params, batch, rho, _groups(mode))
    np.testing.assert_allclose(flat(out), expected, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(float(state.stats.rho), rho, rtol=1e-5)
    # Each shard's change between its own clean gradient and its perturbed one.
    w, changes = flat(params), []
    for group in _groups(mode):
      g = np.mean([grad_at(_shard_loss(batch, s), params, w) for s in group], 0)
      for s in group:
        g_s = grad_at(_shard_loss(batch, s), params, w)
        g_p = grad_at(_shard_loss(batch, s), params, w + rho * g / np.linalg.norm(g))
        changes.append(np.linalg.norm(g_p - g_s) / np.linalg.norm(g_s))
    c = float(np.mean(changes))
    n += 1
    new = log_rho + max(law.gain, 1.0 / n) * (np.log(law.target) - np.log(c))
    log_rho = min(new, log_rho) + np.log(law.backoff) if c > law.threshold else new
    np.testing.assert_allclose(float(state.stats.grad_change), c, rtol=1e-3)
    np.testing.assert_allclose(float(state.radius.log_scale), log_rho, rtol=1e-4)
