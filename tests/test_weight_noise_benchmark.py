"""The weight-noise benchmark's quick mode end to end: pairing and arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import weight_noise


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("weight_noise")
  readme = out / "README.md"
  readme.write_text(f"before\n{weight_noise.START}\nold\n{weight_noise.END}\nafter\n")
  result = weight_noise.main(["--quick", "--out", str(out), "--no-progress",
                              "--readme", str(readme)])
  return out, readme, result


def test_every_optimizer_is_measured_at_every_level(quick):
  out, _, result = quick
  assert (out / weight_noise.JSON_NAME).exists() and (out / weight_noise.PLOT_NAME).exists()
  setting = result["settings_results"]["mnist1d"]
  assert set(setting["optimizers"]) == {"sgd", "sam", "asam", "samson"}
  for key, e in setting["optimizers"].items():
    if key != "sgd":  # the selected radius is in the variant's own grid
      assert e["rho"] in e["rho_grid"]
      scale = weight_noise.FRONTS[key][2]
      np.testing.assert_allclose(e["rho_grid"], np.asarray(weight_noise.RHO_SAM) * scale)
    for noise, levels in weight_noise.LEVELS.items():
      per_seed = np.asarray(e["noise"][noise]["per_seed"])
      assert per_seed.shape == (2, len(levels))
      # At sigma = 0 the noisy accuracy is the clean test accuracy of each seed.
      np.testing.assert_allclose(per_seed[:, 0], e["test_acc"]["per_seed"], atol=1e-6)
      np.testing.assert_allclose(e["noise"][noise]["mean"], per_seed.mean(axis=0))


def test_paired_differences_are_per_seed_differences(quick):
  _, _, result = quick
  setting = result["settings_results"]["mnist1d"]
  opts = setting["optimizers"]
  for pair, by_noise in setting["paired"].items():
    a, b = pair.split("-")
    for noise, diffs in by_noise.items():
      for j, d in enumerate(diffs):
        want = (np.asarray(opts[a]["noise"][noise]["per_seed"])[:, j]
                - np.asarray(opts[b]["noise"][noise]["per_seed"])[:, j])
        np.testing.assert_allclose(d["per_seed"], want, atol=1e-12)


def test_the_readme_region_is_regenerated(quick):
  _, readme, _ = quick
  text = readme.read_text()
  assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
  assert "| SAMSON |" in text and "SAMSON − SAM" in text
