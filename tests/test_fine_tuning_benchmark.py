"""The fine-tuning benchmark: its task data, pooling, LoRA, SAM in LoRA mode, quick mode."""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from benchmarks import fine_tuning as ft
from benchmarks.common import sequence_models as sm
from benchmarks.common import text

V, T, K = 20, 12, 3


def _model(d=16):
  return sm.language_model("transformer", V, length=T, d_model=d, num_layers=2,
                           num_heads=2, dropout=0.1)


def _cfg(**kw):
  cfg = dict(ft.DEFAULTS, d_model=16, num_layers=2, num_heads=2, length=T,
             line_length=T, batch=4, steps=4, chunk=4, rank=2, alpha=4.0,
             lr_full=1e-2, lr_lora=1e-2)
  cfg.update(kw)
  return cfg


def _batch(n=5, seed=1):
  x = np.asarray(jax.random.randint(jax.random.key(seed), (n, T), 1, V), np.int32)
  lengths = np.asarray([T, 3, 7, 1, 10][:n])
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  x = np.where(mask > 0, x, text.PAD).astype(np.int32)
  y = np.asarray(jax.random.randint(jax.random.key(seed + 1), (n,), 0, K), np.int32)
  return jnp.asarray(x), jnp.asarray(mask), jnp.asarray(y)


def _to_numpy(tree):
  return jax.tree.map(lambda a: np.array(a, copy=True), tree)


# ------------------------------------------------------------------------ data

@pytest.fixture(scope="module")
def corpus():
  return text.load_corpus()


def test_task_lines_are_disjoint_and_fractions_nested_and_balanced(corpus):
  cfg = dict(ft.DEFAULTS)
  task = ft.task_data(corpus, cfg)
  lines = task["lines"]
  train = set(lines["train"].lines)
  for s in ("val", "test"):
    assert len(lines[s].lines) > 500
    assert not train & set(lines[s].lines)
  assert not set(lines["val"].lines) & set(lines["test"].lines)
  order = ft.fraction_order(lines["train"].labels, 0)
  sets = {}
  for f in (0.05, 0.2, 1.0):
    idx = ft.fraction_indices(order, f)
    counts = np.bincount(lines["train"].labels[idx], minlength=len(text.PLAYS))
    assert counts.max() - counts.min() <= 1  # balanced (play_lines is)
    assert len(set(idx.tolist())) == len(idx)
    sets[f] = set(idx.tolist())
  assert sets[0.05] <= sets[0.2] <= sets[1.0] == set(range(len(lines["train"].lines)))


# --------------------------------------------------------------------- pooling

def test_hidden_states_give_the_language_model_logits_unchanged():
  model = _model()
  params = model.init(jax.random.key(0))
  x, _, _ = _batch()
  h = sm.hidden_states(model, params, x)
  assert h.shape == (5, T, 16)
  np.testing.assert_allclose(model.apply(params, x), h @ params["embed"]["embedding"].T,
                             rtol=1e-5, atol=1e-5)


def test_pooling_is_the_mean_over_real_tokens_and_ignores_padding():
  model = _model()
  params = model.init(jax.random.key(0))
  head = ft.init_head(jax.random.key(5), 16, K)
  x, mask, _ = _batch()
  h = np.asarray(sm.hidden_states(model, params, x))
  pooled = np.asarray(ft.pool(jnp.asarray(h), mask))
  for i in range(x.shape[0]):
    n = int(mask[i].sum())
    np.testing.assert_allclose(pooled[i], h[i, :n].mean(0), rtol=1e-5, atol=1e-6)
  logits = ft.classify(model, params, head, x, mask)
  # Other ids in the padded positions: causal attention and the masked pool
  # leave the logits of every line unchanged.
  noise = jax.random.randint(jax.random.key(9), x.shape, 1, V)
  x2 = jnp.where(mask > 0, x, noise)
  assert bool(jnp.any(x2 != x))
  np.testing.assert_allclose(ft.classify(model, params, head, x2, mask), logits,
                             rtol=1e-5, atol=1e-6)
  # Without the mask the pool would see them.
  unmasked = ft.classify(model, params, head, x2, jnp.ones_like(mask))
  assert float(jnp.max(jnp.abs(unmasked[1:] - logits[1:]))) > 1e-5
  # A real token does change its line's prediction.
  x3 = x.at[1, 1].set(x[1, 1] % (V - 1) + 1)
  assert float(jnp.max(jnp.abs(ft.classify(model, params, head, x3, mask)[1] - logits[1]))) > 1e-6


# ------------------------------------------------------------------------ LoRA

def test_lora_adapts_every_attention_and_mlp_kernel_starting_from_zero():
  model = _model()
  params = model.init(jax.random.key(0))
  targets = ft.lora_targets(params)
  assert len(targets) == 2 * 6 and all(t.endswith("/kernel") for t in targets)
  assert not [t for t in targets if "embed" in t or "ln" in t]
  adapters = ft.init_adapters(jax.random.key(1), params, 2)
  merged = ft.merge_adapters(params, adapters, 2.0)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)  # B = 0: the pre-trained model at the start
  # A nonzero update is x W + s (x A) B on the attention output's (H, hd, d) kernel.
  adapters["block0/attn/out/kernel"]["b"] = jnp.ones_like(adapters["block0/attn/out/kernel"]["b"])
  merged = ft.merge_adapters(params, adapters, 2.0)
  w = params["block0"]["attn"]["out"]["kernel"]
  w2 = merged["block0"]["attn"]["out"]["kernel"]
  h = jax.random.normal(jax.random.key(2), (3,) + w.shape[:2])
  ab = adapters["block0/attn/out/kernel"]
  want = (jnp.einsum("bhk,hkd->bd", h, w)
          + 2.0 * (h.reshape(3, -1) @ ab["a"]) @ ab["b"])
  np.testing.assert_allclose(jnp.einsum("bhk,hkd->bd", h, w2), want, rtol=1e-5, atol=1e-5)


def _train(mode, kind="sam"):
  model = _model()
  base = model.init(jax.random.key(0))
  before = _to_numpy(base)
  cfg = _cfg()
  x, mask, y = _batch()
  tuner = ft.FineTuner(model, cfg, mode, kind, K)
  norm = ft.feature_norm(model, base, x, mask)
  trained, losses, _ = tuner.run(0, 0.05, cfg["steps"], base,
                                 (x, mask, y, jnp.asarray(5, jnp.int32)), norm)
  return model, cfg, base, before, trained, losses


def test_lora_mode_trains_only_the_adapters_and_the_head():
  _, cfg, base, before, trained, losses = _train("lora")
  assert set(trained) == {"adapters", "head"} and np.all(np.isfinite(losses))
  # The frozen weights handed in are untouched, bit for bit.
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(before)):
    assert np.asarray(a).tobytes() == b.tobytes()
  assert any(float(jnp.max(jnp.abs(ab["b"]))) > 0 for ab in trained["adapters"].values())
  scale = cfg["alpha"] / cfg["rank"]
  lm_params, head = ft.effective("lora", base, trained, scale)
  assert float(jnp.max(jnp.abs(head["kernel"] - ft.init_head(
      jax.random.split(jax.random.key(0), 4)[0], 16, K)["kernel"]))) > 0
  flat_eff = dict(ft.traverse_util.flatten_dict(lm_params, sep="/"))
  flat_base = dict(ft.traverse_util.flatten_dict(before, sep="/"))
  assert flat_eff.keys() == flat_base.keys()
  for name, w in flat_base.items():
    if name in trained["adapters"]:
      ab = trained["adapters"][name]
      np.testing.assert_allclose(np.asarray(flat_eff[name]) - w,
                                 np.asarray(scale * ab["a"] @ ab["b"]).reshape(w.shape),
                                 rtol=1e-4, atol=1e-6)
    else:  # embeddings, positions, LayerNorms, biases: bit-identical
      assert np.asarray(flat_eff[name]).tobytes() == w.tobytes(), name


def test_full_mode_moves_the_pretrained_weights():
  _, _, _, before, trained, _ = _train("full")
  assert set(trained) == {"base", "head"}
  moved = [not np.array_equal(np.asarray(a), b)
           for a, b in zip(jax.tree.leaves(trained["base"]), jax.tree.leaves(before))]
  assert all(moved)


def _lora_problem():
  model = _model()
  base = model.init(jax.random.key(0))
  adapters = ft.init_adapters(jax.random.key(1), base, 2)
  adapters = {k: {"a": v["a"], "b": 0.3 * jax.random.normal(jax.random.fold_in(
      jax.random.key(2), i), v["b"].shape)} for i, (k, v) in enumerate(adapters.items())}
  head = ft.init_head(jax.random.key(3), 16, K)
  head["kernel"] = head["kernel"] * 20
  x, mask, y = _batch()
  return model, base, {"adapters": adapters, "head": head}, (x, mask, y, jax.random.key(4))


def _independent_merge(base, adapters, scale):
  """The adapted kernels rebuilt by hand: W + s·A·B, reshaped to the kernel."""
  out = jax.tree.map(lambda a: a, base)
  for name, ab in adapters.items():
    *mods, leaf = name.split("/")
    node = out
    for m in mods:
      node = node[m]
    node[leaf] = node[leaf] + scale * jnp.reshape(ab["a"] @ ab["b"], node[leaf].shape)
  return out


def test_sam_in_lora_mode_perturbs_only_the_adapters_and_head():
  model, base, trained, (x, mask, y, key) = _lora_problem()
  scale, rho = 2.0, 0.1
  loss_fn = ft.loss_closure(model, "lora", base, x, mask, y, key, scale)
  grads = jax.grad(loss_fn)(trained)
  tx = sam_optax.sam(rho)
  u, _ = tx.update(grads, tx.init(trained), trained, loss_fn=loss_fn)

  # Independently: the loss of the whole tree (frozen weights as an argument),
  # the clean gradient, a step of length rho along the adapters' and head's
  # part of it only, and the gradient there.
  def full_loss(p):
    lm_params = _independent_merge(p["base"], p["adapters"], scale)
    h = sm.hidden_states(model, lm_params, x, dropout_key=key)
    m = mask[..., None]
    logits = (h * m).sum(1) / m.sum(1) @ p["head"]["kernel"] + p["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  full = {"base": base, **trained}
  g = jax.grad(full_loss)(full)
  g_sel = {"adapters": g["adapters"], "head": g["head"]}
  norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g_sel)))
  assert float(jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g["base"])))) > 1e-3
  eps = jax.tree.map(lambda v: rho * v / norm, g_sel)
  perturbed = {"base": base, **jax.tree.map(jnp.add, trained, eps)}
  want = jax.grad(full_loss)(perturbed)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves({k: want[k] for k in trained})):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5)
  # The same as masked_sam over the whole tree with the frozen weights masked out.
  mask_tree = {"base": jax.tree.map(lambda _: False, base),
               "adapters": jax.tree.map(lambda _: True, trained["adapters"]),
               "head": {"kernel": True, "bias": True}}
  mtx = sam_optax.masked_sam(rho, mask_tree)
  um, _ = mtx.update(g, mtx.init(full), full, loss_fn=full_loss)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves({k: um[k] for k in trained})):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5)
  # Plain SAM over the whole tree (frozen weights perturbed too) is different.
  stx = sam_optax.sam(rho)
  us, _ = stx.update(g, stx.init(full), full, loss_fn=full_loss)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(u), jax.tree.leaves({k: us[k] for k in trained})))
  assert diff > 1e-3, diff


# ------------------------------------------------------------------ quick mode

def _readme_snippet():
  """The fine-tuning region of its documentation page with a line of context."""
  body = (ft._ROOT / "docs" / "benchmarks" / "fine_tuning.md").read_text()
  lines = body.splitlines(keepends=True)
  i = next(k for k, ln in enumerate(lines) if ln.startswith(ft.START))
  j = next(k for k, ln in enumerate(lines) if ln.startswith(ft.END))
  return "".join(lines[max(0, i - 2):j + 2])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("fine_tuning")
  readme = out / "README.md"
  snippet = _readme_snippet()
  readme.write_text(snippet)
  result = ft.main(["--quick", "--out", str(out), "--readme", str(readme),
                    "--cache", str(out / "cache")])
  return out, readme, snippet, result


def test_quick_run_writes_every_mode_and_optimizer(quick):
  out, _, _, result = quick
  assert (out / ft.JSON_NAME).exists() and (out / ft.PLOT_NAME).exists()
  saved = json.loads((out / ft.JSON_NAME).read_text())
  assert saved["settings"]["quick"] and saved["fractions"].keys() == result["fractions"].keys()
  assert list(saved["fractions"]) == ["0.2"]
  assert list((out / "cache").glob("fine_tuning_pretrained_*.npz"))
  pre = saved["pretrain"]
  assert not pre["cached"] and math.isfinite(pre["val_loss"])
  assert saved["n_trained"]["lora"] < saved["n_trained"]["full"]
  assert set(saved["task"]["dropped_duplicates"]) == {"val", "test"}
  for entry in saved["fractions"].values():
    assert set(entry["modes"]) == set(ft.MODES)
    for mode, em in entry["modes"].items():
      assert set(em["methods"]) == set(ft.METHODS)
      for m, e in em["methods"].items():
        for k in ("val_acc", "test_acc"):
          assert len(e[k]["per_seed"]) == 2
          assert all(0.0 <= v <= 1.0 for v in e[k]["per_seed"])
        assert all(map(math.isfinite, e["test_loss"]["per_seed"]))
        assert e["steps"] == saved["settings"]["steps"] * ft.STEP_FACTOR[m]
        assert e["passes_per_step"] == ft.PASSES[m]
      assert em["methods"]["sam"]["rho"] in em["methods"]["sam"]["rho_grid"]
      assert set(em["paired"]) == {f"{a}-{b}" for a, b in ft.PAIRS}
      for pair, d in em["paired"].items():
        a, b = pair.split("-")
        want = (np.asarray(em["methods"][a]["test_acc"]["per_seed"])
                - np.asarray(em["methods"][b]["test_acc"]["per_seed"]))
        np.testing.assert_allclose(d["per_seed"], want, atol=1e-12)
        assert d["wins"] == int(np.sum(want > 0)) and d["verdict"] in ("win", "loss", "tie")
        assert d["half_width"] >= 0 or not math.isfinite(d["half_width"])
      # Paired runs: same head, batches and dropout per seed, so the first
      # batch loss is that of every optimizer of the mode.
      firsts = [e["curve"][0] for e in em["methods"].values()]
      assert max(firsts) - min(firsts) < 1e-5, firsts
    # Both modes start from the same pre-trained model and head (LoRA's B = 0).
    f_full = entry["modes"]["full"]["methods"]["adamw"]["curve"][0]
    f_lora = entry["modes"]["lora"]["methods"]["adamw"]["curve"][0]
    assert abs(f_full - f_lora) < 1e-5


def test_quick_run_rewrites_only_the_readme_region(quick):
  out, readme, snippet, result = quick
  body = readme.read_text()
  head, tail = snippet.split(ft.START)[0], snippet.split(ft.END)[1]
  assert body.startswith(head + ft.START + "\n") and body.endswith(ft.END + tail)
  region = body.split(ft.START)[1].split(ft.END)[0]
  assert "Quick smoke-test settings" in region
  rows = [ln for ln in region.splitlines() if ln.startswith("| 20% (")]
  assert len(rows) == len(ft.MODES) * len(ft.METHODS)
  for mode in ft.MODE_LABELS.values():
    for label in ft.LABELS.values():
      assert any(f"| {mode} | {label} |" in r for r in rows)
  for r in rows:
    cells = [c.strip() for c in r.strip("|").split("|")]
    acc = float(cells[6].split("±")[0])
    assert 0.0 <= acc <= 100.0
  assert "Where SAM wins, loses or ties" in region
  assert re.search(r"LoRA: SAM (win|loss|tie) against AdamW", region)
  # --report-only renders the same region from the JSON.
  again = out / "README2.md"
  again.write_text(snippet)
  ft.main(["--report-only", "--out", str(out), "--readme", str(again)])
  assert again.read_text() == body
