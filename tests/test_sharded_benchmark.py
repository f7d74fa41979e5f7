"""The data-parallel benchmark runs, and its communication figures hold.

Communication is read from the compiled programs, so it is deterministic:
per-device SAM moves as many bytes as data-parallel SGD (one all-reduce of
the gradient; the rest are scalars), synchronized SAM one more gradient, and
groups of k one more gradient per doubling round (log2 k).
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import sharded


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharded")
  sharded.main(["--quick", "--out", str(out)])
  return json.loads((out / "sharded_cpu.json").read_text())


def test_communication_per_mode(result):
  rows = {r["name"]: r for r in result["rows"]}
  base = rows["data-parallel SGD (base)"]["comm_bytes_over_param_bytes"]
  assert base == pytest.approx(1.0, abs=0.01)
  assert rows["sam, per device"]["comm_bytes_over_param_bytes"] == pytest.approx(base, abs=0.01)
  assert rows["sam, sync_perturbation"]["comm_bytes_over_param_bytes"] == pytest.approx(2.0, abs=0.01)
  for k in (2, 4):
    row = rows[f"sam, group_size={k}"]
    assert row["comm_bytes_over_param_bytes"] == pytest.approx(1 + math.log2(k), abs=0.01)
    assert "collective-permute" in row["collectives"]
  for name, row in rows.items():
    if name.startswith("sam"):
      assert 1.9 < row["flops_ratio"] < 2.2, (name, row["flops_ratio"])


def test_collectives_parser():
  hlo = (
      "%a = f32[4,8]{1,0} all-reduce(f32[4,8]{1,0} %x), replica_groups={}\n"
      "%b = (f32[3]{0}, bf16[2]{0}) all-reduce-start(%y, %z)\n"
      "%c = f32[5]{0} collective-permute(f32[5]{0} %w), source_target_pairs={{0,1}}\n"
      "%d = f32[5]{0} add(%c, %c)\n"
  )
  assert sharded.collectives(hlo) == {
      "all-reduce": {"count": 2, "bytes": 4 * 32 + 4 * 3 + 2 * 2},
      "collective-permute": {"count": 1, "bytes": 20},
  }


def test_readme_region_is_rewritten_in_place(result, tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text(f"before\n{sharded.START}\nold\n{sharded.END}\nafter\n")
  sharded.write_readme(readme, result)
  once = readme.read_text()
  sharded.write_readme(readme, result)
  assert readme.read_text() == once
  assert once.startswith("before\n") and once.endswith("after\n")
  assert "sam, sync_perturbation" in once and "old" not in once
