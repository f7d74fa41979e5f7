"""The long-training benchmark: quick mode end to end, the report region, the verdict."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import generalization as gen
from benchmarks import long_training as lt

TUNED = {"sgd": {"lr": 0.1, "wd": 5e-3},
         "sam": {"lr": 0.1, "rho": 0.1, "wd": 5e-3}}


def _tuned_json(path):
  """A minimal generalization JSON holding the tuned settings of the setting."""
  entry = {k: {"tuned": {"hparams": h}} for k, h in TUNED.items()}
  path.write_text(json.dumps({
      "settings": {"epochs": 40, "seeds": [0, 1, 2], "quick": False},
      "parts": {"mnist1d": {"models": {"MLP": {"noise": {"25": entry}}}}}}))
  return path


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("long")
  tuned = _tuned_json(out / "generalization.json")
  result = lt.main(["--quick", "--out", str(out), "--tuned", str(tuned),
                    "--no-progress"])
  return out, result


def test_quick_run_writes_paired_curves_of_both_optimizers(quick):
  out, result = quick
  stored = json.loads((out / lt.JSON_NAME).read_text())
  assert stored["eval_epochs"] == result["eval_epochs"] == [2, 4]
  assert (out / lt.PNG_NAME).stat().st_size > 0
  s = stored["settings"]
  assert s["epochs"] == 4 and s["eval_every"] == 2 and s["seeds"] == [0, 1]
  assert s["total_steps"] == 4 * s["steps_per_epoch"]
  assert s["hparams_source"]["epochs"] == 40
  assert set(stored["optimizers"]) == {"sgd", "sam"}
  for key, o in stored["optimizers"].items():
    assert o["hparams"] == pytest.approx(TUNED[key])
    for m in lt.METRICS:
      assert np.asarray(o["curves"][m]).shape == (2, 2), (key, m)
    acc = np.asarray(o["curves"]["test_acc"])
    assert np.all((acc > 0.1) & (acc <= 1.0))
    memorized = np.asarray(o["curves"]["fit_noisy"])
    assert np.all((memorized >= 0) & (memorized <= 1))
    # 25% of the training labels are flipped for every seed.
    n_train = s["n_train"]
    assert o["label_flips"] == [round(0.25 * n_train)] * 2
  sgd, sam = stored["optimizers"]["sgd"], stored["optimizers"]["sam"]
  assert sgd["fingerprints"] == sam["fingerprints"]  # paired
  assert len(set(sgd["fingerprints"])) == 2  # seeds differ
  # SAM with the same lr and wd is a different optimizer: the curves differ.
  assert not np.allclose(sgd["curves"]["test_acc"], sam["curves"]["test_acc"])


def test_summary_rows_are_recomputed_from_the_curves(quick):
  _, result = quick
  summary = result["summary"]
  assert [r["epoch"] for r in summary["rows"]] == [4]  # no checkpoint reached
  row = summary["rows"][0]
  sgd = np.asarray(result["optimizers"]["sgd"]["curves"]["test_acc"])[:, -1]
  sam = np.asarray(result["optimizers"]["sam"]["curves"]["test_acc"])[:, -1]
  np.testing.assert_allclose(row["sam_minus_sgd"]["per_seed"], sam - sgd)
  assert row["lr_factor"] == pytest.approx(0.0, abs=1e-12)
  for k in ("sgd", "sam"):
    acc = np.asarray(result["optimizers"][k]["curves"]["test_acc"])
    np.testing.assert_allclose(
        summary["best"][k]["test_acc"]["per_seed"], acc.max(axis=1))


def test_table_epochs_keep_the_checkpoints_reached_and_the_end():
  assert lt.table_epochs(list(range(10, 401, 10))) == [50, 100, 200, 300, 400]
  assert lt.table_epochs(list(range(10, 251, 10))) == [50, 100, 200, 250]
  assert lt.table_epochs([2, 4]) == [4]
  assert lt.lr_factor(200, 400) == pytest.approx(0.5)


def test_readme_region_is_rewritten_in_place_and_idempotently(quick, tmp_path):
  out, result = quick
  readme = tmp_path / "README.md"
  other = f"{gen.START}\nkept\n{gen.END}\n"
  original = (f"# title\n\n{other}\n### Training longer\n\ncontext\n\n"
              f"{lt.START}\nold text\n{lt.END}\n\nafter\n")
  readme.write_text(original)
  lt.main(["--report-only", "--out", str(out), "--readme", str(readme)])
  once = readme.read_text()
  head, rest = once.split(lt.START + "\n", 1)
  body, tail = rest.split("\n" + lt.END, 1)
  assert head == original.split(lt.START)[0]
  assert tail == original.split(lt.END)[1]
  assert "old text" not in body
  assert "| each run's best (oracle) |" in body
  assert "SAM − SGD" in body and "fit clean / noisy" in body
  assert result["summary"]["verdict"]["sentence"] in body
  assert "--quick" in body
  lt.main(["--report-only", "--out", str(out), "--readme", str(readme)])
  assert readme.read_text() == once


def test_missing_tuned_json_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match="not found"):
    lt.tuned_hparams(tmp_path / "nothing.json")
  (tmp_path / "g.json").write_text(json.dumps({"parts": {}}))
  with pytest.raises(SystemExit, match="holds no tuned"):
    lt.tuned_hparams(tmp_path / "g.json")


# ---------------------------------------------------------------------------
# The verdict on hand-made curves (5 seeds, evaluations every 50 epochs).

EPOCHS = [50, 100, 150, 200, 250, 300, 350, 400]
JITTER = np.array([-0.004, 0.002, 0.0, 0.003, -0.001])[:, None]


def _rising(start, end):
  return np.linspace(start, end, len(EPOCHS))[None, :] + JITTER


def test_verdict_clear_win_without_overfitting():
  sgd = _rising(0.50, 0.60)
  sam = sgd + 0.05 + np.array([0.0, 0.003, -0.002, 0.001, 0.002])[:, None]
  v = lt.verdict(EPOCHS, sgd, sam)
  assert v["final"] == "win"
  assert v["final_diff"]["wins"] == 5
  assert not v["sgd_peak"]["peaks_before_end"] and not v["sgd_peak"]["falls"]
  assert v["claim"] == "not tested"
  assert v["sentence"].startswith("At epoch 400, SAM wins against SGD (+5.1")
  assert "does not fall significantly" in v["sentence"]


def test_verdict_clear_loss():
  sgd = _rising(0.50, 0.60)
  sam = sgd - 0.04 + np.array([0.001, -0.002, 0.0, 0.002, -0.001])[:, None]
  v = lt.verdict(EPOCHS, sgd, sam)
  assert v["final"] == "loss" and v["final_diff"]["wins"] == 0
  assert "SAM loses to SGD (-4.0 points" in v["sentence"]


def test_verdict_tie():
  sgd = _rising(0.50, 0.60)
  sam = sgd + np.array([0.01, -0.01, 0.012, -0.011, 0.0])[:, None]
  v = lt.verdict(EPOCHS, sgd, sam)
  assert v["final"] == "tie"
  lo, hi = v["final_diff"]["ci"]
  assert lo < 0 < hi
  assert "SAM ties with SGD" in v["sentence"]


def test_verdict_sgd_peaks_then_falls_while_sam_keeps_improving():
  # SGD rises to 60% at epoch 150, then falls to 52%; SAM rises to 63%.
  shape = np.array([0.50, 0.56, 0.60, 0.58, 0.56, 0.54, 0.53, 0.52])
  sgd = shape[None, :] + JITTER
  sam = _rising(0.50, 0.63)
  v = lt.verdict(EPOCHS, sgd, sam)
  p = v["sgd_peak"]
  assert p["epoch"] == 150 and p["peaks_before_end"] and p["falls"]
  assert p["peak"] == pytest.approx(0.60, abs=0.001)
  assert p["drop"] == pytest.approx(0.08, abs=1e-9)
  assert not v["sam_peak"]["peaks_before_end"]
  assert v["sam_after_sgd_peak"]["verdict"] == "win"
  assert v["final"] == "win"
  assert v["claim"] == "supported"
  assert "peaks at epoch 150 (60.0%) and ends 8.0 points below it" in v["sentence"]
  assert "supports the claim" in v["sentence"]


def test_verdict_both_overfit_is_not_support():
  shape = np.array([0.50, 0.56, 0.60, 0.58, 0.56, 0.54, 0.53, 0.52])
  sgd = shape[None, :] + JITTER
  sam = sgd + 0.02
  v = lt.verdict(EPOCHS, sgd, sam)
  assert v["sgd_peak"]["falls"] and v["sam_peak"]["falls"]
  assert v["sam_after_sgd_peak"]["verdict"] == "loss"
  assert v["claim"] == "not supported"
  assert "SAM falls too" in v["sentence"]


def test_verdict_rejects_mismatched_curves():
  with pytest.raises(ValueError):
    lt.verdict(EPOCHS, np.zeros((5, 8)), np.zeros((4, 8)))
  with pytest.raises(ValueError):
    lt.verdict(EPOCHS[:-1], np.zeros((5, 8)), np.zeros((5, 8)))
