"""SAM without tuning: ``rho="auto"`` against tuned SGD, fixed and tuned rho.

On the generalization benchmark's 12 settings (MNIST-1D and digits, MLP and
CNN, clean and with 25% / 40% symmetric label noise; 3 paired seeds), every
optimizer runs on the base of ``benchmarks/generalization.py``
(``add_decayed_weights(wd)``, ``sgd(cosine(lr), momentum=0.9)``):

* SGD searches lr x wd on validation (its grid from ``generalization.py``);
* SAM with a fixed rho runs at SGD's selected lr and wd for every rho of
  ``FIXED_RHO`` (a 30x range); the ρ=0.05 default and the rho selected on
  validation ("tuned rho") come from these runs;
* ``sam(rho="auto")`` runs at SGD's selected lr and wd with the default
  target and with every target of ``TARGETS`` (a 30x range of its knob),
  and with the default target over SGD's whole lr x wd grid, where no run
  may collapse.

The stability part trains the 1-D CNN at lr 0.3, where fixed-rho SAM
collapses, with ``rho="auto"`` and with ``guarded(rho)``.

``python benchmarks/auto_rho.py`` writes ``<out>/auto_rho.json`` and, with
``--report docs/benchmarks/auto_rho.md``, regenerates the page's auto-rho section
(``--part none --report docs/benchmarks/auto_rho.md`` only does that). ``--quick`` is a smoke
test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import sam_optax

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from benchmarks import generalization as gen
from benchmarks.common import measure, readme as readme_lib, stats, sweep
from benchmarks.common.train import make_train_step

START = "<!-- auto-rho:start -->"
END = "<!-- auto-rho:end -->"
JSON_NAME = "auto_rho.json"
FIXED_RHO = (0.033, 0.05, 0.1, 0.2, 0.5, 1.0)
TARGETS = (0.037, 0.08, 0.2, 0.5, 1.1)
DEFAULT_TARGET = sam_optax.auto_rho().target
DEFAULT_RHO = 0.05
STABILITY_GUARDED = (0.2, 0.5)


def make_optimizer(kind: str) -> sweep.Optimizer:
  """SGD (``"sgd"``), fixed-rho SAM (``"fixed"``), auto (``"auto"``) or guarded."""

  def make(h, total_steps):
    base = optax.chain(
        optax.add_decayed_weights(h["wd"]),
        optax.sgd(gen.lr_schedule(h, total_steps), momentum=gen.MOMENTUM))
    if kind == "sgd":
      return base
    if kind == "fixed":
      rho = h["rho"]
    elif kind == "auto":
      rho = sam_optax.auto_rho(target=h["target"])
    else:
      rho = sam_optax.guarded(h["rho"])
    return optax.chain(sam_optax.sam(rho), base)

  return sweep.Optimizer(kind, make)


def _per_group(values: dict[str, np.ndarray], n_configs: int) -> dict[str, np.ndarray]:
  """Per-group scalars repeated over ``n_configs`` configurations."""
  return {k: np.repeat(v[:, None], n_configs, axis=1) for k, v in values.items()}


def _runs(res: sweep.SweepResult, rows: np.ndarray, idx: int) -> dict[str, Any]:
  test = res.final("test_acc")[rows, idx]
  return {
      "test_acc": stats.summary(test),
      "val_acc": float(res.final("val_acc")[rows, idx].mean()),
      "collapsed": int(res.collapsed()[rows, idx].sum()),
  }


def run_setting_group(name: str, model_name: str, s: "Settings") -> dict[str, Any]:
  """Every noise level of one data set and model."""
  spec = gen.DATA[name]
  ds = spec.load()
  problem, groups = gen.build_problem(ds, s.noise, s.seeds)
  seeds_g = [seed for _, seed in groups]
  desc, make_model = spec.models[model_name]
  model = make_model()
  tag = f"{spec.label} {model_name}"
  common = {"epochs": s.epochs, "batch_size": spec.batch,
            "eval_every": s.eval_every, "progress": s.progress}
  t0 = time.perf_counter()
  sgd = sweep.train_sweep(model, problem, make_optimizer("sgd"),
                          gen.grid(lr=spec.lr, wd=spec.wd), seeds_g,
                          desc=f"{tag} SGD", **common)
  sel = {p: gen.select(sgd, gen.rows_of(groups, p)) for p in s.noise}
  hp = {k: np.asarray([sgd.hparams[k][g, sel[p]] for g, (p, _) in enumerate(groups)])
        for k in ("lr", "wd")}
  fixed = sweep.train_sweep(
      model, problem, make_optimizer("fixed"),
      {**_per_group(hp, len(s.fixed_rho)), "rho": np.asarray(s.fixed_rho)},
      seeds_g, desc=f"{tag} SAM, fixed ρ", **common)
  # Auto: the knob's range at SGD's lr and wd, then the default target over
  # SGD's whole lr x wd grid.
  g = gen.grid(lr=spec.lr, wd=spec.wd)
  n_t = len(s.targets)
  auto_hp = {
      "lr": np.concatenate([np.repeat(hp["lr"][:, None], n_t, 1),
                            np.broadcast_to(g["lr"], (len(groups), g["lr"].size))], 1),
      "wd": np.concatenate([np.repeat(hp["wd"][:, None], n_t, 1),
                            np.broadcast_to(g["wd"], (len(groups), g["wd"].size))], 1),
      "target": np.concatenate([np.asarray(s.targets),
                                np.full(g["lr"].size, DEFAULT_TARGET)]),
  }
  auto = sweep.train_sweep(model, problem, make_optimizer("auto"), auto_hp,
                           seeds_g, desc=f"{tag} SAM, ρ=auto", **common)
  i_default = list(s.targets).index(DEFAULT_TARGET)
  out: dict[str, Any] = {"label": tag, "description": desc, "noise": {},
                         "wall_s": None}
  for p in s.noise:
    rows = gen.rows_of(groups, p)
    sgd_test = sgd.final("test_acc")[rows, sel[p]]
    i_tuned = gen.select(fixed, rows)
    fixed_runs = [_runs(fixed, rows, c) for c in range(len(s.fixed_rho))]
    auto_runs = [_runs(auto, rows, c) for c in range(n_t)]
    grid_runs = [_runs(auto, rows, n_t + c) for c in range(g["lr"].size)]
    paired = lambda res, c: stats.paired(  # noqa: E731
        res.final("test_acc")[rows, c], sgd_test)
    out["noise"][gen.noise_key(p)] = {
        "sgd": {"hparams": gen.hparams_at(sgd, rows[0], sel[p]),
                "test_acc": stats.summary(sgd_test),
                "collapsed": int(sgd.collapsed()[rows, sel[p]].sum())},
        "fixed_rho": list(s.fixed_rho),
        "fixed": fixed_runs,
        "fixed_vs_sgd": [paired(fixed, c) for c in range(len(s.fixed_rho))],
        "tuned_index": i_tuned,
        "default_index": list(s.fixed_rho).index(DEFAULT_RHO),
        "targets": list(s.targets),
        "auto": auto_runs,
        "auto_vs_sgd": [paired(auto, c) for c in range(n_t)],
        "default_target_index": i_default,
        "auto_grid": [{"lr": float(g["lr"][c]), "wd": float(g["wd"][c]), **r}
                      for c, r in enumerate(grid_runs)],
        "fingerprints": [sgd.fingerprints[r] for r in rows],
    }
  out["flops"] = step_flops(model, problem, spec.batch)
  out["wall_s"] = time.perf_counter() - t0
  return out


def step_flops(model, problem, batch) -> dict[str, Any]:
  """XLA's FLOPs of one training step: SGD, fixed-rho SAM, auto, guarded."""
  x, y = problem.x_train[:batch], problem.y_train[0, :batch]
  h = {"lr": 0.1, "wd": 5e-4, "rho": 0.05, "target": DEFAULT_TARGET}
  params = model.init(jax.random.PRNGKey(0))
  out = {}
  for kind in ("sgd", "fixed", "auto", "guarded"):
    tx = make_optimizer(kind).make(h, 1000)
    _, flops = measure.compile_with_flops(
        make_train_step(model.apply, tx), params, tx.init(params),
        np.asarray(x), np.asarray(y))
    out[kind] = flops
  return out


def run_stability(s: "Settings") -> dict[str, Any]:
  """The 1-D CNN at lr 0.3: auto and guarded rho, where fixed rho collapses."""
  st = gen.STABILITY
  ds = gen.DATA["mnist1d"].load()
  problem, groups = gen.build_problem(ds, st["noise"], s.stability_seeds)
  seeds_g = [seed for _, seed in groups]
  model_name = "MLP" if s.quick else "CNN"
  desc, make_model = gen.DATA["mnist1d"].models[model_name]
  model = make_model()
  common = {"epochs": s.epochs, "batch_size": gen.DATA["mnist1d"].batch,
            "eval_every": s.eval_every, "progress": s.progress}
  t0 = time.perf_counter()
  n_r = len(STABILITY_GUARDED)
  runs = {
      "fixed": {"lr": st["lr"], "wd": st["wd"], "rho": STABILITY_GUARDED},
      "guarded": {"lr": st["lr"], "wd": st["wd"], "rho": STABILITY_GUARDED},
      "auto": {"lr": st["lr"], "wd": st["wd"], "target": (DEFAULT_TARGET,)},
  }
  rows_out = []
  for kind, h in runs.items():
    n = n_r if "rho" in h else 1
    hp = {k: np.broadcast_to(np.asarray(v, np.float32), (n,)) for k, v in h.items()}
    res = sweep.train_sweep(model, problem, make_optimizer(kind), hp, seeds_g,
                            desc=f"stability {kind}", **common)
    for c in range(n):
      row = {"kind": kind, "hparams": gen.hparams_at(res, 0, c), "noise": {}}
      for p in st["noise"]:
        rows = gen.rows_of(groups, p)
        row["noise"][gen.noise_key(p)] = _runs(res, rows, c)
      rows_out.append(row)
  return {"model": desc, "lr": st["lr"], "wd": st["wd"],
          "seeds": s.stability_seeds, "rows": rows_out,
          "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------
# Settings and report.


class Settings:
  def __init__(self, args):
    self.quick = args.quick
    self.progress = not args.no_progress
    self.out = args.out
    self.readme = args.readme
    self.parts = (["settings", "stability"] if args.part == "all" else
                  [] if args.part == "none" else [args.part])
    if args.quick:
      self.epochs, self.eval_every = 2, 1
      self.seeds, self.stability_seeds = [0, 1], [0]
      self.noise = (0.0, 0.25)
      self.models = {"mnist1d": ["MLP"], "digits": ["MLP"]}
      self.fixed_rho, self.targets = (0.05, 0.5), (DEFAULT_TARGET,)
    else:
      self.epochs = args.epochs
      self.eval_every = 10 if args.epochs % 10 == 0 else args.epochs
      self.seeds = list(range(args.seeds))
      self.stability_seeds = list(range(args.stability_seeds))
      self.noise = gen.NOISE
      self.models = {k: list(d.models) for k, d in gen.DATA.items()}
      self.fixed_rho, self.targets = FIXED_RHO, TARGETS

  def describe(self) -> dict[str, Any]:
    return {"epochs": self.epochs, "seeds": self.seeds,
            "stability_seeds": self.stability_seeds, "noise": list(self.noise),
            "fixed_rho": list(self.fixed_rho), "targets": list(self.targets),
            "default_target": DEFAULT_TARGET, "quick": self.quick,
            "grids": {k: {"lr": list(d.lr), "wd": list(d.wd), "batch": d.batch}
                      for k, d in gen.DATA.items()},
            "collapse": f"at least {sweep.COLLAPSE_TOP_FRACTION:.0%} of test"
                        " predictions in one class, or non-finite parameters"}


def floors(result: dict[str, Any]) -> dict[str, Any]:
  """The issue's floors, computed from the JSON."""
  rows = [(k, nk, e) for k, m in result["parts"].get("settings", {}).items()
          for nk, e in m["noise"].items()]
  if not rows:
    return {}
  auto_d = [e["auto_vs_sgd"][e["default_target_index"]]["mean"] for _, _, e in rows]
  tuned_d = [e["fixed_vs_sgd"][e["tuned_index"]]["mean"] for _, _, e in rows]
  default_d = [e["fixed_vs_sgd"][e["default_index"]]["mean"] for _, _, e in rows]
  spread = lambda runs: (max(r["test_acc"]["mean"] for r in runs)  # noqa: E731
                         - min(r["test_acc"]["mean"] for r in runs))
  auto_collapsed = sum(
      sum(r["collapsed"] for r in e["auto"]) + sum(r["collapsed"] for r in e["auto_grid"])
      for _, _, e in rows)
  stab = result["parts"].get("stability", {"rows": []})["rows"]
  stab_auto = sum(v["collapsed"] for r in stab if r["kind"] != "fixed"
                  for v in r["noise"].values())
  fixed_spread = [spread(e["fixed"]) for _, _, e in rows]
  auto_spread = [spread(e["auto"]) for _, _, e in rows]
  return {
      "settings": len(rows),
      "auto_ahead_of_sgd": int(sum(d > 0 for d in auto_d)),
      "mean_gain_auto": float(np.mean(auto_d)),
      "mean_gain_tuned_rho": float(np.mean(tuned_d)),
      "mean_gain_default_rho": float(np.mean(default_d)),
      "auto_minus_tuned": float(np.mean(auto_d) - np.mean(tuned_d)),
      "auto_collapsed_runs": int(auto_collapsed),
      "auto_and_guarded_collapsed_runs_stability": int(stab_auto),
      "mean_spread_fixed": float(np.mean(fixed_spread)),
      "mean_spread_auto": float(np.mean(auto_spread)),
      "worst_spread_ratio": float(max(a / max(f, 1e-9) for a, f in
                                      zip(auto_spread, fixed_spread))),
  }


def _pp(x: float) -> str:
  return f"{100 * x + 0.0:+.1f}"


def report(result: dict[str, Any]) -> str:
  """The report region."""
  sett = result["settings"]
  parts = result["parts"]
  lines = [
      f"Generated by `python benchmarks/auto_rho.py --report docs/benchmarks/auto_rho.md` from"
      f" `benchmarks/results/{JSON_NAME}` ({sett['epochs']} epochs,"
      f" {len(sett['seeds'])} paired seeds, base and grids of the"
      " generalization benchmark; SGD tunes lr × wd on validation, SAM runs"
      " at SGD's selected lr and wd). Test accuracy %; in brackets the"
      " paired difference from tuned SGD in points and the seeds won;"
      " tuned ρ is the fixed ρ selected on validation"
      f" from {sett['fixed_rho']}.",
      "",
  ]
  head = ["setting", "SGD (tuned)", f"SAM ρ={DEFAULT_RHO}", "SAM, tuned ρ",
          "**SAM, ρ=auto**", "auto: mean ρ... collapsed"]
  rows = []
  for key, m in parts.get("settings", {}).items():
    for nk, e in m["noise"].items():
      fx = e["fixed"]
      d = lambda runs, vs, i: (  # noqa: E731
          f"{gen._pct(runs[i]['test_acc'])} ({_pp(vs[i]['mean'])},"
          f" {vs[i]['wins']}/{vs[i]['n']})")
      i_t = e["tuned_index"]
      coll = (sum(r["collapsed"] for r in e["auto"])
              + sum(r["collapsed"] for r in e["auto_grid"]))
      rows.append([
          f"{m['label']}, {'clean' if nk == '0' else nk + '%'}",
          gen._pct(e["sgd"]["test_acc"]),
          d(fx, e["fixed_vs_sgd"], e["default_index"]),
          d(fx, e["fixed_vs_sgd"], i_t) + f", ρ={e['fixed_rho'][i_t]:g}",
          d(e["auto"], e["auto_vs_sgd"], e["default_target_index"]),
          f"{coll}",
      ])
  head[-1] = "auto runs collapsed (knob range and lr × wd grid)"
  lines.append(stats.markdown_table(head, rows))
  f = floors(result)
  if f:
    lines += [
        "",
        f"Floors: ρ=auto ahead of tuned SGD in {f['auto_ahead_of_sgd']}/"
        f"{f['settings']} settings (floor 9/12); mean paired gain"
        f" {_pp(f['mean_gain_auto'])} points against {_pp(f['mean_gain_tuned_rho'])}"
        f" for tuned ρ and {_pp(f['mean_gain_default_rho'])} for ρ={DEFAULT_RHO}"
        f" (auto − tuned {_pp(f['auto_minus_tuned'])}, floor −0.5);"
        f" {f['auto_collapsed_runs']} collapsed auto runs in the settings and"
        f" {f['auto_and_guarded_collapsed_runs_stability']} collapsed auto or"
        " guarded runs in the stability grid (floor 0). Sensitivity: spread"
        f" of mean test accuracy over the 30× range of fixed ρ"
        f" {100 * f['mean_spread_fixed']:.1f} points on average, over the 30×"
        f" range of auto's target {100 * f['mean_spread_auto']:.1f} points"
        f" (worst ratio auto/fixed {f['worst_spread_ratio']:.2f}, floor 1/3).",
    ]
  sens = sensitivity_table(result)
  if sens:
    lines += ["", "**Sensitivity**: mean test accuracy % against fixed ρ and"
              " against auto's target (each a 30× range).", "", sens, "",
              f"![auto-rho sensitivity](benchmarks/results/{PLOT_NAME})"]
  stab = stability_table(result)
  if stab:
    lines += ["", stab]
  return "\n".join(lines)


def sensitivity_table(result: dict[str, Any]) -> str:
  sett = parts = result["parts"].get("settings")
  if not parts:
    return ""
  first = next(iter(next(iter(parts.values()))["noise"].values()))
  head = ["setting", *(f"ρ={r:g}" for r in first["fixed_rho"]),
          *(f"target {t:g}" for t in first["targets"])]
  rows = []
  for m in sett.values():
    for nk, e in m["noise"].items():
      cells = [f"{m['label']}, {'clean' if nk == '0' else nk + '%'}"]
      for r in (*e["fixed"], *e["auto"]):
        v = f"{100 * r['test_acc']['mean']:.1f}"
        cells.append(v + (f" ({r['collapsed']} coll.)" if r["collapsed"] else ""))
      rows.append(cells)
  return stats.markdown_table(head, rows)


def stability_table(result: dict[str, Any]) -> str:
  st = result["parts"].get("stability")
  if not st:
    return ""
  nks = list(st["rows"][0]["noise"])
  head = ["optimizer", *(f"{'clean' if n == '0' else n + '%'}: test %,"
                              " collapsed" for n in nks)]
  rows = []
  for r in st["rows"]:
    h = r["hparams"]
    label = {"fixed": f"SAM, ρ={h.get('rho', 0):g}",
             "guarded": f"SAM, guarded(ρ={h.get('rho', 0):g})",
             "auto": "SAM, ρ=auto"}[r["kind"]]
    rows.append([label, *(f"{gen._pct(r['noise'][n]['test_acc'])},"
                          f" {r['noise'][n]['collapsed']}/{len(st['seeds'])}"
                          for n in nks)])
  return (f"**Stability** ({st['model']}, lr {st['lr']}, {len(st['seeds'])}"
          " seeds, where fixed-ρ SAM collapses):\n\n"
          + stats.markdown_table(head, rows))


PLOT_NAME = "auto_rho_sensitivity.png"


def plot_sensitivity(result: dict[str, Any], path: Path) -> None:
  """Test accuracy against fixed rho and against auto's target, per setting."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  parts = result["parts"].get("settings")
  if not parts:
    return
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for i, m in enumerate(parts.values()):
    for j, (nk, e) in enumerate(m["noise"].items()):
      label = f"{m['label']}, {'clean' if nk == '0' else nk + '%'}"
      color = plt.cm.tab20((4 * i + j) % 20)
      sgd = e["sgd"]["test_acc"]["mean"]
      for ax, xs, runs in ((axes[0], e["fixed_rho"], e["fixed"]),
                           (axes[1], e["targets"], e["auto"])):
        ys = [100 * (r["test_acc"]["mean"] - sgd) for r in runs]
        ax.plot(xs, ys, "o-", color=color, ms=3, lw=1,
                label=label if ax is axes[0] else None)
  for ax, title, default in ((axes[0], "SAM, fixed ρ", DEFAULT_RHO),
                             (axes[1], "SAM, ρ=auto: its target", DEFAULT_TARGET)):
    ax.set_xscale("log")
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(default, color="gray", ls=":", lw=1)
    ax.set_title(title)
    ax.set_ylim(-30, 8)
  axes[0].set_xlabel("ρ (30× range)")
  axes[1].set_xlabel("target gradient change ‖g_p − g‖/‖g‖ (30× range)")
  axes[0].set_ylabel("test accuracy − tuned SGD (points; clipped at −30)")
  fig.legend(loc="center right", fontsize=7)
  fig.tight_layout(rect=(0, 0, 0.83, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--part", choices=("all", "settings", "stability", "none"),
                      default="all")
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--stability-seeds", type=int, default=5)
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
  parser.add_argument("--report", "--readme", dest="readme", type=Path, default=None)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--no-progress", action="store_true")
  s = Settings(parser.parse_args(argv))
  path = s.out / JSON_NAME
  result: dict[str, Any] = {"parts": {}}
  if path.exists():
    result = json.loads(path.read_text())
  if s.parts:
    result["settings"] = s.describe()
    result["environment"] = gen.environment()
    result["command"] = "python benchmarks/auto_rho.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
  if "settings" in s.parts:
    out = {}
    for name, model_names in s.models.items():
      for model_name in model_names:
        out[f"{name}_{model_name}"] = run_setting_group(name, model_name, s)
    result["parts"]["settings"] = out
  if "stability" in s.parts:
    result["parts"]["stability"] = run_stability(s)
  result["floors"] = floors(result)
  if s.parts:
    s.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
  if s.parts or not (s.out / PLOT_NAME).exists():
    plot_sensitivity(result, s.out / PLOT_NAME)
  if s.readme is not None:
    readme_lib.replace_region(s.readme, START, END, report(result))
  print(json.dumps(result["floors"], indent=1))
  return result


if __name__ == "__main__":
  main()
