"""Masked SAM, SAM-ON and Fisher-mask SAM against their papers' rules (float64 NumPy).

References are written independently of the package: parameters as one flat
float64 vector, ``ε = ρ (M ⊙ g) / ‖M ⊙ g‖`` or ``ρ (M ⊙ g) / ‖g‖``, the Fisher
mask as a global top-k of squared clean gradients, ranked with NumPy.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems
from tests.reference import flat, grad_at, unflatten

LR = 0.2


def _unit(v, norm_of=None):
  n = np.linalg.norm(v if norm_of is None else norm_of)
  return v / n if n > 0 else np.zeros_like(v)


def _flat_mask(mask, params):
  """A (possibly leaf-level) boolean mask tree as one float64 0/1 vector."""
  return flat(jax.tree.map(lambda m, p: jnp.broadcast_to(jnp.asarray(m, jnp.float32), p.shape), mask, params))


def _recorded_points(tx, params, loss_fn, **kw):
  """Runs one eager update and returns the points where ``grad_fn`` was called."""
  seen = []

  def grad_fn(p):
    seen.append(jax.tree.map(np.asarray, p))
    return jax.grad(loss_fn)(p)

  grads = jax.grad(loss_fn)(params)
  out, state = tx.update(grads, tx.init(params), params, grad_fn=grad_fn, **kw)
  return seen, out, state


def _elementwise_mask(params, seed=0):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.rand(*p.shape) < 0.5), params)


LEAF_MASK = {"layer1": {"w": True, "b": False}, "layer2": (False, True), "temperature": False}


# ------------------------------------------------------------------ masked_sam

@pytest.mark.parametrize("normalize", ["masked", "full"])
@pytest.mark.parametrize("kind", ["leaf", "elementwise"])
def test_masked_sam_matches_paper(normalize, kind):
  params, loss_fn = problems.mlp_problem(seed=61)
  mask = LEAF_MASK if kind == "leaf" else _elementwise_mask(params)
  rho = 0.4
  tx = sam_optax.masked_sam(rho, mask, normalize=normalize)
  got = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn)[0])(
      jax.grad(loss_fn)(params), tx.init(params), params)
  w, g, m = flat(params), flat(jax.grad(loss_fn)(params)), _flat_mask(mask, params)
  eps = rho * _unit(m * g, norm_of=m * g if normalize == "masked" else g)
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: np.asarray(x, np.float64), got),
      unflatten(params, grad_at(loss_fn, params, w + eps)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("normalize", ["masked", "full"])
def test_masked_sam_never_moves_unmasked_entries(normalize):
  params, loss_fn = problems.mlp_problem(seed=62)
  mask = _elementwise_mask(params, seed=3)
  mask["layer2"] = (mask["layer2"][0], False)  # one whole leaf off
  rho = 0.5
  (point,), _, _ = _recorded_points(sam_optax.masked_sam(rho, mask, normalize=normalize), params, loss_fn)
  moved = flat(point) - flat(params)
  m = _flat_mask(mask, params)
  np.testing.assert_array_equal(moved[m == 0], 0.0)  # exactly unperturbed
  assert np.all(moved[m == 1] != 0.0)
  g = flat(jax.grad(loss_fn)(params))
  size = np.linalg.norm(moved)
  if normalize == "masked":
    np.testing.assert_allclose(size, rho, rtol=1e-5)
  else:
    np.testing.assert_allclose(size, rho * np.linalg.norm(m * g) / np.linalg.norm(g), rtol=1e-5)


def test_masked_sam_with_everything_selected_is_sam():
  params, loss_fn = problems.mlp_problem(seed=63)
  grads = jax.grad(loss_fn)(params)

  def run(tx):
    return tx.update(grads, tx.init(params), params, loss_fn=loss_fn)[0]

  want = run(sam_optax.sam(0.2))
  everything = jax.tree.map(lambda _: True, params)
  for tx in (sam_optax.masked_sam(0.2), sam_optax.masked_sam(0.2, everything),
             sam_optax.masked_sam(0.2, everything, normalize="full")):
    chex.assert_trees_all_close(run(tx), want, rtol=1e-6, atol=1e-7)


def test_masked_sam_callable_mask_and_inject_hyperparams():
  params, loss_fn = problems.mlp_problem(seed=64)
  fn = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
  grads = jax.grad(loss_fn)(params)

  def run(tx):
    return jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn)[0])(grads, tx.init(params), params)

  a = run(sam_optax.masked_sam(0.3, fn))
  chex.assert_trees_all_equal(a, run(sam_optax.masked_sam(0.3, fn(params))))
  injected = optax.inject_hyperparams(sam_optax.masked_sam, static_args=("mask",))(rho=0.3, mask=fn)
  chex.assert_trees_all_close(run(injected), a, rtol=1e-6, atol=1e-7)


def test_masked_sam_errors():
  params, _ = problems.mlp_problem()
  with pytest.raises(ValueError, match=r"`masked_sam`: `normalize` must be one of 'masked', 'full'; got normalize='l2'"):
    sam_optax.masked_sam(0.1, normalize="l2")
  with pytest.raises(ValueError, match=r"`mask` must be a pytree of booleans"):
    sam_optax.masked_sam(0.1, {"layer1": {"w": 1.0, "b": 0.0}, "layer2": (1, 0), "temperature": 0})
  nothing = jax.tree.map(lambda _: False, params)
  with pytest.raises(ValueError, match=r"`masked_sam`: `mask` selects no parameter"):
    sam_optax.masked_sam(0.1, nothing).init(params)
  with pytest.raises(ValueError, match=r"`mask` must have the tree structure"):
    sam_optax.masked_sam(0.1, {"layer1": True}).init(params)
  bad_shape = jax.tree.map(lambda _: True, params)
  bad_shape["layer1"]["w"] = jnp.ones((3,), bool)
  with pytest.raises(ValueError, match=r"shape \(3,\), which does not broadcast"):
    sam_optax.masked_sam(0.1, bad_shape).init(params)


# ---------------------------------------------------------------------- SAM-ON

@dataclasses.dataclass
class _Variable:  # stands in for a Flax NNX variable: its array sits under `.value`
  value: jax.Array


jax.tree_util.register_dataclass(_Variable, data_fields=["value"], meta_fields=[])


def _flax_style_params():
  """Plain nested dicts named like Flax Linen / NNX parameters (no flax needed)."""
  v = lambda *shape: jnp.ones(shape)
  return {
      "params": {
          "Conv_0": {"kernel": v(3, 3, 1, 4), "bias": v(4)},
          "BatchNorm_0": {"scale": v(4), "bias": v(4)},
          "block": [
              {"LayerNorm_3": {"scale": v(4), "bias": v(4)},
               "Dense_0": {"kernel": v(4, 4), "bias": v(4)}},
              {"GroupNorm_0": {"scale": v(4), "bias": v(4)},
               "norm": {"scale": v(4)},
               "bn1": {"scale": v(4), "bias": v(4)},
               "ln_f": {"bias": v(4)},
               "attention": {"query": {"kernel": v(4, 4), "bias": v(4)}}},
          ],
          "prenorm_block": {"Dense_1": {"kernel": v(4, 2), "bias": v(2)}},
          "normal_head": {"scale": v(2), "bias": v(2)},
          "RMSNorm_0": {"scale": v(2)},
          "Embed_0": {"embedding": v(5, 4)},
      },
      "nnx": {"bn": {"scale": _Variable(v(4)), "bias": _Variable(v(4))},
              "linear": {"bias": _Variable(v(4))}},
  }


def test_normalization_mask_on_flax_style_names():
  got = sam_optax.normalization_mask(_flax_style_params())
  want = {
      "params": {
          "Conv_0": {"kernel": False, "bias": False},
          "BatchNorm_0": {"scale": True, "bias": True},
          "block": [
              {"LayerNorm_3": {"scale": True, "bias": True},
               "Dense_0": {"kernel": False, "bias": False}},
              {"GroupNorm_0": {"scale": True, "bias": True},
               "norm": {"scale": True},
               "bn1": {"scale": True, "bias": True},
               "ln_f": {"bias": True},
               "attention": {"query": {"kernel": False, "bias": False}}},
          ],
          "prenorm_block": {"Dense_1": {"kernel": False, "bias": False}},
          "normal_head": {"scale": False, "bias": False},
          "RMSNorm_0": {"scale": True},
          "Embed_0": {"embedding": False},
      },
      "nnx": {"bn": {"scale": _Variable(True), "bias": _Variable(True)},
              "linear": {"bias": _Variable(False)}},
  }
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert jax.tree.leaves(got) == jax.tree.leaves(want)
  assert all(isinstance(x, bool) for x in jax.tree.leaves(got))


def _norm_net():
  rng = np.random.RandomState(7)
  params = {
      "Dense_0": {"kernel": jnp.asarray(rng.randn(3, 4), jnp.float32), "bias": jnp.zeros(4)},
      "LayerNorm_0": {"scale": jnp.asarray(1 + 0.1 * rng.randn(4), jnp.float32),
                      "bias": jnp.asarray(0.1 * rng.randn(4), jnp.float32)},
      "Dense_1": {"kernel": jnp.asarray(rng.randn(4, 2), jnp.float32), "bias": jnp.zeros(2)},
  }
  x = jnp.asarray(rng.randn(8, 3), jnp.float32)
  y = jnp.asarray(rng.randn(8, 2), jnp.float32)

  def loss_fn(p):
    h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)
    h = jnp.tanh(h * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"])
    return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - y) ** 2)

  return params, loss_fn


def test_sam_on_matches_paper_and_perturbs_only_normalization():
  params, loss_fn = _norm_net()
  rho = 2.0
  (point,), got, _ = _recorded_points(sam_optax.sam_on(rho), params, loss_fn)
  for name in ("Dense_0", "Dense_1"):
    chex.assert_trees_all_equal(point[name], jax.tree.map(np.asarray, params[name]))
  w, g = flat(params), flat(jax.grad(loss_fn)(params))
  m = _flat_mask(sam_optax.normalization_mask(params), params)
  eps = rho * _unit(m * g)  # SAM-ON: the norm of the normalization gradient only
  np.testing.assert_allclose(flat(point), w + eps, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: np.asarray(x, np.float64), got),
      unflatten(params, grad_at(loss_fn, params, w + eps)), rtol=1e-4, atol=1e-6)
  # The descent direction is the full gradient at the perturbed point.
  assert float(jnp.linalg.norm(got["Dense_0"]["kernel"])) > 0


def test_sam_on_without_normalization_layers_explains_the_mask():
  params, loss_fn = problems.mlp_problem()
  with pytest.raises(ValueError, match=r"`sam_on`: `mask` selects no parameter.*`normalization_mask`"):
    sam_optax.sam_on(0.5).init(params)
  explicit = {"layer1": {"w": False, "b": True}, "layer2": (False, True), "temperature": True}
  tx = sam_optax.sam_on(0.5, explicit)
  a = tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)[0]
  b = sam_optax.masked_sam(0.5, explicit)
  b = b.update(jax.grad(loss_fn)(params), b.init(params), params, loss_fn=loss_fn)[0]
  chex.assert_trees_all_equal(a, b)


# ------------------------------------------------------------ fisher_masked_sam

def _top_k(score, keep_fraction):
  """Global top-k, ties to the earlier entry, k = round(keep_fraction * n) >= 1."""
  k = max(int(np.round(keep_fraction * score.size)), 1)
  order = np.argsort(-score, kind="stable")
  mask = np.zeros(score.size)
  mask[order[:k]] = 1.0
  return mask


def _fisher_mask_reference(loss_fn, params, rho, sparsity, every, score, normalize, steps,
                           ascent_steps=1):
  """Zhong et al. / Mi et al.: M = top (1-s) of Σ g², ε = ρ M⊙g / ‖g‖ (or ‖M⊙g‖)."""
  w = flat(params)
  acc = np.zeros_like(w)
  mask = np.zeros_like(w)
  out, masks = [], []
  for t in range(steps):
    g = grad_at(loss_fn, params, w)
    acc = acc + g * g if score == "accumulated" else g * g
    if t % every == 0:
      mask = _top_k(acc, 1 - sparsity)
      acc = np.zeros_like(w)
    def direction(v, mask=mask):
      return _unit(mask * v, norm_of=mask * v if normalize == "masked" else v)

    offset = (rho / ascent_steps) * direction(g)
    for _ in range(ascent_steps - 1):
      offset = offset + (rho / ascent_steps) * direction(grad_at(loss_fn, params, w + offset))
    w = w - LR * grad_at(loss_fn, params, w + offset)
    out.append(w)
    masks.append(mask)
  return out, masks


def _mask_of(state):
  """The Fisher mask found anywhere in an optimizer state, as a flat 0/1 vector."""
  found = [
      x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, sam_optax.FisherMaskState))
      if isinstance(x, sam_optax.FisherMaskState)
  ]
  return flat(jax.tree.map(lambda m: m.astype(jnp.float32), found[0].mask))


def _fisher_run(tx, params, loss_fn, steps):
  chained = optax.chain(tx, optax.sgd(LR))

  @jax.jit
  def step(p, s):
    updates, s = chained.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, updates), s

  p, s = params, chained.init(params)
  out, masks = [], []
  for _ in range(steps):
    p, s = step(p, s)
    out.append(flat(p))
    masks.append(_mask_of(s))
  return out, masks


@pytest.mark.parametrize("score", ["accumulated", "current"])
@pytest.mark.parametrize("normalize", ["full", "masked"])
def test_fisher_masked_sam_matches_reference_over_steps(score, normalize):
  params, loss_fn = problems.mlp_problem(seed=65)
  rho, sparsity, every, steps = 0.5, 0.7, 3, 8
  tx = sam_optax.fisher_masked_sam(rho, sparsity, every, score=score, normalize=normalize)
  got, got_masks = _fisher_run(tx, params, loss_fn, steps)
  want, want_masks = _fisher_mask_reference(
      loss_fn, params, rho, sparsity, every, score, normalize, steps)
  for t in range(steps):
    np.testing.assert_array_equal(got_masks[t], want_masks[t], err_msg=f"mask at step {t}")
    np.testing.assert_allclose(got[t], want[t], rtol=2e-4, atol=2e-5, err_msg=f"step {t}")


def test_fisher_mask_changes_only_at_refresh_steps_and_keeps_the_fraction():
  params, loss_fn = problems.mlp_problem(seed=66)
  n = flat(params).size  # 76 entries
  sparsity, every, steps = 0.8, 4, 11
  _, masks = _fisher_run(
      sam_optax.fisher_masked_sam(0.5, sparsity, every), params, loss_fn, steps)
  for t, m in enumerate(masks):
    assert m.sum() == round((1 - sparsity) * n)  # 15 of 76
    if t % every:
      np.testing.assert_array_equal(m, masks[t - 1], err_msg=f"step {t} is not a refresh")
  changed = [t for t in range(1, steps) if not np.array_equal(masks[t], masks[t - 1])]
  assert changed and set(changed) <= {4, 8}


def test_fisher_mask_keeps_at_least_one_entry():
  # 76 entries at sparsity 0.995: round(0.38) = 0, yet the mask keeps the
  # entry of largest g², so the second pass still perturbs something.
  params, loss_fn = problems.mlp_problem(seed=67)
  _, masks = _fisher_run(
      sam_optax.fisher_masked_sam(0.5, 0.995, 1, score="current"), params, loss_fn, 2)
  g2 = flat(jax.grad(loss_fn)(params)) ** 2
  np.testing.assert_array_equal(masks[0], _top_k(g2, 0.005))
  assert masks[0].sum() == 1 and masks[0][np.argmax(g2)] == 1


def test_fisher_mask_ties_go_to_the_earlier_entry():
  params = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4), "c": jnp.zeros(())}
  loss_fn = lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(p))  # every g_i = 1
  tx = sam_optax.fisher_masked_sam(0.1, sparsity=0.5, refresh_every=1, score="current")
  (point,), _, state = _recorded_points(tx, params, loss_fn)
  want = np.zeros(11)
  want[:6] = 1.0  # round(0.5 * 11) = 6: leaf "a" (first in leaves order)
  np.testing.assert_array_equal(_mask_of(state), want)
  np.testing.assert_array_equal(flat(point) != 0, want == 1)  # perturbed from step 0 on


def test_fisher_mask_two_ascent_steps_use_this_steps_mask():
  params, loss_fn = problems.mlp_problem(seed=67)
  tx = sam_optax.fisher_masked_sam(0.5, 0.6, 2, num_ascent_steps=2)
  got, _ = _fisher_run(tx, params, loss_fn, 4)
  want, _ = _fisher_mask_reference(loss_fn, params, 0.5, 0.6, 2, "accumulated", "full", 4,
                                   ascent_steps=2)
  for t in range(4):
    np.testing.assert_allclose(got[t], want[t], rtol=2e-4, atol=2e-5, err_msg=f"step {t}")


def test_fisher_mask_extreme_sparsities():
  params, loss_fn = problems.mlp_problem(seed=68)
  grads = jax.grad(loss_fn)(params)

  def run(tx):
    return tx.update(grads, tx.init(params), params, loss_fn=loss_fn)[0]

  chex.assert_trees_all_close(run(sam_optax.fisher_masked_sam(0.2, sparsity=0.0)),
                              run(sam_optax.sam(0.2)), rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(run(sam_optax.fisher_masked_sam(0.2, sparsity=1.0)), grads,
                              rtol=1e-6, atol=1e-7)


def test_fisher_mask_with_traced_hyperparameters():
  params, loss_fn = problems.mlp_problem(seed=69)
  injected = optax.inject_hyperparams(sam_optax.fisher_masked_sam)(
      rho=0.5, sparsity=0.7, refresh_every=3)
  plain = sam_optax.fisher_masked_sam(0.5, 0.7, 3)
  a, _ = _fisher_run(injected, params, loss_fn, 5)
  b, _ = _fisher_run(plain, params, loss_fn, 5)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  # The injected refresh period can be changed between steps without re-tracing.
  tx = optax.chain(injected, optax.sgd(LR))
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn))
  p, s = params, tx.init(params)
  for t in range(2):
    if t == 1:
      s[0].hyperparams["refresh_every"] = jnp.asarray(1)
    updates, s = step(p, s)
    p = optax.apply_updates(p, updates)
  assert step._cache_size() == 1
  want, _ = _fisher_run(sam_optax.fisher_masked_sam(0.5, 0.7, 1), params, loss_fn, 2)
  np.testing.assert_allclose(flat(p), want[-1], rtol=1e-6, atol=1e-7)
  stale, _ = _fisher_run(plain, params, loss_fn, 2)
  assert not np.allclose(stale[-1], want[-1], rtol=1e-6, atol=1e-7)


def test_fisher_mask_errors():
  with pytest.raises(ValueError, match=r"`fisher_masked_sam`: `sparsity` must lie in \[0, 1\]; got sparsity=1.5"):
    sam_optax.fisher_masked_sam(0.1, sparsity=1.5)
  with pytest.raises(ValueError, match=r"`refresh_every` must be an integer >= 1; got refresh_every=0"):
    sam_optax.fisher_masked_sam(0.1, refresh_every=0)
  with pytest.raises(ValueError, match=r"`score` must be one of 'accumulated', 'current'; got score='ema'"):
    sam_optax.fisher_masked_sam(0.1, score="ema")
  params, loss_fn = problems.mlp_problem()
  tx = sam_optax.fisher_masked_sam(0.1)
  with pytest.raises(ValueError, match=r"does not have the tree structure"):
    tx.update({"x": jnp.ones(2)}, tx.init(params), params, loss_fn=loss_fn)
