"""The overhead benchmark: its JSON, its deterministic figures, its report region."""

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
  # 8 floors, 3 for the scheduled rho, 1 for LookSAM chosen by the loop
  assert len(checks) == 3 * 12
  assert all(isinstance(f["passed"], bool) for f in saved["floors"])
  _check_floors_against_figures(saved)


# The floors of the module docstring, written out here independently.
_LIMITS = {
    "sam FLOPs / base": 2.02,
    "sam time / base": 2.1,
    "sam time / contrib time": 1.0,
    "sam temp memory": 0.05,
    "looksam (k=5) amortized time": 1.3,
    "looksam (k=5) amortized FLOPs": 1.3,
    "msam time": 1.1,
    "msam FLOPs": 1.1,
    "sam, ρ schedule: time": 1.0,
    "sam, ρ schedule: temp memory": 0.05,
    "sam, ρ schedule: conditionals": 0,
    "sam, injected ρ: time": 1.0,
    "sam, injected ρ: temp memory": 0.05,
    "sam, injected ρ: conditionals": 0,
    "looksam (k=5), sam_pass from the loop": 1.3,
}


def _figure(model, check):
  """The recorded figure a floor is computed from, and the bound it must meet."""
  rows = {r["name"]: r for r in model["rows"]}
  sam, peer = rows.get(overhead.SAM), rows.get(overhead.PEER)
  look, msam = rows.get(overhead.LOOKSAM), rows.get(overhead.MSAM)
  if check.startswith("sam FLOPs"):
    return sam["flops_ratio"], sam["flops_ratio"]
  if check.startswith("sam time / base"):
    return sam["time_ratio"], sam["time_ratio"]
  if check.startswith("sam time / contrib"):  # passes when the 95% CI reaches 1
    cmp = model["sam_vs_peer_time"]
    return cmp["median"], cmp["ci95"][0]
  if check.startswith("sam temp memory"):
    extra = (sam["temp_bytes"] - peer["temp_bytes"]) / model["param_bytes"]
    return extra, extra
  if check.startswith("looksam (k=5) amortized time"):
    return look["time_ratio"], look["time_ratio"]
  if check.startswith("looksam (k=5) amortized FLOPs"):
    return look["flops_ratio_amortized"], look["flops_ratio_amortized"]
  for name in (overhead.SAM_SCHEDULE, overhead.SAM_INJECT):
    if check.startswith(f"{name}: time"):  # the 95% CI reaches 1
      cmp = model["traced_rho_vs_sam_time"][name]
      return cmp["median"], cmp["ci95"][0]
    if check.startswith(f"{name}: temp memory"):
      extra = (rows[name]["temp_bytes"] - sam["temp_bytes"]) / model["param_bytes"]
      return extra, extra
    if check.startswith(f"{name}: conditionals"):
      return rows[name]["conditionals"], rows[name]["conditionals"]
  if check.startswith("looksam (k=5), sam_pass from the loop"):
    host = rows[overhead.LOOKSAM_HOST]
    return host["time_ratio"], host["time_ratio"]
  if check.startswith("msam time"):
    return msam["time_ratio"], msam["time_ratio"]
  if check.startswith("msam FLOPs"):
    return msam["flops_ratio"], msam["flops_ratio"]
  raise AssertionError(f"unknown floor {check!r}")


def _check_floors_against_figures(result):
  """Every floor's value, limit and flag follow from the recorded figures."""
  models = {m["name"]: m for m in result["models"]}
  for f in result["floors"]:
    model = models[f["model"]]
    (limit,) = [v for k, v in _LIMITS.items() if f["check"].startswith(k)]
    value, compared = _figure(model, f["check"])
    assert f["value"] == pytest.approx(value, rel=1e-12, abs=1e-12), f
    assert f["limit"] == limit, f
    assert f["passed"] is bool(compared <= limit), f


def _synthetic_model(scale):
  """Figures on both sides of every floor (``scale`` > 1 fails them all)."""
  row = lambda name, **kw: {"name": name, **kw}  # noqa: E731
  return {
      "name": f"synthetic x{scale}",
      "param_bytes": 1000,
      "rows": [
          row(overhead.BASE, flops_ratio=1.0, time_ratio=1.0, temp_bytes=0),
          row(overhead.SAM, flops_ratio=2.0 * scale, time_ratio=2.0 * scale,
              temp_bytes=1000 + 40 * scale**4),
          row(overhead.PEER, flops_ratio=2.0, time_ratio=2.0, temp_bytes=1000),
          row(overhead.LOOKSAM, time_ratio=1.25 * scale,
              flops_ratio_amortized=1.25 * scale),
          row(overhead.MSAM, time_ratio=1.05 * scale, flops_ratio=1.05 * scale),
          row(overhead.SAM_SCHEDULE,
              temp_bytes=1000 + 40 * scale**4 + 1000 * (scale - 1),
              conditionals=int(scale > 1.05)),
          row(overhead.LOOKSAM_HOST, time_ratio=1.25 * scale),
      ],
      "sam_vs_peer_time": {"median": 0.99 * scale, "ci95": [0.98 * scale, 1.1]},
      "traced_rho_vs_sam_time": {overhead.SAM_SCHEDULE: {
          "median": 0.99 * scale, "ci95": [0.98 * scale, 1.1]}},
  }


@pytest.mark.parametrize("scale", [1.0, 1.03, 1.1])
def test_floor_flags_follow_from_the_figures(scale):
  """``overhead.floors`` on made-up figures (no timing): each flag is the
  comparison of its figure with the documented bound."""
  model = _synthetic_model(scale)
  found = overhead.floors(model)
  assert len(found) == 8 + 3 + 1
  _check_floors_against_figures({"models": [model], "floors": found})
  if scale == 1.0:
    assert all(f["passed"] for f in found)
  if scale == 1.1:
    assert not any(f["passed"] for f in found)
  assert {k: v for k, v in overhead.FLOOR.items()} == {
      "sam_flops": 2.02, "sam_time": 2.1, "looksam": 1.3, "msam": 1.1
  }
  assert overhead.MEMORY_SLACK == 0.05


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
    # A scheduled rho compiles what a number does; the loop's choice of
    # LookSAM's steps compiles two programs without a conditional.
    sched = rows[overhead.SAM_SCHEDULE]
    assert sched["conditionals"] == 0 == rows["sam"]["conditionals"]
    assert sched["flops"] == pytest.approx(rows["sam"]["flops"], rel=1e-3)
    host = rows[overhead.LOOKSAM_HOST]
    assert host["conditionals"] == 0 and not host["has_conditional"]
    assert host["flops_ratio_amortized"] == pytest.approx(
        (host["flops_ratio"] + 4 * host["flops_ratio_without_pass"]) / 5)
    assert host["flops_ratio_without_pass"] < 1.2


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
