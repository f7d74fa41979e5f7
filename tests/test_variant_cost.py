"""The compiled cost of every transform (XLA's deterministic FLOPs)."""

from __future__ import annotations

import json

from benchmarks import variant_cost


def test_variant_cost_floors_and_readme_table(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{variant_cost.START}\nstale\n{variant_cost.END}\nend\n")
  result = variant_cost.main(["--out", str(tmp_path), "--readme", str(readme)])
  rows = {r["name"]: r for r in json.loads((tmp_path / "variant_cost.json").read_text())["rows"]}
  assert rows == {r["name"]: r for r in result["rows"]}
  # Two-pass SAM: the floor is 2.0x; the excess is norms and elementwise work.
  assert 1.99 <= rows["sam"]["flops_ratio"] <= 2.02
  assert rows["sam"]["flops_ratio"] <= rows["optax.contrib.sam (opaque)"]["flops_ratio"] + 0.02
  assert 2.9 <= rows["sam, 2 ascent steps"]["flops_ratio"] <= 3.05
  assert rows["looksam (k=5)"]["flops_ratio_amortized"] <= 1.3
  assert rows["msam"]["flops_ratio"] <= 1.1
  # The full optimizers: two passes (WSAM decoupled, bSAM: its noise draws
  # add elementwise work), and k + 1 for Lookbehind-SAM.
  assert 1.99 <= rows["wsam_decoupled"]["flops_ratio"] <= 2.1
  assert 2.95 <= rows["lookbehind_sam (k=2)"]["flops_ratio"] <= 3.15
  assert 1.99 <= rows["bsam (replaces the base)"]["flops_ratio"] <= 2.7
  # GAM: four gradients; SAMPa: two, the clean gradient it does not read
  # left dead by XLA.
  assert 3.95 <= rows["gam"]["flops_ratio"] <= 4.15
  assert 1.99 <= rows["sampa"]["flops_ratio"] <= 2.1
  for name in ("gcsam", "wsam"):
    assert 1.99 <= rows[name]["flops_ratio"] <= 2.1, name
  text = readme.read_text()
  assert "stale" not in text and "| sam | " in text and text.endswith("end\n")
