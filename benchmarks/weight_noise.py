"""Robustness to weight noise at inference: SGD, SAM, ASAM and SAMSON, paired.

SAMSON's claim is that a network trained with it keeps more of its accuracy
when its weights are noisy at inference (analog in-memory accelerators).
This benchmark trains an MLP on MNIST-1D and on scikit-learn's digits (clean
labels, data generated or bundled locally) with SGD with momentum, and with
SAM, ASAM and SAMSON in front of the same base, then measures every run's
test accuracy under weight noise.

Protocol:

* SGD's learning rate and weight decay are chosen on validation accuracy
  (mean over the seeds) from a 2 x 2 grid; every sharpness-aware variant
  uses SGD's choice and selects only its radius, on validation, from its own
  grid (the authors' ratios: ASAM's ρ about 10x SAM's, SAMSON's about 4x).
* The same seed gives the same initialization and batch order for every
  optimizer; the noise draws are the same for every model (one key).
* Noise: ``layer_max`` (additive, σ times the layer's largest |w|) and
  ``multiplicative`` (w(1 + σz)), on every weight and bias, ``--draws``
  draws per level, from :func:`sam_optax.sharpness.weight_noise_robustness`.
* Reported: test accuracy (mean ± std over seeds) per noise level, and the
  paired per-seed differences SAMSON − SAM, SAMSON − ASAM and SAM − SGD at
  every level.

``python benchmarks/weight_noise.py`` writes ``<out>/weight_noise.json`` and
``weight_noise.png``; ``--report docs/benchmarks/weight_noise.md`` regenerates the page's region;
``--report-only`` rewrites them from the JSON; ``--quick`` is a smoke test.
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
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from sam_optax import sharpness

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from benchmarks import generalization as gen  # noqa: E402
from benchmarks.common import readme as readme_lib  # noqa: E402
from benchmarks.common import models, stats, sweep  # noqa: E402
from benchmarks.common import data as data_lib  # noqa: E402

START = "<!-- weight-noise:start -->"
END = "<!-- weight-noise:end -->"
JSON_NAME = "weight_noise.json"
PLOT_NAME = "weight_noise.png"
MOMENTUM = 0.9
RHO_SAM = (0.05, 0.1, 0.2, 0.4)
FRONTS = {
    "sgd": ("SGD", None, 0.0),
    "sam": ("SAM", lambda r: sam_optax.sam(r), 1.0),
    "asam": ("ASAM", lambda r: sam_optax.asam(r), 10.0),
    "samson": ("SAMSON", lambda r: sam_optax.samson(r), 4.0),
}
LEVELS = {
    "layer_max": (0.0, 0.02, 0.05, 0.1, 0.15, 0.2),
    "multiplicative": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
}
DATA = {
    "mnist1d": ("MNIST-1D, MLP 40-100-100-10", lambda: data_lib.load_mnist1d(500),
                lambda: models.mlp((40, 100, 100, 10)), 128, (0.1, 0.3), (5e-4, 5e-3)),
    "digits": ("digits, MLP 64-256-256-10", lambda: data_lib.load_digits(250),
               lambda: models.mlp((64, 256, 256, 10)), 64, (0.01, 0.05), (5e-4, 2e-2)),
}


def make_optimizer(key: str) -> sweep.Optimizer:
  label, front, _ = FRONTS[key]

  def make(h, total_steps):
    base = optax.chain(
        optax.add_decayed_weights(h["wd"]),
        optax.sgd(optax.cosine_decay_schedule(h["lr"], total_steps),
                  momentum=MOMENTUM))
    return base if front is None else optax.chain(front(h["rho"]), base)

  return sweep.Optimizer(label, make)


def problem_of(ds: data_lib.Dataset, seeds: Sequence[int]) -> sweep.Problem:
  groups = len(seeds)
  return sweep.Problem(
      x_train=ds.x_train, y_train=np.stack([ds.y_train_clean] * groups),
      y_train_clean=ds.y_train_clean, x_val=ds.x_val,
      y_val=np.stack([ds.y_val_clean] * groups), x_test=ds.x_test,
      y_test=ds.y_test, num_classes=ds.num_classes)


def _best(result: sweep.SweepResult) -> int:
  return int(np.argmax(result.final("val_acc").mean(axis=0)))


def accuracy_fn(model: models.Model, ds: data_lib.Dataset):
  """``params -> test accuracy``; one function per setting, so compiled once."""
  x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
  return lambda p: models.accuracy(model.apply(p, x), y)


def noisy_accuracy(accuracy, params: Any, noise: str, draws: int,
                   key: jax.Array) -> dict[str, Any]:
  """Test accuracy of one trained network under weight noise, per level."""
  res = sharpness.weight_noise_robustness(
      accuracy, params, LEVELS[noise], key=key, noise=noise, num_draws=draws)
  return {"mean": np.asarray(res.mean).tolist(),
          "std": np.asarray(res.std).tolist(), "clean": float(res.clean)}


def run_setting(name: str, args: argparse.Namespace, optimizers: Sequence[str],
                seeds: Sequence[int]) -> dict[str, Any]:
  label, load, make_model, batch, lrs, wds = DATA[name]
  ds, model = load(), make_model()
  problem = problem_of(ds, seeds)
  run = dict(epochs=args.epochs, batch_size=batch, eval_every=args.epochs,
             progress=args.progress)
  grid = gen.grid(lr=lrs, wd=wds)
  sgd = sweep.train_sweep(model, problem, make_optimizer("sgd"), grid, seeds,
                          return_params=True, desc=f"{name} SGD", **run)
  i = _best(sgd)
  lr, wd = float(grid["lr"][i]), float(grid["wd"][i])
  out: dict[str, Any] = {"label": label, "lr": lr, "wd": wd,
                         "n_test": int(len(ds.y_test)), "optimizers": {}}
  noise_key = jax.random.key(12345)
  accuracy = accuracy_fn(model, ds)
  for key in optimizers:
    if key == "sgd":
      result, index, rho = sgd, i, None
    else:
      rhos = [r * FRONTS[key][2] for r in RHO_SAM]
      hp = {"lr": [lr] * len(rhos), "wd": [wd] * len(rhos), "rho": rhos}
      result = sweep.train_sweep(model, problem, make_optimizer(key), hp, seeds,
                                 return_params=True, desc=f"{name} {key}", **run)
      index = _best(result)
      rho = rhos[index]
    entry = {"rho": rho, "rho_grid": None if key == "sgd" else rhos,
             "val_acc": result.final("val_acc")[:, index].tolist(),
             "test_acc": stats.summary(result.final("test_acc")[:, index]),
             "run_s": result.run_s, "noise": {}}
    for noise in LEVELS:
      per_seed = [
          noisy_accuracy(accuracy,
                         jax.tree.map(lambda x: x[g, index], result.params),
                         noise, args.draws, noise_key)
          for g in range(len(seeds))]
      acc = np.asarray([r["mean"] for r in per_seed])  # (seeds, levels)
      entry["noise"][noise] = {
          "levels": list(LEVELS[noise]), "per_seed": acc.tolist(),
          "mean": acc.mean(axis=0).tolist(),
          "std": (acc.std(axis=0, ddof=1) if len(seeds) > 1
                  else np.zeros(acc.shape[1])).tolist(),
      }
    out["optimizers"][key] = entry
  out["paired"] = paired_differences(out["optimizers"])
  return out


PAIRS = (("samson", "sam"), ("samson", "asam"), ("sam", "sgd"), ("samson", "sgd"))


def paired_differences(opts: dict[str, Any]) -> dict[str, Any]:
  """Per level and noise model, the per-seed differences of the pairs."""
  out = {}
  for a, b in PAIRS:
    if a not in opts or b not in opts:
      continue
    out[f"{a}-{b}"] = {
        noise: [stats.paired(np.asarray(opts[a]["noise"][noise]["per_seed"])[:, j],
                             np.asarray(opts[b]["noise"][noise]["per_seed"])[:, j])
                for j in range(len(LEVELS[noise]))]
        for noise in LEVELS}
  return out


def report(result: dict[str, Any]) -> str:
  """The report region: one table per setting and noise model, and the pairs."""
  s = result["settings"]
  lines = [
      f"Measured by `benchmarks/weight_noise.py` ({s['epochs']} epochs,"
      f" {len(s['seeds'])} paired seeds, {s['draws']} noise draws per level and"
      f" run; {result['environment']['date']}; {result['wall_s']:.0f} s)."
      " Test accuracy, mean ± std over seeds; ρ selected on validation at"
      " SGD's selected lr and weight decay. Reproduce with `python"
      " benchmarks/weight_noise.py --report docs/benchmarks/weight_noise.md`.", ""]
  for name, setting in result["settings_results"].items():
    opts = setting["optimizers"]
    for noise, levels in LEVELS.items():
      header = ["optimizer", "ρ"] + [f"σ={v:g}" for v in levels]
      rows = []
      for key, e in opts.items():
        n = e["noise"][noise]
        rho = "–" if e["rho"] is None else f"{e['rho']:g}"
        rows.append([FRONTS[key][0], rho] + [
            stats.pct(m, d) for m, d in zip(n["mean"], n["std"])])
      lines += [f"**{setting['label']}**, `{noise}` noise (lr {setting['lr']:g},"
                f" wd {setting['wd']:g}):", "", stats.markdown_table(header, rows), ""]
    for pair, by_noise in setting["paired"].items():
      cells = []
      for noise, diffs in by_noise.items():
        last = diffs[-1]
        cells.append(f"{noise} σ={LEVELS[noise][-1]:g}: {100 * last['mean']:+.1f} ±"
                     f" {100 * last['std']:.1f} ({last['wins']}/{last['n']} seeds)")
      lines.append(f"* {pair.replace('-', ' − ').upper()}: " + "; ".join(cells))
    lines.append("")
  lines.append(f"![accuracy under weight noise](benchmarks/results/{PLOT_NAME})")
  return "\n".join(lines).rstrip() + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  settings = result["settings_results"]
  fig, axes = plt.subplots(len(settings), len(LEVELS), squeeze=False,
                           figsize=(5 * len(LEVELS), 3.6 * len(settings)),
                           layout="constrained")
  for row, setting in zip(axes, settings.values()):
    for ax, noise in zip(row, LEVELS):
      for key, e in setting["optimizers"].items():
        n = e["noise"][noise]
        m, d = np.asarray(n["mean"]), np.asarray(n["std"])
        (line,) = ax.plot(n["levels"], 100 * m, marker="o", label=FRONTS[key][0])
        ax.fill_between(n["levels"], 100 * (m - d), 100 * (m + d),
                        color=line.get_color(), alpha=0.15, linewidth=0)
      ax.set_title(f"{setting['label']}, {noise}", fontsize=9)
      ax.set_xlabel("σ")
      ax.set_ylabel("test accuracy (%)")
      ax.legend(fontsize=8)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--draws", type=int, default=32)
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
  parser.add_argument("--report", "--readme", dest="readme", type=Path, default=None)
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: 2 epochs, 2 seeds, 4 draws, MNIST-1D only")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--report-only", action="store_true",
                      help="rewrite the report region and the plot from the JSON")
  args = parser.parse_args(argv)
  args.progress = not args.no_progress
  if args.report_only:
    result = json.loads((args.out / JSON_NAME).read_text())
    plot(result, args.out / PLOT_NAME)
    if args.readme is not None:
      readme_lib.replace_region(args.readme, START, END, report(result))
    return result
  settings = list(DATA)
  if args.quick:
    args.epochs, args.seeds, args.draws = 2, 2, 4
    settings = ["mnist1d"]
  seeds = list(range(args.seeds))
  t0 = time.perf_counter()
  result: dict[str, Any] = {
      "settings": {"epochs": args.epochs, "seeds": seeds, "draws": args.draws,
                   "quick": bool(args.quick), "rho_sam_grid": list(RHO_SAM),
                   "rho_scale": {k: v[2] for k, v in FRONTS.items()},
                   "levels": {k: list(v) for k, v in LEVELS.items()}},
      "environment": {**gen.environment(), "date": time.strftime("%Y-%m-%d")},
      "command": "python benchmarks/weight_noise.py " + " ".join(
          argv if argv is not None else sys.argv[1:]),
      "settings_results": {
          name: run_setting(name, args, list(FRONTS), seeds) for name in settings},
  }
  result["wall_s"] = time.perf_counter() - t0
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / JSON_NAME).write_text(json.dumps(result, indent=1))
  plot(result, args.out / PLOT_NAME)
  if args.readme is not None:
    readme_lib.replace_region(args.readme, START, END, report(result))
  print(report(result))
  return result


if __name__ == "__main__":
  main()
