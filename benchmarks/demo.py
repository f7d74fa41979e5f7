"""SGD with momentum vs SAM on MNIST-1D: a tuned, paired-seed comparison.

Both optimizers train a 40-100-100-10 ReLU MLP with the same initializations
and batch orders per seed, the same cosine learning-rate schedule and the same
learning-rate x weight-decay grid; SAM also searches its radius rho. The
configuration with the best mean validation accuracy (final epoch, 500 held-out
training examples) is selected, and its test accuracy over the same seeds is
reported, together with the per-step cost of SAM (wall clock and XLA FLOPs).
As an equal-compute baseline, SGD is re-run at its selected setting for twice
the epochs.

Run ``python benchmarks/demo.py`` (about two minutes on two CPU cores) or
``python benchmarks/demo.py --quick`` for a smoke test. Results go to
``<out>/demo.json`` and ``<out>/demo.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax

# `python benchmarks/demo.py` puts benchmarks/ on the path, not the repository.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from benchmarks.common import data as data_lib  # noqa: E402
from benchmarks.common import measure, models  # noqa: E402
from benchmarks.common.stats import mean_std, paired  # noqa: E402
from benchmarks.common.train import (  # noqa: E402
    GridResult,
    HParams,
    make_optimizer,
    make_train_step,
    train_grid,
)

LAYER_SIZES = (40, 100, 100, 10)
BATCH_SIZE = 128
MOMENTUM = 0.9
N_VAL = 500

GRID = {"lr": (0.1, 0.3), "wd": (5e-4, 2e-3), "rho": (0.05, 0.2, 0.5)}
QUICK_GRID = {"lr": (0.1,), "wd": (5e-4,), "rho": (0.05,)}


@dataclasses.dataclass
class Settings:
  """What one invocation runs."""

  epochs: int
  seeds: list[int]
  grid: dict[str, tuple[float, ...]]
  equal_compute: bool
  timing_reps: int
  out: Path
  quick: bool


def parse_args(argv: Optional[Sequence[str]]) -> Settings:
  """Parses the command line into :class:`Settings`."""
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--epochs", type=int, default=100,
                      help="training epochs of every run")
  parser.add_argument("--seeds", type=int, default=5,
                      help="number of paired seeds (0, 1, ...)")
  parser.add_argument("--out", type=Path, default=Path("results"),
                      help="directory for demo.json and demo.png")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: 2 epochs, 2 seeds, one configuration each")
  parser.add_argument("--no-equal-compute", action="store_true",
                      help="skip the SGD run with twice the epochs")
  args = parser.parse_args(argv)
  epochs, n_seeds = (2, 2) if args.quick else (args.epochs, args.seeds)
  if epochs < 1 or n_seeds < 1:
    parser.error("--epochs and --seeds must be positive.")
  return Settings(
      epochs=epochs,
      seeds=list(range(n_seeds)),
      grid=QUICK_GRID if args.quick else GRID,
      equal_compute=not args.no_equal_compute,
      timing_reps=30 if args.quick else 300,
      out=args.out,
      quick=args.quick,
  )


def grid_configs(grid: dict[str, tuple[float, ...]], with_rho: bool) -> list[HParams]:
  """All lr x wd (x rho) combinations, in grid order."""
  rhos = grid["rho"] if with_rho else (0.0,)
  return [
      HParams(lr, wd, rho)
      for lr in grid["lr"]
      for wd in grid["wd"]
      for rho in rhos
  ]


# ---------------------------------------------------------------------------
# Statistics and formatting.


def pct(x: np.ndarray) -> str:
  """``mean +/- std`` of accuracies, in percent."""
  m, s = mean_std(np.asarray(x) * 100)
  return f"{m:.1f} +/- {s:.1f}"


def pct_diff(x: np.ndarray) -> str:
  """Signed ``mean +/- std`` of accuracy differences, in percentage points."""
  m, s = mean_std(np.asarray(x) * 100)
  return f"{m:+.1f} +/- {s:.1f}"


def describe(hp: dict[str, float], with_rho: bool) -> str:
  text = f"lr={hp['lr']:g} wd={hp['wd']:g}"
  return text + (f" rho={hp['rho']:g}" if with_rho else "")


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], n_left: int = 1
) -> str:
  """Plain-text table: the first ``n_left`` columns left-aligned, the rest right."""
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

  def line(cells: Sequence[str]) -> str:
    parts = [c.ljust(w) if i < n_left else c.rjust(w)
             for i, (c, w) in enumerate(zip(cells, widths))]
    return "  ".join(parts).rstrip()

  rule = "-" * len(line(header))
  return "\n".join([line(header), rule, *(line(r) for r in rows)])


# ---------------------------------------------------------------------------
# Experiment pieces.


@dataclasses.dataclass
class Selected:
  """The selected configuration of one optimizer and its per-seed results."""

  result: GridResult
  index: int

  @property
  def hparams(self) -> dict[str, float]:
    return self.result.hparams[self.index]

  def final(self, metric: str) -> np.ndarray:
    """Final-epoch ``metric`` of the selected configuration, one value per seed."""
    return self.result.final(metric)[:, self.index]

  def curve(self, metric: str) -> np.ndarray:
    """Per-epoch ``metric`` of the selected configuration, shape (seeds, epochs)."""
    return self.result.history[metric][:, self.index, :]


def time_single_steps(
    model: models.Model,
    ds: data_lib.Dataset,
    sgd_hp: dict[str, float],
    sam_hp: dict[str, float],
    total_steps: int,
    reps: int,
) -> dict[str, Any]:
  """Median wall time and XLA FLOPs of one unbatched, jitted step of each optimizer.

  Both steps use their selected hyperparameters as Python numbers, the same
  initial parameters and the same batch; repetitions are interleaved.
  """
  params = model.init(jax.random.PRNGKey(0))
  xb = jnp.asarray(ds.x_train[:BATCH_SIZE])
  yb = jnp.asarray(ds.y_train[:BATCH_SIZE])
  steps, flops = {}, {}
  for name, hp, use_sam in (("SGD", sgd_hp, False), ("SAM", sam_hp, True)):
    tx = make_optimizer(HParams(**hp), total_steps, use_sam, MOMENTUM)
    args = (params, tx.init(params), xb, yb)
    compiled, flops[name] = measure.compile_with_flops(
        make_train_step(model.apply, tx), *args)
    steps[name] = (lambda c=compiled, a=args: c(*a))
  seconds = measure.time_interleaved(steps, reps=reps)
  out: dict[str, Any] = {"reps": reps, "batch_size": BATCH_SIZE}
  for name in steps:
    s = seconds[name] * 1e3
    out[name] = {
        "median_ms": float(np.median(s)),
        "p25_ms": float(np.percentile(s, 25)),
        "p75_ms": float(np.percentile(s, 75)),
        "flops": flops[name],
    }
  out["time_ratio"] = out["SAM"]["median_ms"] / out["SGD"]["median_ms"]
  out["flops_ratio"] = (
      flops["SAM"] / flops["SGD"] if flops["SAM"] and flops["SGD"] else None)
  return out


def vmapped_ms_per_run_step(result: GridResult) -> float:
  """Median epoch time of the vmapped run divided by (runs x steps), in ms.

  The first epoch is left out when there are several (it includes warm-up).
  """
  epoch_s = result.epoch_s[1:] if len(result.epoch_s) > 1 else result.epoch_s
  return float(np.median(epoch_s)) * 1e3 / (result.num_runs * result.steps_per_epoch)


# ---------------------------------------------------------------------------
# Report.


def grid_report(result: GridResult, selected: int, with_rho: bool) -> str:
  """Mean validation accuracy of every configuration; the selected one starred."""
  val = result.final("val_acc")
  rows = []
  for i, hp in enumerate(result.hparams):
    mark = "*" if i == selected else " "
    rows.append([f"{mark} {describe(hp, with_rho)}", pct(val[:, i])])
  return format_table([f"  {result.name} configuration", "val acc %"], rows)


def results_table(
    sgd: Selected,
    sam: Selected,
    sgd2x: Optional[Selected],
    timing: dict[str, Any],
) -> str:
  """The main table: one row per optimizer."""
  sgd_steps = sgd.result.epochs * sgd.result.steps_per_epoch
  t_sgd, t_sam = timing["SGD"]["median_ms"], timing["SAM"]["median_ms"]
  f_ratio = timing["flops_ratio"]

  def compute(sel: Selected, flops_per_step: Optional[float]) -> str:
    if flops_per_step is None or not timing["SGD"]["flops"]:
      return "n/a"
    steps = sel.result.epochs * sel.result.steps_per_epoch
    return f"{steps * flops_per_step / (sgd_steps * timing['SGD']['flops']):.2f}"

  def row(label: str, sel: Selected, with_rho: bool, ms: float, t_ratio: str,
          fl_ratio: str, flops: Optional[float], vs_sgd: bool) -> list[str]:
    if vs_sgd:
      d = paired(sel.final("test_acc"), sgd.final("test_acc"))
      diff = pct_diff(np.asarray(d["per_seed"]))
      wins = f"{d['wins']}/{d['n']}"
    else:
      diff, wins = "-", "-"
    return [label, describe(sel.hparams, with_rho), str(sel.result.epochs),
            pct(sel.final("train_acc")), pct(sel.final("test_acc")), diff, wins,
            f"{ms:.3f}", t_ratio, fl_ratio, compute(sel, flops)]

  fl = "n/a" if f_ratio is None else f"{f_ratio:.2f}"
  rows = [
      row("SGD", sgd, False, t_sgd, "1.00", "1.00", timing["SGD"]["flops"], False),
      row("SAM", sam, True, t_sam, f"{t_sam / t_sgd:.2f}", fl,
          timing["SAM"]["flops"], True),
  ]
  if sgd2x is not None:
    rows.append(row("SGD, 2x epochs", sgd2x, False, t_sgd, "1.00", "1.00",
                    timing["SGD"]["flops"], True))
  header = ["optimizer", "selected (by val acc)", "epochs", "train acc %",
            "test acc %", "test - SGD (pp)", "wins", "ms/step", "time x",
            "FLOPs x", "compute x"]
  return format_table(header, rows, n_left=2)


def discussion(
    s: Settings,
    sgd: Selected,
    sam: Selected,
    sgd2x: Optional[Selected],
    timing: dict[str, Any],
    n_sgd_configs: int,
    n_sam_configs: int,
    n_train: int,
) -> str:
  """The 'what this shows / what it does not show' paragraphs, from the numbers."""
  n = len(s.seeds)
  d = paired(sam.final("test_acc"), sgd.final("test_acc"))
  verdict = (
      "higher" if d["mean"] > 0 else "lower" if d["mean"] < 0 else "the same")
  same_sign = max(d["wins"], n - d["wins"] - d["ties"])
  spread = (
      "the mean difference is smaller than its seed-to-seed spread"
      if abs(d["mean"]) < d["std"] else
      "the difference has the same sign on every seed" if same_sign == n else
      "the difference has the same sign on most seeds"
      if same_sign >= 0.8 * n else
      "the sign of the difference varies between seeds")
  fl = timing["flops_ratio"]
  fl_text = f"{fl:.2f}x the XLA FLOPs" if fl is not None else "(no FLOP count)"
  shows = (
      f"What this shows: on clean MNIST-1D ({n_train} training examples) with"
      f" a {'-'.join(map(str, LAYER_SIZES))} ReLU MLP"
      f" trained for {s.epochs} epochs, SAM at its selected setting"
      f" ({describe(sam.hparams, True)}) reaches a test accuracy"
      f" {abs(d['mean']) * 100:.1f} percentage points {verdict} than tuned SGD"
      f" ({describe(sgd.hparams, False)}), paired over {n} seeds"
      f" ({pct_diff(np.asarray(d['per_seed']))} pp, SAM ahead on"
      f" {d['wins']}/{n} seeds); {spread}. Each SAM step costs"
      f" {timing['time_ratio']:.2f}x the wall time of an SGD step on this"
      f" machine and {fl_text}, since it takes a second forward and backward"
      " pass."
  )
  if sgd2x is not None:
    d2 = paired(sam.final("test_acc"), sgd2x.final("test_acc"))
    shows += (
        f" Given the same compute (SGD at its selected setting for"
        f" {sgd2x.result.epochs} epochs, not re-tuned), SGD reaches"
        f" {pct(sgd2x.final('test_acc'))}% test accuracy; SAM minus this"
        f" baseline is {pct_diff(np.asarray(d2['per_seed']))} pp (SAM ahead on"
        f" {d2['wins']}/{n} seeds)."
    )
  not_shown = (
      f"What it does not show: {n} seeds on one small data set and one"
      f" validation split of {N_VAL} examples support no claim of statistical"
      " significance, and the seeds share the data set. A run is"
      " deterministic for fixed code, but training is chaotic: changes that"
      " only alter floating-point rounding (an algebraically equivalent"
      " rewrite of the SAM update, a different number of vmapped runs) move"
      " single-seed accuracies by about a point, so read the seed spread, not"
      " the last digit."
  )
  if n_sam_configs > n_sgd_configs:
    not_shown += (
        f" SAM had one more hyperparameter and {n_sam_configs} configurations"
        f" against SGD's {n_sgd_configs}, so it had more chances to fit the"
        " validation split."
    )
  not_shown += (
      " Selection uses the final-epoch validation accuracy (never the test"
      " split), without early stopping. Nothing here"
      " covers label noise, convolutional networks or BatchNorm, larger data"
      " sets, other base optimizers, or SAM variants; the timings are for"
      " tiny batches on a CPU, where fixed per-call overheads weigh more than"
      " on an accelerator."
  )
  if sgd2x is None:
    not_shown += " The equal-compute SGD baseline was not run."
  return shows + "\n\n" + not_shown


# ---------------------------------------------------------------------------
# Outputs.


def to_json(
    s: Settings,
    ds: data_lib.Dataset,
    selections: dict[str, Selected],
    timing: dict[str, Any],
    wall: dict[str, float],
) -> dict[str, Any]:
  """Everything measured, as plain JSON-serializable values."""
  optimizers = {}
  for key, sel in selections.items():
    r = sel.result
    optimizers[key] = {
        "name": r.name,
        "use_sam": r.use_sam,
        "epochs": r.epochs,
        "steps_per_epoch": r.steps_per_epoch,
        "seeds": r.seeds,
        "configs": r.hparams,
        "final_per_seed": {  # [seed][config]
            m: r.final(m).tolist()
            for m in ("train_acc", "train_loss", "val_acc", "test_acc")},
        "mean_val_acc_per_config": r.final("val_acc").mean(axis=0).tolist(),
        "selected_index": sel.index,
        "selected_hparams": sel.hparams,
        "selected_final": {
            m: {"per_seed": sel.final(m).tolist(),
                "mean": mean_std(sel.final(m))[0],
                "std": mean_std(sel.final(m))[1]}
            for m in ("train_acc", "train_loss", "val_acc", "test_acc")},
        "selected_curves": {  # [seed][epoch]
            m: sel.curve(m).tolist() for m in sorted(r.history)},
        "compile_s": r.compile_s,
        "epoch_s": r.epoch_s,
        "vmapped_ms_per_run_step": vmapped_ms_per_run_step(r),
    }
  comparisons = {"SAM_minus_SGD_test_acc": paired(
      selections["sam"].final("test_acc"), selections["sgd"].final("test_acc"))}
  if "sgd_2x" in selections:
    comparisons["SAM_minus_SGD2x_test_acc"] = paired(
        selections["sam"].final("test_acc"),
        selections["sgd_2x"].final("test_acc"))
    comparisons["SGD2x_minus_SGD_test_acc"] = paired(
        selections["sgd_2x"].final("test_acc"),
        selections["sgd"].final("test_acc"))
  return {
      "settings": {
          "epochs": s.epochs,
          "seeds": s.seeds,
          "quick": s.quick,
          "grid": {k: list(v) for k, v in s.grid.items()},
          "batch_size": BATCH_SIZE,
          "momentum": MOMENTUM,
          "lr_schedule": "cosine decay to 0 over all steps",
          "weight_decay": "decoupled, optax.add_decayed_weights after sam",
          "model": f"MLP {'-'.join(map(str, LAYER_SIZES))} ReLU",
          "selection": "best mean final-epoch validation accuracy over seeds",
          "std": "sample standard deviation over seeds (ddof=1)",
      },
      "data": {
          "name": "MNIST-1D (mnist1d.make_dataset(get_dataset_args()))",
          "summary": ds.summary(),
          "n_train": len(ds.y_train),
          "n_val": len(ds.y_val),
          "n_test": len(ds.y_test),
      },
      "optimizers": optimizers,
      "comparisons": comparisons,
      "timing": timing,
      "wall_s": wall,
      "environment": {
          "python": platform.python_version(),
          "jax": jax.__version__,
          "optax": optax.__version__,
          "sam_optax": sam_optax.__version__,
          "device": str(jax.devices()[0]),
          "cpu_count": os.cpu_count(),
          "platform": platform.platform(),
      },
  }


def plot(selections: dict[str, Selected], path: Path) -> None:
  """Test accuracy and training loss per epoch (mean +/- std over seeds)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  styles = {
      "sgd": ("SGD", "tab:blue", "-"),
      "sam": ("SAM", "tab:red", "-"),
      "sgd_2x": ("SGD, 2x epochs (SAM's compute)", "tab:blue", "--"),
  }
  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
  for key, sel in selections.items():
    label, color, ls = styles[key]
    label = f"{label}: {describe(sel.hparams, sel.result.use_sam)}"
    epochs = np.arange(1, sel.result.epochs + 1)
    panels = ((ax_acc, "test_acc", 100.0), (ax_loss, "train_loss", 1.0))
    for ax, metric, scale in panels:
      curve = sel.curve(metric) * scale
      mean = curve.mean(axis=0)
      std = curve.std(axis=0, ddof=1) if curve.shape[0] > 1 else np.zeros_like(mean)
      ax.plot(epochs, mean, color=color, ls=ls, label=label)
      ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.15, lw=0)
  n = len(next(iter(selections.values())).result.seeds)
  ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)",
             title=f"MNIST-1D test accuracy (mean +/- std, {n} seeds)")
  ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log",
              title="training loss (full training split)")
  sam_curve = selections["sam"].curve("test_acc") * 100
  ax_acc.set_ylim(max(0.0, float(sam_curve.mean(axis=0).max()) - 30), None)
  for ax in (ax_acc, ax_loss):
    ax.grid(alpha=0.3)
  ax_acc.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Runs the comparison, prints the report, writes JSON and PNG; returns the JSON."""
  s = parse_args(argv)
  t_start = time.perf_counter()
  wall: dict[str, float] = {}

  t0 = time.perf_counter()
  ds = data_lib.load_mnist1d(N_VAL)
  wall["data"] = time.perf_counter() - t0
  model = models.mlp(LAYER_SIZES)
  n_params = models.num_params(model.init(jax.random.PRNGKey(0)))
  sgd_configs = grid_configs(s.grid, with_rho=False)
  sam_configs = grid_configs(s.grid, with_rho=True)
  print(f"MNIST-1D: {ds.summary()}")
  print(f"model: MLP {'-'.join(map(str, LAYER_SIZES))} ReLU ({n_params} parameters);"
        f" batch {BATCH_SIZE}, {s.epochs} epochs, SGD momentum {MOMENTUM},"
        " cosine lr decay, decoupled weight decay")
  print(f"seeds {s.seeds} (paired: same init and batch order for every optimizer)")
  print(f"search: SGD lr x wd = {len(sgd_configs)} configs; SAM lr x wd x rho ="
        f" {len(sam_configs)} configs (one more hyperparameter)\n")

  common = dict(seeds=s.seeds, epochs=s.epochs, batch_size=BATCH_SIZE,
                momentum=MOMENTUM)
  t0 = time.perf_counter()
  sgd_grid = train_grid(model, ds, sgd_configs, use_sam=False, name="SGD", **common)
  wall["sgd_grid"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  sam_grid = train_grid(model, ds, sam_configs, use_sam=True, name="SAM", **common)
  wall["sam_grid"] = time.perf_counter() - t0
  selections = {
      "sgd": Selected(sgd_grid, sgd_grid.select("val_acc")),
      "sam": Selected(sam_grid, sam_grid.select("val_acc")),
  }
  if s.equal_compute:
    t0 = time.perf_counter()
    hp = HParams(**selections["sgd"].hparams)
    sgd2x_grid = train_grid(model, ds, [hp], use_sam=False, name="SGD 2x epochs",
                            **{**common, "epochs": 2 * s.epochs})
    selections["sgd_2x"] = Selected(sgd2x_grid, 0)
    wall["sgd_2x"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  timing = time_single_steps(
      model, ds, selections["sgd"].hparams, selections["sam"].hparams,
      total_steps=s.epochs * sgd_grid.steps_per_epoch, reps=s.timing_reps)
  for key, sel in selections.items():
    timing[f"vmapped_ms_per_run_step_{key}"] = vmapped_ms_per_run_step(sel.result)
  wall["timing"] = time.perf_counter() - t0

  print()
  print(grid_report(sgd_grid, selections["sgd"].index, with_rho=False))
  print()
  print(grid_report(sam_grid, selections["sam"].index, with_rho=True))
  print()
  print(results_table(selections["sgd"], selections["sam"],
                      selections.get("sgd_2x"), timing))
  print(
      "\naccuracies: final epoch, mean +/- std over seeds; 'test - SGD': paired"
      " per-seed difference from SGD in percentage points, 'wins': seeds where"
      " the row beats SGD.\nms/step: median of"
      f" {s.timing_reps} interleaved calls of one jitted, unbatched step"
      f" (batch {BATCH_SIZE}, {jax.devices()[0].platform.upper()},"
      f" {os.cpu_count()} cores); time x / FLOPs x: per step relative to SGD"
      " (FLOPs from XLA's cost analysis); compute x: FLOPs of the whole run"
      " relative to the SGD run.\nIn the vmapped runs, ms per run-step: "
      + ", ".join(f"{sel.result.name} {vmapped_ms_per_run_step(sel.result):.3f}"
                  for sel in selections.values())
      + "."
  )
  print()
  print(discussion(s, selections["sgd"], selections["sam"],
                   selections.get("sgd_2x"), timing,
                   len(sgd_configs), len(sam_configs), len(ds.y_train)))

  s.out.mkdir(parents=True, exist_ok=True)
  wall["total"] = time.perf_counter() - t_start
  report = to_json(s, ds, selections, timing, wall)
  json_path, png_path = s.out / "demo.json", s.out / "demo.png"
  with open(json_path, "w") as f:
    json.dump(report, f, indent=1)
  plot(selections, png_path)
  print(f"\nwrote {json_path} and {png_path} ({time.perf_counter() - t_start:.0f} s)")
  return report


if __name__ == "__main__":
  main()
