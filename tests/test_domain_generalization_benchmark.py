"""The domain-generalization benchmark's quick mode: domains, pairing, cost."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import domain_generalization as dg


def test_domains_are_disjoint_rotations_of_the_same_digits():
  data = dg.domains()
  assert len(data) == len(dg.ANGLES)
  sizes = [len(y) for _, y in data]
  assert sum(sizes) == 1797 and max(sizes) - min(sizes) <= 1
  x0, _ = data[0]
  assert x0.shape[1] == 64 and 0.0 <= x0.min() and x0.max() <= 1.0 + 1e-6
  # The 0-degree domain is the original images; the others differ from them.
  from sklearn.datasets import load_digits
  images = load_digits().images.reshape(-1, 64) / 16.0
  order = np.random.default_rng(0).permutation(1797)
  first = np.array_split(order, len(dg.ANGLES))[0]
  np.testing.assert_allclose(x0, images[first], atol=1e-6)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("dg")
  readme = out / "README.md"
  readme.write_text(f"before\n{dg.START}\nold\n{dg.END}\nafter\n")
  result = dg.main(["--quick", "--out", str(out), "--readme", str(readme)])
  return readme, result


def test_quick_run_reports_every_method_with_its_cost(quick):
  readme, result = quick
  costs = result["costs"]
  assert [costs[m]["domain_gradients_per_step"] for m in dg.METHODS] == [4, 8, 5]
  # XLA's FLOPs follow the gradient counts: SAM about 2x ERM, DGSAM about 5/4.
  assert 1.8 < costs["sam"]["flops_ratio"] < 2.2
  assert 1.1 < costs["dgsam"]["flops_ratio"] < 1.45
  summary = result["summary"]
  for pair in ("dgsam-erm", "dgsam-sam", "sam-erm"):
    a, b = pair.split("-")
    np.testing.assert_allclose(
        summary[pair]["per_seed"],
        np.asarray(summary[a]["domain_mean_per_seed"])
        - np.asarray(summary[b]["domain_mean_per_seed"]), atol=1e-12)
  for entry in result["per_domain"].values():
    for m in ("sam", "dgsam"):
      assert entry[m]["rho"] in entry[m]["rho_grid"]
  text = readme.read_text()
  assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
  assert "| DGSAM |" in text
