"""The low-data language-model benchmark: its corpus, its models, its quick mode."""

from __future__ import annotations

import collections
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import language_model as lm
from benchmarks.common import sequence_models as sm
from benchmarks.common import text


@pytest.fixture(scope="module")
def corpus():
  return text.load_corpus()


# ------------------------------------------------------------------------ data

def test_committed_plays_are_small_and_free_of_gutenberg_boilerplate(corpus):
  files = sorted(text.DATA_DIR.glob("*.txt"))
  assert [f.stem for f in files] == sorted(text.PLAYS)
  assert sum(f.stat().st_size for f in files) < 1.5e6
  for raw in (f.read_text("ascii").lower() for f in files):
    assert not [b for b in text.BOILERPLATE if b in raw]
  for t in corpus.texts:
    assert not [b for b in text.BOILERPLATE if b in t.lower()]
    assert "\r" not in t and len(t) > 80_000


def test_strip_boilerplate_removes_a_gutenberg_header_and_footer():
  raw = ("The Project Gutenberg EBook of Hamlet\r\nThis eBook is for the use of anyone\r\n"
         "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
         "HAMLET.\r\nTo be, or not to be:   \r\n\r\n\r\n\r\n\r\nthat is the question.\r\n"
         "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
         "Updated editions will replace the previous one.\r\n")
  assert text.strip_boilerplate(raw) == (
      "HAMLET.\nTo be, or not to be:\n\n\nthat is the question.\n")


def test_splits_are_disjoint_contiguous_blocks_that_rebuild_every_play(corpus):
  seen = collections.Counter()
  for split, blocks in corpus.blocks.items():
    for b in blocks:
      assert text.split_of(b.index) == split
      seen[(b.play, b.index)] += 1
  assert max(seen.values()) == 1  # no block in two splits
  for p, t in enumerate(corpus.texts):
    mine = sorted((b for bl in corpus.blocks.values() for b in bl if b.play == p),
                  key=lambda b: b.index)
    assert [b.index for b in mine] == list(range(len(mine)))
    assert "".join(b.text for b in mine) == t
    assert all(t[b.start:b.start + len(b.text)] == b.text for b in mine)
  sizes = {s: corpus.splits[s].num_tokens for s in text.SPLITS}
  total = sum(sizes.values())
  assert 0.78 < sizes["train"] / total < 0.82
  assert 0.08 < sizes["val"] / total < 0.12 and 0.08 < sizes["test"] / total < 0.12
  for s in text.SPLITS:  # every play is in every split
    assert set(corpus.splits[s].plays.tolist()) == set(range(len(text.PLAYS)))


def test_vocab_round_trips_bytes_and_reserves_padding(corpus):
  v = corpus.vocab
  assert v.size == len(v.bytes) + 1 < 100
  for t in corpus.texts:
    ids = v.encode(t)
    assert ids.dtype == np.int32 and ids.min() >= 1 and ids.max() < v.size
    assert v.decode(ids) == t
  ids = v.encode("To be, or not")
  assert v.decode(np.concatenate([ids, [text.PAD, text.PAD]])) == "To be, or not"
  with pytest.raises(ValueError, match="not in the vocabulary"):
    v.encode("naïve")


def test_fractions_are_nested_subsets_of_training_blocks(corpus):
  train = corpus.splits["train"]
  sets = {}
  for f in (0.01, 0.05, 1.0):
    sub = text.subset(train, f, seed=0)
    assert sub.num_blocks == max(1, round(f * train.num_blocks))
    segs = {sub.segment(b).tobytes() for b in range(sub.num_blocks)}
    sets[f] = segs
  assert sets[0.01] <= sets[0.05] <= sets[1.0]
  assert text.subset(train, 1.0).num_tokens == train.num_tokens


def test_training_windows_stay_inside_blocks_and_targets_are_shifted(corpus):
  sub = text.subset(corpus.splits["train"], 0.01)
  T = 32
  starts = text.window_starts(sub, T)
  block_of = np.searchsorted(sub.offsets, starts, side="right") - 1
  assert np.all(starts + T < sub.offsets[block_of + 1])
  x, y = text.random_windows(jax.random.key(0), jnp.asarray(sub.tokens),
                             jnp.asarray(starts), len(starts), 64, T)
  x, y = np.asarray(x), np.asarray(y)
  assert x.shape == y.shape == (64, T)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  joined = sub.tokens.tobytes()
  for row in np.concatenate([x, y[:, -1:]], axis=1):
    assert row.astype(np.int32).tobytes() in joined


def test_eval_windows_score_every_token_once(corpus):
  split = corpus.splits["test"]
  T = 64
  w = text.eval_windows(split, T)
  assert w.x.shape == w.y.shape == w.mask.shape
  assert w.mask.sum() == split.num_tokens - split.num_blocks
  assert np.all(w.y[w.mask == 0] == text.PAD)
  # Unpadded targets, concatenated, are every block without its first token.
  want = np.concatenate([split.segment(b)[1:] for b in range(split.num_blocks)])
  np.testing.assert_array_equal(w.y[w.mask == 1], want)


def test_play_lines_are_balanced_spoken_lines_of_their_play_and_split(corpus):
  K = len(text.PLAYS)
  for split in text.SPLITS:
    data = text.play_lines(corpus, split)
    counts = collections.Counter(data.labels.tolist())
    assert sorted(counts) == list(range(K))
    assert len(set(counts.values())) == 1 and min(counts.values()) > 100
    assert data.plays == text.PLAYS
    texts = ["".join(b.text for b in corpus.blocks[split] if b.play == k) for k in range(K)]
    for line, k in list(zip(data.lines, data.labels))[:300]:
      assert line in texts[k]
      assert not line.startswith("[") and line.upper() != line
  again = text.play_lines(corpus, "val")
  assert again.lines == text.play_lines(corpus, "val").lines  # deterministic
  small = text.play_lines(corpus, "test", per_play=10)
  assert len(small.lines) == 10 * K
  x, m = text.encode_lines(small.lines, corpus.vocab, 48)
  assert x.shape == m.shape == (10 * K, 48)
  assert corpus.vocab.decode(x[0]) == small.lines[0][:48]
  with pytest.raises(ValueError, match="only"):
    text.play_lines(corpus, "test", per_play=10**6)


# ---------------------------------------------------------------------- models

def _model(kind, vocab=20, T=12):
  return sm.language_model(kind, vocab, length=T, d_model=16, num_layers=2,
                           num_heads=2, dropout=0.1)


@pytest.mark.parametrize("kind", ["transformer", "gru"])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(kind):
  model = _model(kind)
  params = model.init(jax.random.key(0))
  x = jax.random.randint(jax.random.key(1), (3, 12), 1, 20)
  t = 7
  x2 = x.at[:, t].set((x[:, t] % 19) + 1)
  a, b = model.apply(params, x), model.apply(params, x2)
  assert a.shape == (3, 12, 20)
  np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6)
  assert float(jnp.max(jnp.abs(a[:, t:] - b[:, t:]))) > 1e-4


@pytest.mark.parametrize("kind", ["transformer", "gru"])
def test_output_layer_is_the_transposed_input_embedding(kind):
  model = _model(kind)
  params = model.init(jax.random.key(0))
  vocab_leaves = [jax.tree_util.keystr(path) for path, leaf
                  in jax.tree_util.tree_leaves_with_path(params) if 20 in leaf.shape]
  assert vocab_leaves == ["['embed']['embedding']"]  # no separate output matrix
  x = jax.random.randint(jax.random.key(1), (2, 12), 1, 20)
  logits, state = model.module.apply({"params": params}, x, capture_intermediates=True)
  hidden = state["intermediates"]["ln_out"]["__call__"][0]
  np.testing.assert_allclose(logits, hidden @ params["embed"]["embedding"].T,
                             rtol=1e-5, atol=1e-5)


def test_padding_mask_excludes_pads_from_the_loss():
  model = _model("transformer")
  params = model.init(jax.random.key(0))
  x = jax.random.randint(jax.random.key(1), (2, 12), 1, 20)
  y = jax.random.randint(jax.random.key(2), (2, 12), 1, 20)
  mask = jnp.asarray([[1] * 12, [1] * 5 + [0] * 7], jnp.float32)
  loss = sm.lm_loss(model.apply(params, x), y, mask)
  # Right padding: other pad tokens and pad targets change nothing.
  x2 = x.at[1, 5:].set(0)
  y2 = y.at[1, 5:].set(3)
  np.testing.assert_allclose(sm.lm_loss(model.apply(params, x2), y2, mask), loss,
                             rtol=1e-6)
  # It is the mean over the 17 real tokens.
  per_token = -jax.nn.log_softmax(model.apply(params, x))
  per_token = jnp.take_along_axis(per_token, y[..., None], -1)[..., 0]
  want = (per_token[0].sum() + per_token[1, :5].sum()) / 17
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(sm.lm_loss(model.apply(params, x), y),
                             per_token.mean(), rtol=1e-5)


def test_dropout_key_fixes_the_masks_of_both_sam_passes():
  model = _model("transformer")
  params = model.init(jax.random.key(0))
  x = jax.random.randint(jax.random.key(1), (2, 12), 1, 20)
  y = jax.random.randint(jax.random.key(2), (2, 12), 1, 20)
  key = jax.random.key(3)
  closure = sm.loss_closure(model, x, y, key)
  assert float(closure(params)) == float(closure(params))
  other = sm.loss_closure(model, x, y, jax.random.key(4))
  assert float(closure(params)) != float(other(params))
  evaluation = sm.lm_loss(model.apply(params, x), y)
  assert float(evaluation) == float(sm.lm_loss(model.apply(params, x), y))
  assert float(evaluation) != float(closure(params))


# ------------------------------------------------------------------ quick mode

@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("language_model")
  readme = out / "README.md"
  readme.write_text(f"before\n{lm.START}\nold\n{lm.END}\nafter\n")
  result = lm.main(["--quick", "--out", str(out), "--readme", str(readme)])
  return out, readme, result


def test_quick_run_reports_every_fraction_and_optimizer(quick):
  out, readme, result = quick
  assert (out / lm.json_name("transformer")).exists()
  assert (out / lm.plot_name("transformer")).exists()
  assert json.loads((out / lm.json_name("transformer")).read_text())["settings"]["quick"]
  fractions = result["fractions"]
  assert [e["fraction"] for e in fractions.values()] == list(lm.FRACTIONS)
  for entry in fractions.values():
    assert set(entry["methods"]) == set(lm.METHODS)
    for m, e in entry["methods"].items():
      for k in ("val_loss", "test_loss", "test_ppl", "train_batch_loss_end"):
        assert len(e[k]["per_seed"]) == 2 and all(map(math.isfinite, e[k]["per_seed"]))
      np.testing.assert_allclose(e["test_ppl"]["per_seed"], np.exp(e["test_loss"]["per_seed"]))
      assert e["steps"] == result["settings"]["steps"] * lm.STEP_FACTOR[m]
      if m in ("sam", "fsam"):
        assert e["rho"] == entry["methods"]["sam"]["rho"]
    assert entry["methods"]["sam"]["rho"] in entry["methods"]["sam"]["rho_grid"]
    for pair, d in entry["paired"].items():
      a, b = pair.split("-")
      want = (np.asarray(entry["methods"][a]["test_loss"]["per_seed"])
              - np.asarray(entry["methods"][b]["test_loss"]["per_seed"]))
      np.testing.assert_allclose(d["per_seed"], want, atol=1e-12)
      assert d["wins"] == int(np.sum(want < 0)) and d["verdict"] in ("win", "loss", "tie")
  # Runs are paired: every optimizer starts from the seed's weights and data,
  # so the first recorded batch loss is the same for all of them.
  for entry in fractions.values():
    firsts = {m: e["curve"][0] for m, e in entry["methods"].items()}
    assert max(firsts.values()) - min(firsts.values()) < 1e-5, firsts


def test_quick_run_writes_the_readme_table(quick):
  _, readme, _ = quick
  body = readme.read_text()
  assert body.startswith("before\n") and body.endswith("after\n") and "old" not in body
  rows = [ln for ln in body.splitlines() if ln.startswith("| ") and "%" in ln.split("|")[1]]
  assert len(rows) == len(lm.FRACTIONS) * len(lm.METHODS)
  for frac in ("1%", "5%", "100%"):
    for label in lm.LABELS.values():
      assert any(r.startswith(f"| {frac} (") and f"| {label} |" in r for r in rows)
  for r in rows:
    cells = [c.strip() for c in r.strip("|").split("|")]
    test_loss = float(cells[6].split("±")[0])
    assert math.isfinite(test_loss) and 0 < test_loss < 6
  assert "Where SAM wins, loses or ties" in body


def test_quick_gru_run_writes_its_own_json_and_region(tmp_path):
  # Experiment 3: the GRU through the same command, into its own files and region.
  start, end = lm.region("gru")
  readme = tmp_path / "README.md"
  readme.write_text(f"{lm.START}\ntransformer\n{lm.END}\n{start}\nold\n{end}\n")
  result = lm.main(["--model", "gru", "--quick", "--fractions", "0.05", "--out",
                    str(tmp_path), "--readme", str(readme)])
  assert (tmp_path / lm.json_name("gru")).exists() and (tmp_path / lm.plot_name("gru")).exists()
  assert not (tmp_path / lm.json_name("transformer")).exists()
  assert result["model_description"].startswith("GRU")
  (entry,) = result["fractions"].values()
  firsts = {m: e["curve"][0] for m, e in entry["methods"].items()}  # paired
  assert max(firsts.values()) - min(firsts.values()) < 1e-5, firsts
  body = readme.read_text()
  assert "transformer" in body and "old" not in body and "--model gru" in body
