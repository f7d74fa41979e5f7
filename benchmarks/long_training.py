"""Training longer: does SAM keep improving where SGD overfits noisy labels?

Foret et al. (2021) report that SAM keeps improving where SGD starts to
overfit, notably with noisy labels. This benchmark checks it on one setting of
``benchmarks/generalization.py``: MNIST-1D, its MLP, 25% symmetric label
noise (exact flips on the training and validation labels; the test labels are
clean). SGD with momentum and SAM in front of the same base
(``add_decayed_weights(wd)``, ``sgd(cosine(lr), momentum=0.9)``) train for
``--epochs`` epochs (400 by default) on 5 paired seeds (the same
initialization, batch order and noisy labels per seed for both optimizers),
with test accuracy and the fit of correctly and wrongly labelled training
examples (memorization) recorded every 10 epochs.

Hyperparameters are fixed, not re-tuned: each optimizer uses its tuned
setting for this data set, model and noise level from the stored
generalization results (``--tuned``, by default
``benchmarks/results/generalization.json``; selected there on noisy
validation labels at that benchmark's epoch count). The cosine learning-rate
schedule spans the whole long run (``total_steps = epochs x steps per
epoch``): an intermediate evaluation is a snapshot of the long run at a still
large learning rate, not the end of a shorter run.

``python benchmarks/long_training.py`` writes ``<out>/long_training.json`` and
``<out>/long_training.png``; ``--report docs/benchmarks/long_training.md`` rewrites the page's
``long-training`` region; ``--report-only`` redoes the plot and region from
the JSON; ``--quick`` is a smoke test (4 epochs, 2 seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# `python benchmarks/long_training.py` puts benchmarks/ on the path, not the
# repository.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from benchmarks import generalization as gen  # noqa: E402
from benchmarks.common import readme as readme_lib  # noqa: E402
from benchmarks.common import stats, sweep  # noqa: E402

START = "<!-- long-training:start -->"
END = "<!-- long-training:end -->"
JSON_NAME = "long_training.json"
PNG_NAME = "long_training.png"
DATASET = "mnist1d"
MODEL = "MLP"
NOISE = 0.25
OPTIMIZERS = ("sgd", "sam")
CHECKPOINTS = (50, 100, 200, 300, 400)
TUNED_JSON = Path("benchmarks/results/generalization.json")
METRICS = ("test_acc", "val_acc", "train_acc", "fit_clean", "fit_noisy",
           "noisy_true", "test_loss", "train_loss")
LABELS = {"sgd": "SGD", "sam": "SAM"}


# ---------------------------------------------------------------------------
# Settings.


def tuned_hparams(path: Path) -> dict[str, Any]:
  """SGD's and SAM's tuned hyperparameters for MNIST-1D, MLP, 25% noise.

  Read from a stored generalization JSON; returns ``{"hparams": {key: {...}},
  "source": {...}}``.
  """
  path = Path(path)
  if not path.exists():
    raise SystemExit(f"{path} not found: the tuned settings come from the"
                     " stored generalization benchmark (--tuned).")
  stored = json.loads(path.read_text())
  try:
    entry = stored["parts"][DATASET]["models"][MODEL]["noise"][gen.noise_key(NOISE)]
    hp = {k: {n: float(v) for n, v in entry[k]["tuned"]["hparams"].items()}
          for k in OPTIMIZERS}
  except KeyError as e:
    raise SystemExit(f"{path} holds no tuned {DATASET} {MODEL}"
                     f" {gen.noise_key(NOISE)}% setting ({e!r}).") from None
  s = stored.get("settings", {})
  return {"hparams": hp,
          "source": {"path": str(path), "epochs": s.get("epochs"),
                     "seeds": s.get("seeds"), "quick": s.get("quick"),
                     "selection": s.get("selection"),
                     "grid": s.get("grids", {}).get(DATASET),
                     "rho_grid": s.get("rho_grid")}}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--epochs", type=int, default=400)
  parser.add_argument("--eval-every", type=int, default=10)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
  parser.add_argument("--report", "--readme", dest="readme", type=Path, default=None,
                      help="rewrite this page's long-training region")
  parser.add_argument("--tuned", type=Path, default=TUNED_JSON,
                      help="generalization JSON with the tuned settings")
  parser.add_argument("--report-only", action="store_true",
                      help="only redo the plot and report region from the JSON")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: 4 epochs, evaluation every 2, 2 seeds")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  if args.quick:
    args.epochs, args.eval_every, args.seeds = 4, 2, 2
  return args


def command(args: argparse.Namespace) -> str:
  cmd = "python benchmarks/long_training.py"
  if args.quick:
    cmd += " --quick"
  else:
    if args.epochs != 400:
      cmd += f" --epochs {args.epochs}"
    if args.eval_every != 10:
      cmd += f" --eval-every {args.eval_every}"
    if args.seeds != 5:
      cmd += f" --seeds {args.seeds}"
  return cmd + " --report docs/benchmarks/long_training.md"


# ---------------------------------------------------------------------------
# Training.


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Trains SGD and SAM on the paired seeds; returns the JSON result."""
  spec = gen.DATA[DATASET]
  tuned = tuned_hparams(args.tuned)
  ds = spec.load()
  seeds = list(range(args.seeds))
  problem, groups = gen.build_problem(ds, (NOISE,), seeds)
  seeds_g = [s for _, s in groups]
  desc, make_model = spec.models[MODEL]
  model = make_model()
  optimizers: dict[str, Any] = {}
  eval_epochs = None
  steps_per_epoch = None
  for key in OPTIMIZERS:
    h = tuned["hparams"][key]
    res = sweep.train_sweep(
        model, problem, gen.make_optimizer(key, len(ds.y_train)),
        {k: np.asarray([v], np.float32) for k, v in h.items()}, seeds_g,
        epochs=args.epochs, batch_size=spec.batch, eval_every=args.eval_every,
        progress=not args.no_progress, desc=f"{LABELS[key]} {args.epochs} epochs")
    eval_epochs = res.eval_epochs
    steps_per_epoch = res.steps_per_epoch
    optimizers[key] = {
        "label": LABELS[key],
        "hparams": h,
        "curves": {m: res.history[m][:, 0, :].astype(np.float64).tolist()
                   for m in METRICS},
        "collapsed": res.collapsed()[:, 0].tolist(),
        "fingerprints": res.fingerprints,
        "label_flips": res.label_flips,
        "compile_s": res.compile_s,
        "run_s": res.run_s,
        "s_per_run": res.run_s / res.num_runs,
    }
  if optimizers["sgd"]["fingerprints"] != optimizers["sam"]["fingerprints"]:
    raise RuntimeError("SGD and SAM trained on different data: runs not paired.")
  return {
      "settings": {
          "data": DATASET, "data_label": spec.label, "model": MODEL,
          "model_description": desc, "noise": NOISE,
          "epochs": args.epochs, "eval_every": args.eval_every,
          "seeds": seeds, "batch": spec.batch,
          "steps_per_epoch": steps_per_epoch,
          "total_steps": args.epochs * steps_per_epoch,
          "momentum": gen.MOMENTUM, "quick": bool(args.quick),
          "n_train": len(ds.y_train), "n_val": len(ds.y_val),
          "n_test": len(ds.y_test),
          "schedule": "cosine decay of lr to 0 over all epochs x steps per"
                      " epoch of the run (no warm-up)",
          "hparams_source": tuned["source"],
          "std": "sample standard deviation over seeds (ddof=1)",
          "interval": "95% t-interval of the mean paired difference",
      },
      "eval_epochs": eval_epochs,
      "optimizers": optimizers,
  }


# ---------------------------------------------------------------------------
# Summaries and the verdict.


def lr_factor(epoch: int, epochs: int) -> float:
  """The cosine schedule's factor of the peak lr after ``epoch`` of ``epochs``."""
  return 0.5 * (1.0 + np.cos(np.pi * min(epoch, epochs) / epochs))


def _paired(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
  """``stats.paired(a, b)`` with the 95% t-interval and its verdict."""
  d = stats.paired(a, b)
  half = stats.t_half_width(d)
  d["half_width"] = half
  d["ci"] = [d["mean"] - half, d["mean"] + half]
  d["verdict"] = stats.verdict(d, higher_is_better=True)
  return d


def table_epochs(eval_epochs: Sequence[int]) -> list[int]:
  """The checkpoints reached, and the last evaluated epoch."""
  out = [e for e in CHECKPOINTS if e in eval_epochs]
  if eval_epochs[-1] not in out:
    out.append(eval_epochs[-1])
  return out


def summarize(result: dict[str, Any]) -> dict[str, Any]:
  """Rows of the table: per epoch (and at each run's best), both optimizers."""
  ev = list(result["eval_epochs"])
  epochs = result["settings"]["epochs"]
  cur = {k: {m: np.asarray(v, np.float64) for m, v in o["curves"].items()}
         for k, o in result["optimizers"].items()}
  rows = []
  for e in table_epochs(ev):
    i = ev.index(e)
    row: dict[str, Any] = {"epoch": e, "lr_factor": lr_factor(e, epochs)}
    for k in OPTIMIZERS:
      row[k] = {m: stats.summary(cur[k][m][:, i])
                for m in ("test_acc", "fit_clean", "fit_noisy")}
    row["sam_minus_sgd"] = _paired(cur["sam"]["test_acc"][:, i],
                                   cur["sgd"]["test_acc"][:, i])
    rows.append(row)
  best: dict[str, Any] = {"epoch": "best"}
  for k in OPTIMIZERS:
    acc = cur[k]["test_acc"]
    idx = np.argmax(acc, axis=1)  # first maximum of each run
    seeds = np.arange(acc.shape[0])
    best[k] = {"best_epoch": [ev[j] for j in idx]}
    best[k].update({m: stats.summary(cur[k][m][seeds, idx])
                    for m in ("test_acc", "fit_clean", "fit_noisy")})
  best["sam_minus_sgd"] = _paired(
      np.asarray(best["sam"]["test_acc"]["per_seed"]),
      np.asarray(best["sgd"]["test_acc"]["per_seed"]))
  return {"rows": rows, "best": best,
          "verdict": verdict(ev, cur["sgd"]["test_acc"], cur["sam"]["test_acc"])}


def peak(eval_epochs: Sequence[int], curves: Any) -> dict[str, Any]:
  """Where the mean curve peaks, and how far each run falls from there.

  The peak is the evaluation with the highest mean over seeds; the fall is
  the per-seed difference between that evaluation and the last one, with its
  95% t-interval. ``falls`` is true when the peak lies before the end and the
  interval lies above zero.
  """
  c = np.asarray(curves, np.float64)
  mean = c.mean(axis=0)
  i = int(np.argmax(mean))
  d = _paired(c[:, i], c[:, -1])
  before_end = i < c.shape[1] - 1
  return {"epoch": int(eval_epochs[i]), "index": i, "peak": float(mean[i]),
          "final": float(mean[-1]), "drop": d["mean"], "drop_ci": d["ci"],
          "peaks_before_end": bool(before_end),
          "falls": bool(before_end and d["verdict"] == "win")}


_OUTCOME = {"win": "wins against", "loss": "loses to", "tie": "ties with"}


def _pts(x: float) -> str:
  return f"{round(100 * x, 1) + 0.0:+.1f}"


def _ci(ci: Sequence[float]) -> str:
  if not np.all(np.isfinite(ci)):
    return "no interval with one seed"
  return f"95% CI [{_pts(ci[0])}, {_pts(ci[1])}]"


def _peak_text(label: str, p: dict[str, Any], last: int) -> str:
  if not p["peaks_before_end"]:
    return (f"{label}'s mean test accuracy is highest at the last evaluation"
            f" (epoch {last}, {100 * p['final']:.1f}%)")
  how = "a significant fall" if p["falls"] else "not a significant fall"
  return (f"{label}'s mean test accuracy peaks at epoch {p['epoch']} ({100 * p['peak']:.1f}%) and"
          f" ends {100 * p['drop']:.1f} points below it ({_ci(p['drop_ci'])}"
          f" per seed, {how})")


def verdict(eval_epochs: Sequence[int], sgd: Any, sam: Any) -> dict[str, Any]:
  """Whether SAM keeps improving where SGD overfits, from per-seed curves.

  Args:
    eval_epochs: the evaluated epochs.
    sgd: SGD's test accuracy, ``(seeds, evaluations)``, seeds paired with
      ``sam``'s.
    sam: SAM's test accuracy, same shape.

  Returns:
    ``final`` (SAM vs SGD at the last evaluation: ``win``/``loss``/``tie``
    by the paired 95% t-interval), ``sgd_peak``/``sam_peak`` (:func:`peak`),
    ``sam_after_sgd_peak`` (SAM's paired change from SGD's peak epoch to the
    end, with its verdict: ``win`` = it keeps improving), ``claim``
    (``supported``, ``partly``, ``not supported`` or ``not tested``) and the
    ``sentence``.
  """
  ev = list(eval_epochs)
  sgd = np.asarray(sgd, np.float64)
  sam = np.asarray(sam, np.float64)
  if sgd.shape != sam.shape or sgd.shape[1] != len(ev):
    raise ValueError(f"curves {sgd.shape} and {sam.shape} do not match"
                     f" {len(ev)} evaluations.")
  final = _paired(sam[:, -1], sgd[:, -1])
  p_sgd, p_sam = peak(ev, sgd), peak(ev, sam)
  after = _paired(sam[:, -1], sam[:, p_sgd["index"]])
  last = ev[-1]
  out_final = final["verdict"]
  text = (f"At epoch {last}, SAM {_OUTCOME[out_final]} SGD"
          f" ({_pts(final['mean'])} points, {_ci(final['ci'])}, SAM ahead on"
          f" {final['wins']}/{final['n']} seeds). "
          + _peak_text("SGD", p_sgd, last) + "; "
          + _peak_text("SAM", p_sam, last) + ". ")
  if not p_sgd["falls"]:
    claim = "not tested"
    text += ("SGD does not fall significantly from its peak here, so this run"
             " does not show the overfitting the claim is about.")
  else:
    change = (f"SAM changes by {_pts(after['mean'])} points between SGD's peak"
              f" (epoch {p_sgd['epoch']}) and the end ({_ci(after['ci'])})")
    if after["verdict"] == "loss":
      claim = "not supported"
      text += (f"SGD overfits, but SAM falls too: {change}; the claim that SAM"
               " keeps improving where SGD overfits is not supported.")
    elif out_final == "win":
      if after["verdict"] == "win":
        claim = "supported"
        text += (f"SGD overfits while SAM keeps improving ({change}) and ends"
                 " ahead: this supports the claim.")
      else:
        claim = "partly"
        text += (f"SGD overfits while SAM holds ({change}, not a significant"
                 " gain) and ends ahead: this partly supports the claim (SAM"
                 " does not overfit where SGD does, but does not measurably"
                 " keep improving).")
    else:
      claim = "partly"
      text += (f"SGD overfits while SAM does not fall ({change}), but SAM"
               f" {_OUTCOME[out_final]} SGD at the end: this only partly"
               " supports the claim.")
  return {"final": out_final, "final_diff": final, "sgd_peak": p_sgd,
          "sam_peak": p_sam, "sam_after_sgd_peak": after, "claim": claim,
          "sentence": text}


# ---------------------------------------------------------------------------
# Report.


def _pct(s: dict[str, Any]) -> str:
  return stats.pct(s["mean"], s["std"])


def _fit(row_k: dict[str, Any]) -> str:
  c, n = row_k["fit_clean"], row_k["fit_noisy"]
  if not (np.isfinite(c["mean"]) and np.isfinite(n["mean"])):
    return "–"
  return f"{100 * c['mean']:.0f} / {100 * n['mean']:.0f}"


def _diff_cell(d: dict[str, Any]) -> str:
  word = {"win": "SAM wins", "loss": "SAM loses", "tie": "tie"}[d["verdict"]]
  if not np.isfinite(d["half_width"]):
    return f"{_pts(d['mean'])} ({d['wins']}/{d['n']}; {word})"
  return (f"{_pts(d['mean'])} ± {100 * d['half_width']:.1f}"
          f" ({d['wins']}/{d['n']}; {word})")


def table(summary: dict[str, Any]) -> str:
  header = ["epoch", "cosine lr factor", "SGD test %", "SAM test %",
            "SAM − SGD, points ± 95% CI (seeds won)",
            "SGD fit clean / noisy %", "SAM fit clean / noisy %"]
  rows = []
  for r in summary["rows"]:
    rows.append([str(r["epoch"]), f"{r['lr_factor']:.2f}",
                 _pct(r["sgd"]["test_acc"]), _pct(r["sam"]["test_acc"]),
                 _diff_cell(r["sam_minus_sgd"]), _fit(r["sgd"]), _fit(r["sam"])])
  b = summary["best"]
  rows.append(["each run's best (oracle)", "–", _pct(b["sgd"]["test_acc"]),
               _pct(b["sam"]["test_acc"]), _diff_cell(b["sam_minus_sgd"]),
               _fit(b["sgd"]), _fit(b["sam"])])
  return stats.markdown_table(header, rows)


def _hp(h: dict[str, float]) -> str:
  return ", ".join(f"{'ρ' if k == 'rho' else k} {v:.3g}" for k, v in h.items())


def _epochs_range(xs: Sequence[int]) -> str:
  lo, hi = min(xs), max(xs)
  return f"{lo}" if lo == hi else f"{lo}–{hi}"


def readme_region(result: dict[str, Any]) -> str:
  """The generated report text between the markers."""
  s = result["settings"]
  env = result["environment"]
  opt = result["optimizers"]
  summary = summarize(result)
  src = s["hparams_source"]
  b = summary["best"]
  src_text = (f"the tuned settings of the {src['epochs']}-epoch generalization"
              f" benchmark for this data set, model and noise level (`{src['path']}`,"
              " selected there on noisy validation labels), not re-tuned for"
              " the long run")
  lines = [
      f"Generated by `{result['command']}` from"
      f" `benchmarks/results/{JSON_NAME}` ({env.get('date', '')}; machine:"
      f" {env['cpu_count']} CPU cores, {env['platform']}, jax {env['jax']},"
      f" optax {env['optax']}; {result['wall_s'] / 60:.1f} min wall clock)."
      f" {s['data_label']} ({s['n_train']} train / {s['n_val']} val /"
      f" {s['n_test']} test), {s['model_description']}, {round(100 * s['noise'])}%"
      " symmetric label noise (exactly round(p·N) training and validation"
      " labels flipped; test labels clean), batch"
      f" {s['batch']}, {s['epochs']} epochs, evaluation every"
      f" {s['eval_every']} epochs, {len(s['seeds'])} paired seeds (same"
      " initialization, batch order and noisy labels for both optimizers;"
      " the data fingerprints agree). Base: `add_decayed_weights(wd)`,"
      f" `sgd(cosine(lr), momentum={s['momentum']})`; SAM = `sam(ρ)` in front."
      f" SGD: {_hp(opt['sgd']['hparams'])}; SAM: {_hp(opt['sam']['hparams'])};"
      f" {src_text}.",
      "",
      f"The cosine schedule spans all {s['epochs']} epochs"
      f" ({s['total_steps']} steps), so an earlier row is a snapshot of the"
      " long run at the learning rate in the second column, not the end of"
      " a shorter run (whose learning rate would have decayed to 0); only the"
      f" epoch-{result['eval_epochs'][-1]} row compares finished schedules."
      " Test accuracy %, mean ± std over seeds; SAM − SGD is the paired"
      " difference with its 95% t-interval (SAM wins or loses where the"
      " interval excludes 0); fit = % of correctly labelled training examples"
      " predicted as labelled / % of wrongly labelled ones predicted as their"
      " wrong label (memorization). The last row takes every run at its own"
      " best test accuracy, an oracle choice made on the test set (best epochs"
      f" SGD {_epochs_range(b['sgd']['best_epoch'])}, SAM"
      f" {_epochs_range(b['sam']['best_epoch'])}).",
      "",
      table(summary),
      "",
      summary["verdict"]["sentence"],
      "",
      f"![test accuracy and memorization vs epoch](benchmarks/results/{PNG_NAME})",
  ]
  return "\n".join(lines)


def write_readme(readme: Path, result: dict[str, Any]) -> None:
  readme_lib.replace_region(readme, START, END, readme_region(result))


def plot(result: dict[str, Any], path: Path) -> None:
  """Test accuracy and memorized noisy labels vs epoch, mean ± std."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ev = np.asarray(result["eval_epochs"])
  s = result["settings"]
  fig, (ax_a, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
  colors = {"sgd": "tab:blue", "sam": "tab:orange"}
  for k, o in result["optimizers"].items():
    for ax, metric in ((ax_a, "test_acc"), (ax_m, "fit_noisy")):
      c = 100 * np.asarray(o["curves"][metric], np.float64)
      m, sd = c.mean(axis=0), c.std(axis=0, ddof=1) if c.shape[0] > 1 else 0 * c[0]
      ax.plot(ev, m, color=colors[k], label=f"{o['label']} ({_hp(o['hparams'])})")
      ax.fill_between(ev, m - sd, m + sd, color=colors[k], alpha=0.2)
    acc = 100 * np.asarray(o["curves"]["test_acc"], np.float64).mean(axis=0)
    i = int(np.argmax(acc))
    ax_a.plot(ev[i], acc[i], "v", color=colors[k], markersize=8)
  lr = ax_a.twinx()
  fine = np.linspace(0, s["epochs"], 200)
  lr.plot(fine, [lr_factor(e, s["epochs"]) for e in fine], color="0.6",
          linestyle=":", linewidth=1)
  lr.set_ylim(0, 1.05)
  lr.set_ylabel("cosine lr factor (dotted)", color="0.4")
  ax_a.set(xlabel="epoch", ylabel="test accuracy % (clean test labels)",
           title=f"{s['data_label']} {s['model']}, {round(100 * s['noise'])}%"
                 " label noise: test accuracy (▼ mean peak)")
  ax_m.set(xlabel="epoch", ylabel="% of noisy training labels fitted",
           title="memorization of the wrongly labelled examples", ylim=(0, 100))
  for ax in (ax_a, ax_m):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs (or reloads) the benchmark, writes JSON, plot and report region."""
  args = parse_args(argv)
  path = args.out / JSON_NAME
  if args.report_only:
    if not path.exists():
      raise SystemExit(f"--report-only needs {path}; run the benchmark first.")
    result = json.loads(path.read_text())
  else:
    t0 = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - t0
    result["command"] = command(args)
    result["environment"] = {**gen.environment(),
                             "date": time.strftime("%Y-%m-%d")}
    result["summary"] = summarize(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
  plot(result, args.out / PNG_NAME)
  text = readme_region(result)
  print(text)
  if args.readme is not None:
    write_readme(args.readme, result)
    print(f"\nrewrote the long-training region of {args.readme}")
  return result


if __name__ == "__main__":
  main()
