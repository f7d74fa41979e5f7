"""The auto-rho benchmark's quick mode end to end, and its floors' arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import auto_rho


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("auto_rho")
  readme = out / "README.md"
  readme.write_text(f"before\n{auto_rho.START}\nold\n{auto_rho.END}\nafter\n")
  result = auto_rho.main(["--quick", "--out", str(out), "--no-progress",
                          "--readme", str(readme)])
  return out, readme, result


def test_quick_run_pairs_sam_with_sgd_and_reports_the_floors(quick):
  out, readme, result = quick
  assert (out / auto_rho.JSON_NAME).exists() and (out / auto_rho.PLOT_NAME).exists()
  settings = result["parts"]["settings"]
  assert set(settings) == {"mnist1d_MLP", "digits_MLP"}
  for m in settings.values():
    for e in m["noise"].values():
      sgd = np.asarray(e["sgd"]["test_acc"]["per_seed"])
      for runs, paired in ((e["fixed"], e["fixed_vs_sgd"]), (e["auto"], e["auto_vs_sgd"])):
        for r, d in zip(runs, paired):  # paired difference = own − SGD, per seed
          np.testing.assert_allclose(
              d["per_seed"], np.asarray(r["test_acc"]["per_seed"]) - sgd, atol=1e-12)
      assert len(e["auto_grid"]) == 4  # the default target over SGD's lr x wd grid
  f = result["floors"]
  rows = [e for m in settings.values() for e in m["noise"].values()]
  want = np.mean([e["auto_vs_sgd"][e["default_target_index"]]["mean"] for e in rows])
  np.testing.assert_allclose(f["mean_gain_auto"], want)
  assert f["settings"] == len(rows)
  assert {r["kind"] for r in result["parts"]["stability"]["rows"]} == {
      "fixed", "guarded", "auto"}
  text = readme.read_text()
  assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
  assert "Floors: ρ=auto ahead of tuned SGD" in text
