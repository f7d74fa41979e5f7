"""benchmarks/sampa_parallel.py --quick: the JSON's structure and sane FLOP ratios."""

from __future__ import annotations

import json

from benchmarks import sampa_parallel


def test_quick_run_writes_the_json(tmp_path):
  sampa_parallel.main(["--quick", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "sampa_parallel.json").read_text())
  names = set(sampa_parallel.NAMES)
  for key in ("flops", "flops_ratio_to_sam", "median_seconds", "time_ratio_to_sam"):
    assert set(result[key]) == names, key
  assert result["config"]["quick"] is True
  assert all(v > 0 for v in result["median_seconds"].values())
  ratio = result["flops_ratio_to_sam"]
  assert ratio["sam"] == 1.0
  # Two gradients each: SAMPa's FLOPs are SAM's, give or take the prediction
  # and the mixing (elementwise), and the vmap changes the layout, not the work.
  assert 0.9 < ratio["sampa_sequential"] < 1.3, ratio
  assert 0.9 < ratio["sampa_parallel"] < 1.3, ratio
  assert abs(ratio["sampa_parallel"] - ratio["sampa_sequential"]) < 0.1, ratio
  assert result["parallel_speedup_over_sequential"] > 0
