"""The overhead benchmark: its JSON, its deterministic figures, its README region."""

from __future__ import annotations

import json

import jax
import pytest

from benchmarks import overhead


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("overhead")
  result = overhead.main(["--quick", "--out", str(out), "--no-progress"])
  return out, result


def test_json_structure(quick):
  out, result = quick
  saved = json.loads((out / "overhead_cpu_quick.json").read_text())
  assert saved == json.loads(json.dumps(result))
  machine = saved["machine"]
  for key in ("devices", "cpu_count", "jax", "optax", "flax", "sam_optax"):
    assert machine[key], key
  assert saved["command"].startswith("python benchmarks/overhead.py")
  assert [m["name"] for m in saved["models"]] == ["mlp", "resnet", "transformer"]
  names = [overhead.BASE, *overhead.QUICK_VARIANTS]
  for model in saved["models"]:
    assert [r["name"] for r in model["rows"]] == names
    assert model["param_bytes"] > 0 and model["call_overhead_s"] > 0
    for row in model["rows"]:
      for key in ("time_median_s", "time_q25_s", "time_q75_s", "time_ratio",
                  "flops", "flops_ratio", "temp_bytes", "argument_bytes",
                  "output_bytes", "temp_over_param_bytes"):
        assert row[key] == row[key] and row[key] is not None, (row["name"], key)
      assert row["time_q25_s"] <= row["time_median_s"] <= row["time_q75_s"]
  # The BatchNorm statistics are part of the carried state.
  assert saved["models"][1]["state_bytes"] > 0
  assert saved["models"][0]["state_bytes"] == 0
  checks = {(f["model"], f["check"]) for f in saved["floors"]}
  assert len(checks) == 3 * 8
  assert all(isinstance(f["passed"], bool) for f in saved["floors"])


def test_deterministic_figures(quick):
  _, result = quick
  for model in result["models"]:
    rows = {r["name"]: r for r in model["rows"]}
    assert rows["base"]["flops_ratio"] == 1.0
    assert rows["base"]["extra_temp_over_param_bytes"] == 0.0
    assert 1.9 <= rows["sam"]["flops_ratio"] <= 2.1, model["name"]
    peer = rows["optax.contrib.sam (opaque)"]
    assert 1.9 <= peer["flops_ratio"] <= 2.1, model["name"]
    # LookSAM compiles both branches, and runs the pass once per 5 steps.
    look = rows["looksam (k=5)"]
    assert look["has_conditional"], model["name"]
    assert look["flops_ratio_without_pass"] < 1.2
    assert 1.0 < look["flops_ratio_amortized"] < look["flops_ratio"]
    assert "time_step_with_pass_s" in look and "time_step_without_pass_s" in look
    # MSAM needs no second pass.
    assert rows["msam"]["flops_ratio"] < 1.2, model["name"]


def test_readme_rewrite_is_idempotent_and_local(quick, tmp_path):
  _, result = quick
  readme = tmp_path / "README.md"
  before = "# title\n\nintro\n\n### Overhead\n\n"
  after = "\ntext after\n<!-- variant-cost:start -->\nkept\n<!-- variant-cost:end -->\n"
  readme.write_text(before + f"{overhead.START}\nstale\n{overhead.END}" + after)
  overhead.write_readme(readme, result)
  once = readme.read_text()
  overhead.write_readme(readme, result)
  assert readme.read_text() == once
  assert once.startswith(before) and once.endswith(overhead.END + after)
  assert "stale" not in once
  region = once[len(before):-len(after)]
  assert "| sam |" in region and "| transform |" in region
  assert result["command"] in region
  assert "pass" in region or "fail" in region


def test_missing_markers_raise(quick, tmp_path):
  _, result = quick
  readme = tmp_path / "README.md"
  readme.write_text("no markers\n")
  with pytest.raises(ValueError, match="overhead"):
    overhead.write_readme(readme, result)


def test_gpu_request_without_gpu_fails_clearly(tmp_path):
  try:
    jax.devices("gpu")
    pytest.skip("a GPU is present")
  except RuntimeError:
    pass
  with pytest.raises(SystemExit, match="no GPU"):
    overhead.main(["--device", "gpu", "--quick", "--out", str(tmp_path)])
