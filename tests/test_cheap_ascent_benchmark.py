"""The cheap-ascent benchmark: its trainer, costs and report (quick mode)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import cheap_ascent as ca
from benchmarks import language_model as lm
from benchmarks.common import sequence_models as sm
from benchmarks.common import text


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("cheap_ascent")
  return out, ca.main(["--quick", "--out", str(out)])


def test_quick_run_structure_costs_and_pairing(quick):
  out, result = quick
  assert json.loads((out / ca.JSON_NAME).read_text()) == result
  (entry,) = result["fractions"].values()
  assert set(entry["methods"]) == set(ca.METHODS)
  n = len(result["settings"]["seeds"])
  for m in ca.METHODS:
    assert len(entry["methods"][m]["test_loss"]["per_seed"]) == n
  assert entry["methods"]["adamw125"]["steps"] == round(1.25 * result["settings"]["steps"])
  # XLA's FLOPs: full SAM about two steps, the quarter-batch ascent about 1.25.
  flops = result["flops_ratio"]
  assert flops["adamw125"] == pytest.approx(1.0)
  assert 1.85 <= flops["sam"] <= 2.1
  assert 1.15 <= flops["sam_quarter"] <= 1.4
  for key, d in entry["paired"].items():
    m, ref = key.split("-")
    want = (np.asarray(entry["methods"][m]["test_loss"]["per_seed"])
            - np.asarray(entry["methods"][ref]["test_loss"]["per_seed"]))
    np.testing.assert_allclose(d["per_seed"], want, rtol=1e-12)
    assert d["verdict"] in ("win", "loss", "tie")


def test_readme_region_is_rewritten_alone(quick, tmp_path):
  out, _ = quick
  readme = tmp_path / "README.md"
  readme.write_text(f"before\n{ca.START}\nstale\n{ca.END}\nafter\n")
  ca.main(["--report-only", "--out", str(out), "--readme", str(readme)])
  text_ = readme.read_text()
  assert text_.startswith("before\n") and text_.endswith("after\n")
  assert "stale" not in text_ and "¼-batch ascent" in text_
  ca.main(["--report-only", "--out", str(out), "--readme", str(readme)])
  assert readme.read_text() == text_


def _one_step(method, rho, ascent=None):
  corpus = text.load_corpus()
  cfg = {**lm.DEFAULTS, **lm.QUICK, "chunk": 1}
  model = sm.language_model("transformer", corpus.vocab.size, length=cfg["length"],
                            d_model=cfg["d_model"], num_layers=cfg["num_layers"],
                            num_heads=cfg["num_heads"], dropout=0.0)
  full = corpus.splits["train"]
  _, data = lm.train_data(full, 0.05, cfg["length"], 0, full.num_tokens,
                          len(text.window_starts(full, cfg["length"])))
  t = lm.Trainer(model, cfg, method, kind=ca.KIND[method], ascent_batch=ascent)
  params, _, _ = t.run(0, rho, 1, data)
  return params


def test_the_ascent_batch_only_moves_the_ascent():
  # rho = 0: the step is the base optimizer's on the closure's full batch,
  # whatever batch the (unused) ascent gradient came from.
  flat = lambda p: np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])  # noqa: E731
  adamw = flat(_one_step("adamw", 0.0))
  np.testing.assert_allclose(flat(_one_step("sam_quarter", 0.0, ascent=4)), adamw,
                             rtol=1e-6, atol=1e-7)
  # rho > 0: the quarter's ascent differs from the whole batch's.
  quarter = flat(_one_step("sam_quarter", 0.5, ascent=4))
  whole = flat(_one_step("sam", 0.5))
  assert not np.allclose(quarter, whole, rtol=1e-4, atol=1e-6)
  assert not np.allclose(quarter, adamw, rtol=1e-4, atol=1e-6)
