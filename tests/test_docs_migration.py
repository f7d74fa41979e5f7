"""The migration guides' code runs as printed, and does what their text says.

Every ```python block of ``docs/migration/optax_contrib.md`` and
``docs/migration/pytorch_sam.md`` is taken by a line it contains, executed
in a fresh namespace (each block is self-contained), and its result compared
with a reference computed here by hand with ``jax.grad``: the two-pass SAM
step ``∇L(w + ρ g/‖g‖)`` fed to the base optimizer written out in
``jax.numpy``. The behaviour of ``optax.contrib.sam`` that the pages describe
is checked against the installed optax.
"""

from __future__ import annotations

import inspect
import pathlib
import re
import sys
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests.doc_blocks import python_blocks
from tests.reference import sam_gradient

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "migration"
PAGES = {
    "optax_contrib": (DOCS / "optax_contrib.md").read_text(),
    "pytorch_sam": (DOCS / "pytorch_sam.md").read_text(),
}


def _blocks(page: str) -> list[str]:
  return python_blocks(DOCS / f"{page}.md")


def _block(page: str, anchor: str) -> str:
  """The one Python block of ``page`` that contains ``anchor``."""
  found = [b for b in _blocks(page) if anchor in b]
  assert len(found) == 1, f"{len(found)} blocks of {page}.md contain {anchor!r}"
  return found[0]


def _says(page: str, text: str) -> bool:
  """Whether the page's prose contains ``text``, line breaks aside."""
  return " ".join(text.split()) in " ".join(PAGES[page].split())


def _run(page: str, anchor: str) -> dict[str, Any]:
  """Executes the block in a fresh namespace, as a reader would."""
  namespace: dict[str, Any] = {"__name__": f"docs_{page}"}
  exec(compile(_block(page, anchor), f"{page}.md<{anchor}>", "exec"), namespace)  # noqa: S102
  return namespace


# One anchor per block; `test_every_block_is_exercised` checks the pairing.
C_TRANSPARENT = "params, opt_state = half_step(params, opt_state, xb, yb)  # to w + eps"
C_OPAQUE = "grad_fn = lambda p, i: jax.grad(loss)(p, xb, yb)"
C_AFTER = "tx = optax.chain(sam_optax.sam(rho), optax.sgd(lr, momentum=0.9))"
C_MULTI = "sync_period=3, opaque_mode=True)"
C_ZERO = "# the minimum: the gradient is zero"
C_PLATEAU = "plateau = lambda p: jnp.sum(jnp.minimum(p[\"w\"], 1.05))"
C_SYNC1 = "sync_period=1))"
C_SCHEDULE = "optax.linear_schedule(0.01, 0.04, transition_steps=3)"
P_AFTER = "loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]"
P_ASAM = "perturbation=sam_optax.perturbations.adaptive(0.0)"
P_MIXED = "loss_fn=scaled_loss_fn, loss_scale=scale)"
P_SHARD = "step = jax.jit(jax.shard_map(local_step"
P_CHAIN = "optax.add_decayed_weights(5e-4),"
P_BN = "def loss_and_stats(params, stats, x, y):"
P_ACCUM = "optax.MultiSteps(optax.sgd(0.1, momentum=0.9), k)"

ANCHORS = {
    "optax_contrib": {
        "C_TRANSPARENT": C_TRANSPARENT, "C_OPAQUE": C_OPAQUE, "C_AFTER": C_AFTER,
        "C_MULTI": C_MULTI, "C_ZERO": C_ZERO, "C_PLATEAU": C_PLATEAU,
        "C_SYNC1": C_SYNC1, "C_SCHEDULE": C_SCHEDULE,
    },
    "pytorch_sam": {
        "P_AFTER": P_AFTER, "P_ASAM": P_ASAM, "P_MIXED": P_MIXED,
        "P_SHARD": P_SHARD, "P_CHAIN": P_CHAIN, "P_BN": P_BN, "P_ACCUM": P_ACCUM,
    },
}

TOL = {"rtol": 1e-4, "atol": 1e-5}


# ------------------------------------------------------------ the reference


def _norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _axpy(a: Any, x: Any, y: Any) -> Any:
  """``a * x + y`` leaf by leaf."""
  return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)


def _sgd_momentum(params, grads_at, lr, steps, momentum=0.9):
  """SGD with heavy-ball momentum (torch and optax form), written out."""
  trace = jax.tree.map(jnp.zeros_like, params)
  for t in range(steps):
    trace = _axpy(momentum, trace, grads_at(t, params))
    params = _axpy(-lr, trace, params)
  return params


def _mlp_run(ns, make_grad, lr=0.1, epochs=5):
  """Runs a block's loop by hand from the block's own initial parameters."""
  params = ns["init_mlp"](jax.random.key(0))
  batches = ns["batches"] if "batches" in ns else ns["loader"]
  n = len(batches)
  return _sgd_momentum(
      params, lambda t, p: make_grad(batches[t % n], p), lr, epochs * n
  )


def _far(a, b, by):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b))) > by


# ------------------------------------------------------------ optax_contrib.md


def test_contrib_page_names_the_installed_optax_version():
  # The page describes optax.contrib.sam "as of optax X"; the tests below
  # check its statements against the installed version, which must be X.
  assert _says("optax_contrib", f"as of optax {optax.__version__}")


def test_contrib_before_and_after_reach_the_parameters_of_two_pass_sam():
  runs = {a: _run("optax_contrib", a) for a in (C_TRANSPARENT, C_OPAQUE, C_AFTER)}
  for anchor, ns in runs.items():
    assert "params = init_mlp(jax.random.key(0))" in _block("optax_contrib", anchor)
    assert (ns["rho"], ns["lr"]) == (0.05, 0.1)
  loss = runs[C_AFTER]["loss"]
  want = _mlp_run(
      runs[C_AFTER], lambda b, p: sam_gradient(lambda q: loss(q, *b), p, 0.05)
  )
  plain = _mlp_run(runs[C_AFTER], lambda b, p: jax.grad(loss)(p, *b))
  assert _far(want, plain, 1e-3)  # SAM moved somewhere else than SGD
  for anchor, ns in runs.items():
    chex.assert_trees_all_close(ns["params"], want, **TOL, custom_message=anchor)
  stats = sam_optax.sam_stats(runs[C_AFTER]["opt_state"])
  assert float(stats.perturbed_loss) > float(runs[C_AFTER]["loss_value"]) > 0.0


def test_contrib_sync_period_3_is_two_ascent_steps_of_rho():
  ns = _run("optax_contrib", C_MULTI)
  loss_fn, params, rho = ns["loss_fn"], ns["params"], ns["rho"]
  g0 = jax.grad(loss_fn)(params)
  eps = jax.tree.map(lambda g: rho * g / _norm(g0), g0)
  g1 = jax.grad(loss_fn)(_axpy(1.0, eps, params))
  eps = _axpy(rho / _norm(g1), g1, eps)
  want = jax.tree.map(lambda u: -0.1 * u, jax.grad(loss_fn)(_axpy(1.0, eps, params)))
  one_step = jax.tree.map(lambda u: -0.1 * u, sam_gradient(loss_fn, params, rho))
  assert _far(want, one_step, 1e-4)
  chex.assert_trees_all_close(ns["contrib_updates"], want, **TOL)
  chex.assert_trees_all_close(ns["updates"], want, **TOL)


def test_contrib_zero_gradient_is_nan_where_sam_optax_is_zero():
  ns = _run("optax_contrib", C_ZERO)
  assert float(_norm(ns["grads"])) == 0.0
  assert bool(jnp.all(ns["updates"]["w"] == 0.0))
  if not bool(jnp.all(jnp.isnan(ns["contrib_updates"]["w"]))):
    pytest.fail(
        f"optax {optax.__version__} no longer returns NaN for a zero gradient:"
        " update docs/migration/optax_contrib.md"
    )


def test_contrib_transparent_nan_from_a_zero_gradient_at_the_perturbed_point():
  ns = _run("optax_contrib", C_PLATEAU)
  plateau, params = ns["plateau"], ns["params"]
  # The clean gradient is 1; at w + ε = 1.1 it is 0, so the SAM step is 0.
  assert float(jax.grad(plateau)(params)["w"][0]) == 1.0
  assert float(jax.grad(plateau)({"w": params["w"] + 0.1})["w"][0]) == 0.0
  sam_w = optax.apply_updates(params, ns["updates"])["w"]
  np.testing.assert_array_equal(np.asarray(sam_w), [1.0])
  if not bool(jnp.all(jnp.isnan(ns["p"]["w"]))):
    pytest.fail(
        f"optax {optax.__version__} no longer reaches NaN on the plateau:"
        " update docs/migration/optax_contrib.md"
    )


def test_contrib_sync_period_1_discards_the_previous_step():
  ns = _run("optax_contrib", C_SYNC1)
  loss_fn, w0 = ns["loss_fn"], ns["params"]["w"]
  grad = lambda w: jax.grad(loss_fn)({"w": w})["w"]  # noqa: E731
  sgd = [w0]
  for _ in range(3):
    sgd.append(sgd[-1] - 0.1 * grad(sgd[-1]))
  np.testing.assert_allclose(ns["sgd_w"], sgd[-1], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(ns["sam_off_w"]), np.asarray(ns["sgd_w"]))
  # The page's formula: w_{t+1} = w_{t-1} + u_t from the second call on.
  w = [w0, w0 - 0.1 * grad(w0)]
  for _ in range(2):
    w.append(w[-2] - 0.1 * grad(w[-1]))
  if np.allclose(ns["contrib_w"], ns["sgd_w"]):
    pytest.fail(
        f"optax {optax.__version__} fixed sync_period=1:"
        " update docs/migration/optax_contrib.md"
    )
  np.testing.assert_allclose(ns["contrib_w"], w[-1], rtol=1e-6)


def test_contrib_rho_schedule_frozen_where_sam_optax_counts_steps():
  ns = _run("optax_contrib", C_SCHEDULE)
  want = [0.01 + 0.01 * t for t in range(4)]  # linear 0.01 -> 0.04 over 3 steps
  np.testing.assert_allclose(ns["rhos"], want, rtol=1e-6)
  assert len(ns["radii"]) == 4
  if not np.allclose(ns["radii"], 0.01, rtol=1e-5):
    pytest.fail(
        f"optax {optax.__version__} no longer freezes the schedule:"
        " update docs/migration/optax_contrib.md"
    )


# ------------------------------------------------------------ pytorch_sam.md


def test_pytorch_after_block_is_sgd_momentum_on_the_two_pass_sam_gradient():
  ns = _run("pytorch_sam", P_AFTER)
  assert "params = init_mlp(jax.random.key(0))" in _block("pytorch_sam", P_AFTER)
  loss_function = ns["loss_function"]
  want = _mlp_run(
      ns, lambda b, p: sam_gradient(lambda q: loss_function(q, *b), p, 0.05), epochs=5
  )
  plain = _mlp_run(ns, lambda b, p: jax.grad(loss_function)(p, *b), epochs=5)
  assert _far(want, plain, 1e-3)
  chex.assert_trees_all_close(ns["params"], want, **TOL)
  first = ns["loss_function"](ns["init_mlp"](jax.random.key(0)), ns["x"], ns["y"])
  assert float(loss_function(ns["params"], ns["x"], ns["y"])) < float(first)


def test_pytorch_asam_blocks_match_davda54_and_published_asam():
  ns = _run("pytorch_sam", P_ASAM)
  loss_fn, params, grads = ns["loss_fn"], ns["params"], ns["grads"]

  def asam_grad(eta):  # ε = ρ T² g / (‖T g‖ + 1e-12), T = |w| + η
    t = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
    norm = _norm(jax.tree.map(jnp.multiply, t, grads))
    eps = jax.tree.map(lambda ti, g: 2.0 * ti**2 * g / (norm + 1e-12), t, grads)
    return jax.grad(loss_fn)(_axpy(1.0, eps, params))

  for name, eta in (("davda_updates", 0.0), ("asam_updates", 0.01)):
    want = jax.tree.map(lambda u: -0.1 * u, asam_grad(eta))
    chex.assert_trees_all_close(ns[name], want, **TOL, custom_message=name)
  assert _far(ns["davda_updates"], ns["asam_updates"], 1e-7)


def test_pytorch_mixed_precision_block_gives_the_unscaled_step():
  ns = _run("pytorch_sam", P_MIXED)
  params, loss, x, y = ns["params"], ns["loss"], ns["x"], ns["y"]
  assert ns["scale"] > 1.0
  u = sam_gradient(lambda p: loss(p, x, y), params, 0.05)
  want = _axpy(-0.1, u, params)
  chex.assert_trees_all_close(ns["new_params"], want, rtol=1e-2, atol=1e-3)
  # Without the loss scale the step would be `scale` times as long.
  assert _far(want, _axpy(-0.1 * ns["scale"], u, params), 1.0)
  # bfloat16 parameters: bfloat16 updates, close to the float32 SAM gradient.
  for leaf in jax.tree.leaves(ns["updates_bf16"]):
    assert leaf.dtype == jnp.bfloat16
  loss32 = lambda p: jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)  # noqa: E731
  p32 = jax.tree.map(lambda w: w.astype(jnp.float32), ns["params_bf16"])
  want_bf16 = jax.tree.map(lambda u: -0.1 * u, sam_gradient(loss32, p32, 0.05))
  chex.assert_trees_all_close(
      jax.tree.map(lambda u: u.astype(jnp.float32), ns["updates_bf16"]),
      want_bf16, rtol=5e-2, atol=5e-3,
  )


def test_pytorch_shard_map_block_is_per_device_sam():
  ns = _run("pytorch_sam", P_SHARD)
  params, loss, x, y = ns["params"], ns["loss"], ns["x"], ns["y"]
  n = jax.device_count()
  xs, ys = x.reshape(n, -1, x.shape[1]), y.reshape(n, -1, y.shape[1])
  shards = [sam_gradient(lambda p, i=i: loss(p, xs[i], ys[i]), params, 0.05) for i in range(n)]
  mean = jax.tree.map(lambda *g: sum(g) / n, *shards)
  want = _axpy(-0.1, mean, params)
  chex.assert_trees_all_close(ns["new_params"], want, **TOL)
  if n > 1:  # per-device ε differs from one ε for the whole batch
    synced = _axpy(-0.1, sam_gradient(lambda p: loss(p, x, y), params, 0.05), params)
    assert _far(want, synced, 1e-6)


def test_pytorch_chain_block_clips_decays_and_schedules_like_torch():
  ns = _run("pytorch_sam", P_CHAIN)
  loss, loader, epochs = ns["loss"], ns["loader"], ns["epochs"]
  k1, k2, _ = jax.random.split(jax.random.key(0), 3)
  params = {"w1": 0.5 * jax.random.normal(k1, (4, 16)), "w2": 0.5 * jax.random.normal(k2, (16, 1))}
  total = epochs * len(loader)
  clipped = []

  def grads_at(t, p):
    u = sam_gradient(lambda q: loss(q, *loader[t % len(loader)]), p, 0.05)
    norm = float(_norm(u))
    clipped.append(norm > 1.0)
    u = jax.tree.map(lambda g: g * min(1.0, 1.0 / norm), u)  # clip_grad_norm_(…, 1.0)
    return _axpy(5e-4, p, u)                                   # SGD weight_decay: + wd·w

  trace, p = jax.tree.map(jnp.zeros_like, params), params
  for t in range(total):
    trace = _axpy(0.9, trace, grads_at(t, p))
    lr = 0.1 * 0.5 * (1.0 + np.cos(np.pi * t / total))        # CosineAnnealingLR per step
    p = _axpy(-lr, trace, p)
  assert any(clipped)  # the clip is active, so a chain without it would differ
  chex.assert_trees_all_close(ns["params"], p, **TOL)


def test_pytorch_batchnorm_block_keeps_the_clean_pass_statistics():
  ns = _run("pytorch_sam", P_BN)
  params, stats, x, y = ns["params"], ns["stats"], ns["x"], ns["y"]
  loss_fn = lambda p: ns["loss_and_stats"](p, stats, x, y)[0]  # noqa: E731
  clean_stats = 0.1 * jnp.mean(x @ params["w1"], axis=0)
  np.testing.assert_allclose(ns["new_stats"]["mean"], clean_stats, rtol=1e-5, atol=1e-7)
  g = jax.grad(loss_fn)(params)
  perturbed = _axpy(0.05 / _norm(g), g, params)
  assert _far({"m": clean_stats}, {"m": 0.1 * jnp.mean(x @ perturbed["w1"], axis=0)}, 1e-5)
  want = _axpy(-0.1, sam_gradient(loss_fn, params, 0.05), params)
  chex.assert_trees_all_close(ns["new_params"], want, **TOL)
  assert float(ns["loss"]) == pytest.approx(float(loss_fn(params)), rel=1e-6)


def test_pytorch_accumulation_block_forms():
  ns = _run("pytorch_sam", P_ACCUM)
  params, loss, xs, ys, k = ns["params"], ns["loss"], ns["xs"], ns["ys"], ns["k"]
  per_micro = [sam_gradient(lambda p, i=i: loss(p, xs[i], ys[i]), params, 0.05) for i in range(k)]
  want_1 = _axpy(-0.1, jax.tree.map(lambda *g: sum(g) / k, *per_micro), params)
  full = lambda p: jnp.mean(jnp.stack([loss(p, xs[i], ys[i]) for i in range(k)]))  # noqa: E731
  want_2 = _axpy(-0.1, sam_gradient(full, params, 0.05), params)
  assert _far(want_1, want_2, 1e-6)
  chex.assert_trees_all_close(ns["params_1"], want_1, **TOL)
  chex.assert_trees_all_close(ns["params_2"], want_2, **TOL)


def test_pytorch_page_multisteps_around_sam_raises_as_stated():
  assert _says(
      "pytorch_sam", "`optax.MultiSteps(optax.chain(sam(rho), base), k)` raises a `ValueError`"
  )
  tx = optax.MultiSteps(optax.chain(sam_optax.sam(0.05), optax.sgd(0.1)), 2)
  params = {"w": jnp.ones(3)}
  loss_fn = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
  with pytest.raises(ValueError, match="gradient_transformation"):
    tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)


# ------------------------------------------------------------ both pages


def test_every_block_is_exercised():
  module = sys.modules[__name__]
  sources = "\n".join(
      inspect.getsource(f) for name, f in vars(module).items()
      if name.startswith("test_") and name != "test_every_block_is_exercised"
  )
  for page, anchors in ANCHORS.items():
    blocks = _blocks(page)
    assert blocks, page
    for i, block in enumerate(blocks):
      hits = [name for name, a in anchors.items() if a in block]
      assert len(hits) == 1, f"{page}.md block {i} is matched by {hits}:\n{block[:300]}"
    assert len(anchors) == len(blocks), f"{page}.md: {len(blocks)} blocks, {len(anchors)} anchors"
    for name in anchors:
      assert re.search(rf"\b{name}\b", sources), f"no test runs {page}.md's {name} block"


def test_no_pytorch_code_in_python_blocks():
  # PyTorch code goes into ```text blocks; in Python blocks only comments name it.
  for page in PAGES:
    for block in _blocks(page):
      for line in block.splitlines():
        assert "torch" not in line.split("#", 1)[0], f"{page}.md: {line}"


def test_contrib_transparent_mode_advances_the_base_state_once_per_sam_step():
  # "Inside the wrapper, the base optimizer's own state ... is kept only on
  # the real step": two calls per SAM step, one count.
  assert _says("optax_contrib", "base optimizer's own state, including the count of an"
               " optax schedule in it, is kept only on the real step")
  loss_fn = lambda p: jnp.sum(jnp.cosh(p["w"]))  # noqa: E731
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  tx = optax.contrib.sam(
      optax.sgd(optax.linear_schedule(0.1, 0.0, 10)),
      optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
  )
  state, p = tx.init(params), params
  for _ in range(6):  # three SAM steps
    u, state = tx.update(jax.grad(loss_fn)(p), state, p)
    p = optax.apply_updates(p, u)
  assert int(optax.tree_utils.tree_get(state.opt_state, "count")) == 3


def test_contrib_flax_train_state_cannot_pass_grad_fn_where_ours_can():
  pytest.importorskip("flax")
  from flax.training import train_state  # noqa: PLC0415

  loss_fn = lambda p: jnp.sum(jnp.cosh(p["w"]) + p["w"][0] * p["w"][1])  # noqa: E731
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  grads = jax.grad(loss_fn)(params)
  contrib = optax.contrib.sam(
      optax.sgd(0.1), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
      opaque_mode=True,
  )
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=contrib)
  with pytest.raises(ValueError, match="grad_fn must be provided"):
    state.apply_gradients(grads=grads, grad_fn=lambda p, i: jax.grad(loss_fn)(p))
  tx = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1))
  ours = sam_optax.flax.TrainState.create(apply_fn=None, params=params, tx=tx)
  ours = ours.apply_gradients(grads=grads, loss_fn=loss_fn)
  want = _axpy(-0.1, sam_gradient(loss_fn, params, 0.05), params)
  chex.assert_trees_all_close(ours.params, want, **TOL)
  assert int(ours.step) == 1
