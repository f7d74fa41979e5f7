"""The README's and the documentation's code runs as printed, and does what
its text says.

Each block is taken from ``README.md`` or a page under ``docs/`` by a line it
contains, executed in a namespace that defines what the surrounding prose
assumes (a model, a batch), and its result compared with an independent
reference where it computes one. A block printed on several pages (the
quickstart is in the README and in the getting-started page) must be the
same text everywhere. ``tests/test_docs.py`` checks that every block of the
README and the guide is claimed by a test here or in ``test_docs_*.py``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

import sam_optax
from tests.doc_blocks import python_blocks
from tests.reference import sam_gradient

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Pages whose blocks other modules run: the variant family pages
# (tests/test_docs_variants.py) and the migration guides
# (tests/test_docs_migration.py).
OWN_TESTS = {
    "variants/geometry.md", "variants/sparse.md", "variants/directions.md",
    "variants/efficient.md", "variants/full_optimizers.md",
    "migration/optax_contrib.md", "migration/pytorch_sam.md",
}
SOURCES = [ROOT / "README.md"] + sorted(
    p for p in (ROOT / "docs").rglob("*.md")
    if "_build" not in p.parts
    and p.relative_to(ROOT / "docs").as_posix() not in OWN_TESTS)


# Identical blocks on several pages count once.
BLOCKS = list(dict.fromkeys(b for p in SOURCES for b in python_blocks(p)))
HEADLINE = python_blocks(ROOT / "README.md")[0]


def _block(anchor: str) -> str:
  """The one Python block of the README and the docs that contains ``anchor``."""
  found = [b for b in BLOCKS if anchor in b]
  assert len(found) == 1, f"{len(found)} distinct blocks contain {anchor!r}"
  return found[0]


def _run(anchor: str, namespace: dict[str, Any]) -> dict[str, Any]:
  exec(compile(_block(anchor), f"docs<{anchor}>", "exec"), namespace)  # noqa: S102
  return namespace


def _mlp_namespace() -> dict[str, Any]:
  """A small MLP, its parameters and a batch, as the docs' prose assumes."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {
      "w1": jax.random.normal(k1, (8, 16)) * 0.3, "b1": jnp.zeros(16),
      "w2": jax.random.normal(k2, (16, 3)) * 0.3, "b2": jnp.zeros(3),
  }

  def model_apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

  def loss(p, x, y):
    logits = model_apply(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  x = jax.random.normal(k3, (32, 8))
  y = jnp.arange(32) % 3
  return {
      "jax": jax, "jnp": jnp, "optax": optax, "sam_optax": sam_optax,
      "P": PartitionSpec, "params": params, "model_apply": model_apply,
      "loss": loss, "x": x, "y": y, "batch": (x, y),
  }


def test_quickstart_trains_and_matches_the_two_pass_step():
  ns = _run("def train_step(params, opt_state, batch):", _mlp_namespace())
  assert HEADLINE in _block("def train_step(params, opt_state, batch):")  # the headline
  params, opt_state, batch = ns["params"], ns["opt_state"], ns["batch"]
  loss_fn = lambda p: ns["loss_on"](p, batch)  # noqa: E731
  # First step: SGD momentum from zero state moves by −0.1 u, u the SAM gradient.
  new_params, opt_state, first = ns["train_step"](params, opt_state, batch)
  want = jax.tree.map(lambda w, u: w - 0.1 * u, params, sam_gradient(loss_fn, params, 0.05))
  chex.assert_trees_all_close(new_params, want, rtol=1e-5, atol=1e-6)
  for _ in range(30):
    new_params, opt_state, last = ns["train_step"](new_params, opt_state, batch)
  assert float(last) < 0.5 * float(first)


def test_sam_stats_snippet_prints_the_last_steps_clean_norm_and_perturbed_loss(capsys):
  ns = _run("def train_step(params, opt_state, batch):", _mlp_namespace())
  params, batch = ns["params"], ns["batch"]
  _, ns["opt_state"], _ = ns["train_step"](params, ns["opt_state"], batch)
  _run("loss at w + eps", ns)
  loss_fn = lambda p: ns["loss_on"](p, batch)  # noqa: E731
  g = jax.grad(loss_fn)(params)
  norm = float(jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g))))
  eps = jax.tree.map(lambda v: 0.05 * v / norm, g)
  perturbed = float(loss_fn(jax.tree.map(jnp.add, params, eps)))
  assert capsys.readouterr().out.strip() == (
      f"clean |g| {norm:.4f}, loss at w + eps {perturbed:.4f}")


def test_sharpness_aware_composition_takes_the_pass_every_fifth_step():
  ns = _run("policy=sam_optax.policies.every(5)", _mlp_namespace())
  tx, params = ns["tx"], ns["params"]
  loss_fn = lambda p: ns["loss"](p, ns["x"], ns["y"])  # noqa: E731
  state = tx.init(params)
  taken = []
  for _ in range(6):
    _, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    taken.append(float(sam_optax.sam_stats(state).pass_taken))
  assert taken == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_shard_map_snippet_is_per_device_sam():
  ns = _run("jax.shard_map(local_step", _mlp_namespace())
  params, x, y, n = ns["params"], ns["x"], ns["y"], jax.device_count()
  new_params, _ = ns["step"](params, ns["tx"].init(params), x, y)
  # Per device: its own ε and perturbed gradient; their mean drives SGD.
  shards = [
      sam_gradient(lambda p, i=i: ns["loss"](p, *(a.reshape(n, -1, *a.shape[1:])[i] for a in (x, y))),
                   params, 0.05)
      for i in range(n)
  ]
  mean = jax.tree.map(lambda *g: sum(g) / n, *shards)
  want = jax.tree.map(lambda w, u: w - 0.1 * u, params, mean)
  chex.assert_trees_all_close(new_params, want, rtol=1e-5, atol=1e-6)


def test_vmap_snippet_is_m_sharpness_on_one_device():
  ns = _run('jax.vmap(member, axis_name="micro"', _mlp_namespace())
  params, groups = ns["params"], 4
  xg, yg = ns["x"].reshape(groups, 8, 8), ns["y"].reshape(groups, 8)
  updates, _ = ns["update"](params, ns["tx"].init(params), xg, yg)
  shards = [sam_gradient(lambda p, i=i: ns["loss"](p, xg[i], yg[i]), params, 0.05)
            for i in range(groups)]
  want = jax.tree.map(lambda *g: sum(g) / groups, *shards)
  chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-6)


def test_sharpness_diagnostics_snippet(monkeypatch):
  pytest.importorskip("matplotlib")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  ns = _mlp_namespace()
  ns["loss_on"] = lambda p, x, y: ns["loss"](p, x, y)
  ns["x_train"], ns["y_train"] = ns["x"], ns["y"]
  _run("sharpness.hessian_top_eigenvalue(", ns)
  flat, unravel = jax.flatten_util.ravel_pytree(ns["params"])
  hessian = jax.hessian(lambda v: ns["loss_fn"](unravel(v)))(flat)
  exact = np.sort(np.linalg.eigvalsh(np.asarray(hessian, np.float64)))[::-1]
  np.testing.assert_allclose(np.asarray(ns["top"].eigenvalues), exact[:3], rtol=1e-3, atol=1e-5)
  assert float(ns["worst"].sharpness) >= 0.0
  import matplotlib.pyplot as plt  # noqa: PLC0415

  plt.close("all")


# ------------------------------------------------------------------- Flax

flax = pytest.importorskip("flax")


def _linen_namespace() -> dict[str, Any]:
  import flax.linen as nn  # noqa: PLC0415

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x))
      x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
      return nn.Dense(3)(x)

  model = Net()
  x = jax.random.normal(jax.random.key(1), (32, 8))
  y = jnp.arange(32) % 3
  variables = model.init(jax.random.key(0), x, train=False)
  return {
      "jax": jax, "jnp": jnp, "optax": optax, "sam_optax": sam_optax, "Any": Any,
      "model": model, "variables": variables, "x": x, "y": y,
      "batch": {"x": x, "y": y}, "params": variables["params"],
      "batch_stats": variables["batch_stats"], "dropout_key": jax.random.key(5),
  }


def test_batchnorm_snippet_keeps_the_clean_pass_statistics():
  ns = _linen_namespace()
  tx = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1))
  ns["tx"], ns["opt_state"] = tx, tx.init(ns["params"])
  old_stats = ns["batch_stats"]
  _run("batch_stats = new_batch_stats", ns)
  # The statistics of the clean pass, computed here directly.
  _, clean = ns["model"].apply(
      {"params": ns["params"], "batch_stats": old_stats}, ns["x"], train=True,
      mutable=["batch_stats"], rngs={"dropout": ns["dropout_key"]})
  chex.assert_trees_all_close(ns["batch_stats"], clean["batch_stats"])
  assert sam_optax.sam_stats(ns["opt_state"]).pass_taken == 1.0


def test_linen_train_state_snippet():
  pytest.importorskip("sam_optax.flax")
  import sam_optax.flax  # noqa: F401, PLC0415

  ns = _run("sam_optax.flax.linen_train_step(", _linen_namespace())
  state = ns["state"]
  assert int(state.step) == 1 and bool(jnp.isfinite(ns["loss"]))
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, ns["variables"]["params"])
  assert all(jax.tree.leaves(changed))
  assert float(sam_optax.sam_stats(state.opt_state).pass_taken) == 1.0


def _nnx_namespace(tmp_path) -> dict[str, Any]:
  from flax import nnx  # noqa: PLC0415

  import sam_optax.flax  # noqa: F401, PLC0415

  from tests import flax_models  # noqa: PLC0415

  Net = flax_models.TinyNet

  def model_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  def make_model_and_optimizer():
    model = Net(nnx.Rngs(0, dropout=1))
    tx = optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  return {
      "jax": jax, "jnp": jnp, "optax": optax, "sam_optax": sam_optax, "nnx": nnx,
      "model": Net(nnx.Rngs(0, dropout=1)), "model_loss": model_loss,
      "loss_fn": model_loss,  # the docs' older name for it
      "x": jax.random.normal(jax.random.key(1), (32, 4)), "y": jnp.arange(32) % 2,
      "make_model_and_optimizer": make_model_and_optimizer, "path": tmp_path,
  }


def test_nnx_snippets_train_and_checkpoint(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  from flax import nnx  # noqa: PLC0415

  ns = _nnx_namespace(tmp_path)
  before = jax.tree.leaves(nnx.state(ns["model"], nnx.Param))  # the arrays, not the Params
  _run("sam_optax.flax.nnx_train_step(", ns)
  assert bool(jnp.isfinite(ns["loss"]))
  after_one = jax.tree.leaves(nnx.state(ns["model"], nnx.Param))
  assert all(bool(jnp.any(a != b)) for a, b in zip(after_one, before))
  stats = sam_optax.sam_stats(ns["optimizer"].opt_state)
  assert float(stats.pass_taken) == 1.0 and float(stats.perturbed_loss) > 0
  _run("optimizer.update(model, grads, loss_fn=closure)", ns)
  ns["loss"] = ns["train_step"](ns["model"], ns["optimizer"], ns["x"], ns["y"])
  assert bool(jnp.isfinite(ns["loss"]))

  # Save and restore: Linen state from the Linen snippet, NNX from above.
  linen = _run("sam_optax.flax.linen_train_step(", _linen_namespace())
  ns["state"], ns["ocp"] = linen["state"], ocp
  saved_linen, saved_nnx = ns["state"], nnx.state((ns["model"], ns["optimizer"]))
  _run("ckpt.save(path / \"linen\", state)", ns)
  chex.assert_trees_all_equal(ns["state"].params, saved_linen.params)
  chex.assert_trees_all_equal(
      jax.tree.leaves(nnx.state((ns["model"], ns["optimizer"]))), jax.tree.leaves(saved_nnx)
  )


def test_schedule_free_and_sophia_snippet():
  ns = _run("schedule_free_eval_params(opt_state[1], trained)", _mlp_namespace())
  params, loss_fn = ns["params"], ns["loss_fn"]
  u = sam_gradient(loss_fn, params, 0.05)
  # Schedule-free AdamW fed the SAM gradient, evaluated at its own eval point.
  base = optax.contrib.schedule_free_adamw(1e-3)
  updates, state = base.update(u, base.init(params), params)
  trained = optax.apply_updates(params, updates)
  chex.assert_trees_all_close(ns["trained"], trained, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(
      ns["eval_params"], optax.contrib.schedule_free_eval_params(state, trained),
      rtol=1e-5, atol=1e-7,
  )
  # Sophia fed the SAM gradient, its Hessian estimated from obj_fn at params.
  sophia = optax.contrib.sophia(1e-3)
  want, _ = sophia.update(u, sophia.init(params), params, obj_fn=loss_fn)
  chex.assert_trees_all_close(ns["updates"], want, rtol=1e-5, atol=1e-7)


def test_sam_pass_block_is_looksam():
  """The loop's `sam_pass` schedule gives LookSAM (Liu et al. 2022), in float64."""
  ns = _run("static_argnames=\"sam_pass\")", {})
  scale = np.array([1.0, 4.0, 9.0])
  w = np.zeros(3)
  grad = lambda v: 2 * scale * (v - 1.0)  # noqa: E731
  g_v = np.zeros(3)
  for t in range(10):
    g = grad(w)
    if t % 5 == 0:
      g_s = grad(w + 0.05 * g / np.linalg.norm(g))
      g_v = g_s - (g_s @ g) / (g @ g) * g
      u = g_s
    else:
      u = g + 0.7 * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
    w = w - 0.02 * u
  np.testing.assert_allclose(np.asarray(ns["params"]), w, rtol=1e-5, atol=1e-5)
  assert float(sam_optax.sam_stats(ns["opt_state"]).pass_taken) == 0.0  # t = 9


def test_auto_rho_block_follows_the_documented_law():
  """The block's 20 steps, replayed in float64 with the law of `auto_rho`."""
  ns = _run('sam_optax.sam(rho="auto")', {})
  loss = lambda w: np.sum(np.cosh(w)) + np.sum(w[:2] * w[1:])  # noqa: E731

  def grad(w):
    g = np.sinh(w)
    g[:2] += w[1:]
    g[1:] += w[:2]
    return g

  w, m = np.array([1.0, -2.0, 0.5]), np.zeros(3)
  log_rho, n, change = np.log(1e-3), 0, 0.0
  for _ in range(20):
    g = grad(w)
    rho = np.exp(log_rho)
    g_p = grad(w + rho * g / np.linalg.norm(g))
    change = np.linalg.norm(g_p - g) / np.linalg.norm(g)
    n += 1
    new = log_rho + max(0.05, 1.0 / n) * (np.log(0.2) - np.log(change))
    if change > 0.5:
      new = min(new, log_rho) + np.log(0.5)
    log_rho = new
    m = 0.9 * m + g_p
    w = w - 0.1 * m
  stats = sam_optax.sam_stats(ns["opt_state"])
  np.testing.assert_allclose(np.asarray(ns["params"]), w, rtol=1e-4)
  np.testing.assert_allclose(float(stats.grad_change), change, rtol=1e-3)
  np.testing.assert_allclose(float(stats.rho), rho, rtol=1e-4)
  assert float(loss(np.asarray(ns["params"]))) < loss(np.array([1.0, -2.0, 0.5]))
  assert isinstance(ns["guarded_tx"], optax.GradientTransformation)


def test_check_step_block_passes_a_right_chain_and_names_a_wrong_one():
  ns = _mlp_namespace()
  ns["loss_fn"] = lambda p: ns["loss"](p, ns["x"], ns["y"])
  right = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1))
  ns.update(tx=right, opt_state=right.init(ns["params"]))
  _run("sam_optax.check_step(tx, grads", ns)  # passes silently
  wrong = optax.chain(optax.sgd(0.1), sam_optax.sam(0.05))
  ns.update(tx=wrong, opt_state=wrong.init(ns["params"]))
  with pytest.raises(ValueError, match=r"optax\.chain\(sam_optax\.sam\(\.\.\.\), optax"):
    _run("sam_optax.check_step(tx, grads", ns)


def test_cheap_ascent_block_takes_the_perturbation_from_a_quarter():
  """The block's 50 steps replayed in float64 NumPy: ε from the first quarter
  of the batch, the gradient at w + ε on all of it (Bahri et al. 2022)."""
  ns = _run("def cheap_ascent_step(", {})
  x, y = np.asarray(ns["x"], np.float64), np.asarray(ns["y"], np.float64)
  start = (0.5 * np.asarray(jax.random.normal(ns["k1"], (4, 16)), np.float64),
           0.5 * np.asarray(jax.random.normal(ns["k2"], (16, 1)), np.float64))

  def loss(w1, w2):
    return np.mean((np.tanh(x @ w1) @ w2 - y) ** 2)

  def grad(w1, w2, x, y):
    h = np.tanh(x @ w1)
    r = 2.0 * (h @ w2 - y) / len(x)
    return x.T @ ((r @ w2.T) * (1.0 - h**2)), h.T @ r

  def replay(ascent_rows):
    (w1, w2), m1, m2 = start, 0.0, 0.0
    for _ in range(50):
      g1, g2 = grad(w1, w2, x[:ascent_rows], y[:ascent_rows])
      scale = 0.05 / np.sqrt(np.sum(g1**2) + np.sum(g2**2))
      u1, u2 = grad(w1 + scale * g1, w2 + scale * g2, x, y)
      m1, m2 = 0.9 * m1 + u1, 0.9 * m2 + u2
      w1, w2 = w1 - 0.1 * m1, w2 - 0.1 * m2
    return w1, w2

  w1, w2 = replay(len(x) // 4)
  np.testing.assert_allclose(np.asarray(ns["params"]["w1"]), w1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ns["params"]["w2"]), w2, rtol=1e-4, atol=1e-5)
  full1, _ = replay(len(x))  # ε from the whole batch: another trajectory
  assert np.max(np.abs(full1 - w1)) > 1e-3
  assert loss(w1, w2) < 0.5 * loss(*start)
