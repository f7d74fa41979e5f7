"""A curated mutation run over the update rules (on demand, not in CI).

Each mutation is one exact ``old -> new`` text replacement in one file of
``sam_optax``: a plausible mistake in an update rule (a dropped ``eps``, a
wrong sign, a per-leaf instead of a global norm, device 0's state instead of
the mean, ...). For each, the repository is copied to a temporary folder, the
replacement applied there (the working tree is never touched), and a chosen
subset of the tests run with ``pytest -x -q -p no:xdist``. A mutation is
*killed* when the tests fail, *survived* when they pass, and *not
applicable* when its ``old`` text is no longer in the file exactly once (the
code it targets was rewritten).

``python benchmarks/mutation.py [--list] [--only ID ...] [--tests-rev REV]
[--suite focused|legacy] [--timeout S] [--out benchmarks/results]`` prints a
line per mutation and the kill rate, and writes
``benchmarks/results/mutation.json`` (``mutation_<suite>.json`` for another
suite or a ``--tests-rev``). ``--tests-rev`` replaces the copy's ``tests/``
with that git revision's (to measure an older test suite); ``--suite legacy``
runs, for each mutation, the tests that covered its rule before the oracles
of ``tests/oracles.py`` existed (whole files filtered by ``-k``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
P = "sam_optax/_parts/perturbations.py"
D = "sam_optax/_parts/directions.py"
POL = "sam_optax/_parts/policies.py"
C = "sam_optax/_core/collectives.py"
S = "sam_optax/_core/stages.py"
M = "sam_optax/_core/masking.py"
T = "sam_optax/_core/tree.py"
R = "sam_optax/_core/radius.py"


def _oracle(*names: str, how: str = "jit") -> list[str]:
  return [f"tests/test_contract.py::test_first_steps_match_the_oracle[{how}-{name}]"
          for name in names]


def _zero(*names: str) -> list[str]:
  return [f"tests/test_contract.py::test_zero_gradient_gives_zero_update_not_nan[const-{name}]"
          for name in names]


def _stateful(*names: str, mode: str = "per_device") -> list[str]:
  return [
      "tests/test_distributed.py::"
      f"test_stateful_variants_under_shard_map_match_per_shard_reference[{name}-{mode}]"
      for name in names
  ]


def _legacy(files: list[str], k: str) -> list[str]:
  return [*files, "-k", k]


@dataclasses.dataclass(frozen=True)
class Mutation:
  """One replacement; ``tests``/``legacy`` are pytest arguments."""

  id: str
  file: str
  old: str
  new: str
  tests: list[str]
  legacy: list[str]
  rule: bool = True  # a mutation of an update rule (else of a guard)


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "sam-norm-without-eps", P,
        "lambda g, params: tree.scale_wide(g, 1.0 / (tree.global_norm(g) + eps))",
        "lambda g, params: tree.scale_wide(g, 1.0 / tree.global_norm(g))",
        _zero("sam", "gsam", "looksam") + _oracle("sam"),
        _legacy(["tests/test_contract.py", "tests/test_sam.py"], "sam and not asam and not usam"),
    ),
    Mutation(
        "sam-ascends-downhill", P,
        "lambda g, params: tree.scale_wide(g, 1.0 / (tree.global_norm(g) + eps))",
        "lambda g, params: tree.scale_wide(g, -1.0 / (tree.global_norm(g) + eps))",
        _oracle("sam"),
        _legacy(["tests/test_sam.py"], "reference"),
    ),
    Mutation(
        "asam-without-eta", P,
        '_elementwise("asam", lambda w: jnp.abs(w) + eta, mask, eps)',
        '_elementwise("asam", lambda w: jnp.abs(w), mask, eps)',
        _oracle("asam", "composed"),
        _legacy(["tests/test_variants_basic.py"], "asam"),
    ),
    Mutation(
        "asam-norm-of-t2g", P,
        "factor = 1.0 / (tree.global_norm(tg) + eps)\n    return jax.tree.map(lambda ti, x: ti * x * factor, t, tg)",
        "tt = jax.tree.map(lambda ti, x: ti * x, t, tg)\n    factor = 1.0 / (tree.global_norm(tt) + eps)\n"
        "    return jax.tree.map(lambda x: x * factor, tt)",
        _oracle("asam"),
        _legacy(["tests/test_variants_basic.py"], "asam"),
    ),
    Mutation(
        "samson-without-layer-norm", P,
        "(a + eta) / jnp.where(n > 0, n, 1.0)",
        "(a + eta)",
        _oracle("samson", "samson_p2"),
        _legacy(["tests/test_samson.py"], "rule"),
    ),
    Mutation(
        "samson-eta-after-division", P,
        "(a + eta) / jnp.where(n > 0, n, 1.0)",
        "a / jnp.where(n > 0, n, 1.0) + eta",
        _oracle("samson", "samson_p2"),
        _legacy(["tests/test_samson.py"], "rule"),
    ),
    Mutation(
        "looksam-per-leaf-norm", D,
        "    scale = alpha * tree.global_norm(g) / jnp.maximum(\n"
        "        tree.global_norm(state.g_v), eps\n    )\n"
        "    out = jax.tree.map(\n"
        "        lambda gi, v: gi.astype(v.dtype) + scale.astype(v.dtype) * v,\n",
        "    def per_leaf(gi, v):\n"
        "      gi = gi.astype(v.dtype)\n"
        "      s = alpha * jnp.sqrt(jnp.sum(gi * gi)) / jnp.maximum(jnp.sqrt(jnp.sum(v * v)), eps)\n"
        "      return gi + s * v\n"
        "    out = jax.tree.map(\n"
        "        per_leaf,\n",
        _oracle("looksam") + _stateful("looksam"),
        _legacy(["tests/test_variants_basic.py", "tests/test_distributed.py"], "looksam"),
    ),
    Mutation(
        "looksam-projects-on-the-wrong-gradient", D,
        "coef = tree.vdot(g_p, g) / jnp.maximum(tree.vdot(g, g), eps * eps)",
        "coef = tree.vdot(g_p, g) / jnp.maximum(tree.vdot(g_p, g_p), eps * eps)",
        _oracle("looksam"),
        _legacy(["tests/test_variants_basic.py"], "looksam"),
    ),
    Mutation(
        "gsam-decomposes-the-wrong-gradient", D,
        "unit = tree.scale_wide(g_p, 1.0 / (tree.global_norm(g_p) + eps))",
        "unit = tree.scale_wide(tree.widen(g), 1.0 / (tree.global_norm(g) + eps))",
        _oracle("gsam", "composed"),
        _legacy(["tests/test_variants_basic.py", "tests/test_composition.py"], "gsam"),
    ),
    Mutation(
        "gsam-adds-the-orthogonal-part", D,
        "lambda gp, gi, ui: gp - alpha * (gi.astype(gp.dtype) - along * ui)",
        "lambda gp, gi, ui: gp + alpha * (gi.astype(gp.dtype) - along * ui)",
        _oracle("gsam"),
        _legacy(["tests/test_variants_basic.py", "tests/test_composition.py"], "gsam"),
    ),
    Mutation(
        "rwp-mix-weights-swapped", D,
        "return a * perturbed.astype(wide) + (1 - a) * clean.astype(wide)",
        "return (1 - a) * perturbed.astype(wide) + a * clean.astype(wide)",
        _oracle("rwp") + ["tests/test_variants_random.py::test_rwp_matches_paper"],
        _legacy(["tests/test_variants_random.py", "tests/test_composition.py"], "rwp or mix"),
    ),
    Mutation(
        "every-k-off-by-one", POL,
        "return count % k == 0, state",
        "return (count + 1) % k == 0, state",
        _oracle("looksam", "composed"),
        _legacy(["tests/test_variants_basic.py", "tests/test_composition.py"], "looksam or every"),
    ),
    Mutation(
        "ae-sam-threshold-sign", POL,
        "take = sq >= mean + c * jnp.sqrt(var)",
        "take = sq >= mean - c * jnp.sqrt(var)",
        _oracle("ae_sam") + ["tests/test_ae_sam.py"],
        ["tests/test_ae_sam.py"],
    ),
    Mutation(
        "vasso-theta-swapped", P,
        "average = _moving_average(lambda: theta)",
        "average = _moving_average(lambda: 1 - theta)",
        _oracle("vasso") + _stateful("vasso"),
        _legacy(["tests/test_variants_momentum.py"], "vasso"),
    ),
    Mutation(
        "moving-average-without-first-step", P,
        "return jnp.where(first, g, (1 - a) * m + a * g).astype(m.dtype)",
        "return ((1 - a) * m + a * g).astype(m.dtype)",
        _oracle("vasso", "friendly_sam"),
        _legacy(["tests/test_variants_momentum.py"], "vasso or friendly"),
    ),
    Mutation(
        "fsam-sigma-sign", P,
        "return jnp.where(first, gi, gi - jnp.asarray(sigma).astype(m.dtype) * m)",
        "return jnp.where(first, gi, gi + jnp.asarray(sigma).astype(m.dtype) * m)",
        _oracle("friendly_sam") + _stateful("friendly_sam"),
        _legacy(["tests/test_variants_momentum.py"], "friendly"),
    ),
    Mutation(
        "fisher-sam-multiplies-by-f", P,
        "lambda x: x / (1 + jnp.asarray(eta).astype(x.dtype) * x * x), g",
        "lambda x: x * (1 + jnp.asarray(eta).astype(x.dtype) * x * x), g",
        _oracle("fisher_sam"),
        _legacy(["tests/test_variants_momentum.py"], "fisher"),
    ),
    Mutation(
        "fisher-mask-inverted", M,
        "selected = ranks < keep",
        "selected = ranks >= keep",
        _oracle("fisher_masked_sam"),
        _legacy(["tests/test_variants_masked.py"], "fisher"),
    ),
    Mutation(
        "fisher-mask-refresh-off-by-one", P,
        "due = count_ % jnp.asarray(refresh_every, count_.dtype) == 0",
        "due = count_ % jnp.asarray(refresh_every, count_.dtype) == 1",
        _oracle("fisher_masked_sam") + _stateful("fisher_masked_sam"),
        _legacy(["tests/test_variants_masked.py"], "fisher"),
    ),
    Mutation(
        "fisher-score-not-reset-at-refresh", P,
        "return new, jax.tree.map(jnp.zeros_like, acc) if accumulate else ()",
        "return new, acc if accumulate else ()",
        _oracle("fisher_masked_sam") + _stateful("fisher_masked_sam"),
        _legacy(["tests/test_variants_masked.py"], "fisher"),
    ),
    Mutation(
        "masked-normalization-swapped", P,
        "    if mask_gradient:\n      g = masking.select(",
        "    if not mask_gradient:\n      g = masking.select(",
        _oracle("masked_sam", "sam_on"),
        _legacy(["tests/test_variants_masked.py"], "masked_sam or sam_on"),
    ),
    Mutation(
        "random-mask-not-rescaled-by-beta", P,
        "d = tree.scale_wide(d, 1.0 / p)",
        "d = tree.scale_wide(d, 1.0 + 0.0 * p)",
        _oracle("esam", "composed_random_mask"),
        _legacy(["tests/test_variants_random.py", "tests/test_composition.py"], "esam or random_mask"),
    ),
    Mutation(
        "agree-keeps-device-0", C,
        "        return jax.lax.pmean(x, names)\n",
        "        return jax.lax.psum(jnp.where(first, x, jnp.zeros_like(x)), names)\n",
        _stateful("vasso", "friendly_sam", "looksam"),
        ["tests/test_distributed.py"],
    ),
    Mutation(
        "group-mean-pairs-the-wrong-members", C,
        "perm = [(i, i ^ bit) for i in range(n)]",
        "perm = [(i, (i + bit) % n) for i in range(n)]",
        ["tests/test_distributed.py::test_shard_map_matches_grouped_reference[group=2-True]"],
        ["tests/test_distributed.py"],
    ),
    Mutation(
        "sync-perturbation-stays-local", C,
        "      return jax.lax.pmean(grads, self.name)\n    if self.group_size",
        "      return grads\n    if self.group_size",
        ["tests/test_distributed.py::test_shard_map_matches_grouped_reference[sync-True]"],
        ["tests/test_distributed.py"],
    ),
    # The builder is being restructured: these snippets are small, and a
    # missing one is reported as not applicable.
    Mutation(
        "ascent-step-not-divided-by-n", S,
        "step = rho_t.astype(clean.norm.dtype) / jnp.asarray(",
        "step = rho_t.astype(clean.norm.dtype) + 0 * jnp.asarray(",
        _oracle("sam_2steps"),
        _legacy(["tests/test_sam_options.py"], "multistep"),
    ),
    Mutation(
        "renormalize-to-unit-norm", S,
        "ratio = clean.norm / jnp.maximum(out_norm, cfg.eps)",
        "ratio = 1.0 / jnp.maximum(out_norm, cfg.eps)",
        _oracle("sam_renorm"),
        _legacy(["tests/test_sam_options.py"], "renormalize"),
    ),
    Mutation(
        "output-not-averaged-over-the-axis", S,
        "    out = cfg.axis.mean(out)",
        "    out = out",
        ["tests/test_distributed.py::test_shard_map_matches_grouped_reference[per_device-True]"],
        ["tests/test_distributed.py"],
    ),
    Mutation(
        "fallback-not-counted", S,
        "bad = jnp.where(ok, 0 * one, one)",
        "bad = 0 * one",
        ["tests/test_nonfinite.py::test_nonfinite_count_accumulates"],
        ["tests/test_nonfinite.py"],
        rule=False,
    ),
    Mutation(
        "skip-hands-on-the-nonfinite-gradient", S,
        "out = jax.tree.map(lambda o: jnp.where(ok, o, jnp.zeros_like(o)), out)",
        "out = out",
        ["tests/test_pipeline.py::test_nonfinite_policies_hand_on_zero_clean_or_nonfinite"],
        ["tests/test_nonfinite.py"],
        rule=False,
    ),
    Mutation(
        "auto-rho-never-backs-off", R,
        "new = jnp.where(fire, jnp.minimum(tracked, s) + down, tracked)",
        "new = tracked",
        ["tests/test_auto_rho.py::test_every_case_follows_a_two_pass_reference_at_the_radius_it_reports[sam-auto_backoff]"],
        ["tests/test_auto_rho.py"],
    ),
    Mutation(
        "auto-rho-first-steps-not-averaged", R,
        "1.0 / (state.measured + 1).astype(jnp.float32),",
        "0.0 * (state.measured + 1).astype(jnp.float32),",
        ["tests/test_auto_rho.py::test_every_case_follows_a_two_pass_reference_at_the_radius_it_reports[sam-auto]"],
        ["tests/test_auto_rho.py"],
    ),
    Mutation(
        "guarded-rho-never-recovers", R,
        "grown = jnp.minimum(0.0, s + jnp.log1p(recovery))",
        "grown = s",
        ["tests/test_auto_rho.py::test_the_guarded_factor_grows_back_after_a_back_off"],
        ["tests/test_auto_rho.py"],
    ),
    Mutation(
        "traced-rho-not-clipped-at-zero", S,
        "base = jnp.maximum(base, 0)",
        "base = base",
        ["tests/test_errors.py::test_negative_scheduled_rho_is_zero_and_recorded_so"],
        ["tests/test_errors.py"],
    ),
    Mutation(
        "offset-not-zeroed-for-a-nonfinite-clean-gradient", S,
        "lambda d: jnp.where(clean.finite, step * d, 0), direction",
        "lambda d: step * d, direction",
        ["tests/test_nonfinite.py::test_nonfinite_clean_gradient_is_handed_on_nonfinite"],
        ["tests/test_nonfinite.py"],
        rule=False,
    ),
)


def check_unique_ids() -> None:
  ids = [m.id for m in MUTATIONS]
  if len(ids) != len(set(ids)):
    raise SystemExit("duplicate mutation ids")


def apply(mutation: Mutation, root: Path) -> Optional[str]:
  """Applies ``mutation`` under ``root``; returns why not, or ``None``."""
  path = root / mutation.file
  if not path.exists():
    return f"{mutation.file} is missing"
  text = path.read_text()
  n = text.count(mutation.old)
  if n != 1:
    return f"old text found {n} times in {mutation.file}"
  path.write_text(text.replace(mutation.old, mutation.new))
  return None


def _copy_tree(dest: Path, tests_rev: Optional[str]) -> None:
  ignore = shutil.ignore_patterns(
      ".git", ".venv", "__pycache__", "*.pyc", ".pytest_cache", "results", "docs"
  )
  for name in ("sam_optax", "tests", "benchmarks", "notebooks"):
    if (ROOT / name).exists():
      shutil.copytree(ROOT / name, dest / name, ignore=ignore)
  for name in ("conftest.py", "pyproject.toml", "README.md"):
    if (ROOT / name).exists():
      shutil.copy2(ROOT / name, dest / name)
  if tests_rev:
    shutil.rmtree(dest / "tests")
    archive = subprocess.run(
        ["git", "archive", tests_rev, "tests"], cwd=ROOT, check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def run_one(mutation: Mutation, suite: str, timeout: float,
            tests_rev: Optional[str]) -> dict:
  with tempfile.TemporaryDirectory(prefix="sam_optax_mutation_") as tmp:
    root = Path(tmp)
    _copy_tree(root, tests_rev)
    why = apply(mutation, root)
    record = {"id": mutation.id, "file": mutation.file, "rule": mutation.rule,
              "tests": mutation.tests if suite == "focused" else mutation.legacy}
    if why is not None:
      return {**record, "status": "not applicable", "reason": why}
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:xdist",
           "-p", "no:cacheprovider", "-o", "addopts=", *record["tests"]]
    start = time.monotonic()
    try:
      proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True,
                            text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return {**record, "status": "killed", "reason": f"timeout after {timeout:.0f} s",
              "seconds": round(time.monotonic() - start, 1)}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    if proc.returncode == 0:
      status = "survived"
    elif proc.returncode == 1:
      status = "killed"
    else:  # collection or usage error: not a verdict on the mutation
      status = "error"
    return {**record, "status": status, "returncode": proc.returncode,
            "summary": tail, "seconds": round(time.monotonic() - start, 1)}


def main(argv: Optional[list[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--list", action="store_true", help="list and exit")
  parser.add_argument("--only", nargs="*", default=None, help="mutation ids")
  parser.add_argument("--suite", choices=("focused", "legacy"), default="focused")
  parser.add_argument("--tests-rev", default=None)
  parser.add_argument("--timeout", type=float, default=600.0)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = parser.parse_args(argv)
  check_unique_ids()
  chosen = [m for m in MUTATIONS if args.only is None or m.id in args.only]
  if args.list:
    for m in chosen:
      print(f"{m.id:45s} {m.file}")
    return {"mutations": [m.id for m in chosen]}
  results = []
  for m in chosen:
    r = run_one(m, args.suite, args.timeout, args.tests_rev)
    results.append(r)
    print(f"{r['status']:15s} {m.id:45s} {r.get('seconds', '')}", flush=True)
  decided = [r for r in results if r["status"] in ("killed", "survived")]
  killed = [r for r in decided if r["status"] == "killed"]
  rules = [r for r in decided if r["rule"]]
  summary = {
      "suite": args.suite, "tests_rev": args.tests_rev,
      "command": "python benchmarks/mutation.py" + (
          f" --suite {args.suite}" if args.suite != "focused" else "") + (
          f" --tests-rev {args.tests_rev}" if args.tests_rev else ""),
      "total": len(results), "decided": len(decided), "killed": len(killed),
      "survived": [r["id"] for r in decided if r["status"] == "survived"],
      "not_applicable": [r["id"] for r in results if r["status"] == "not applicable"],
      "errors": [r["id"] for r in results if r["status"] == "error"],
      "kill_rate": len(killed) / len(decided) if decided else None,
      "rule_kill_rate": (sum(r["status"] == "killed" for r in rules) / len(rules)
                         if rules else None),
      "results": results,
  }
  print(f"killed {len(killed)} of {len(decided)} decided"
        f" ({summary['kill_rate'] if decided else float('nan'):.0%});"
        f" not applicable: {len(summary['not_applicable'])},"
        f" errors: {len(summary['errors'])}")
  if args.only is None:
    name = "mutation.json" if args.suite == "focused" and not args.tests_rev else (
        f"mutation_{args.suite}{'_' + args.tests_rev[:7] if args.tests_rev else ''}.json")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(summary, indent=1) + "\n")
  return summary


if __name__ == "__main__":
  main()
