"""Low-data language modelling: AdamW against SAM + AdamW on Shakespeare, from scratch.

Bahri, Mobahi and Tay (ACL 2022) report that SAM improves language models
most when data are scarce (fine-tuning T5 on 5% of SuperGLUE). This
benchmark asks the from-scratch version of that question on two CPU cores:
a small character-level model trained on 1%, 5% and 100% of the training
split of eight Shakespeare plays (committed with the repository, see
``benchmarks/common/text.py``), every optimizer for the same number of steps.

Protocol:

* Data: the plays cut into blocks of about 1,024 characters, 80/10/10 to
  train/validation/test in a fixed pattern; a fraction of the training split
  is a fixed random set of its blocks (nested: 1% inside 5%), the same for
  every seed. Training batches are random windows inside the chosen blocks;
  validation and test losses are mean per-character cross-entropies on
  fixed windows (an evenly spaced subset of at most ``eval_windows`` = 384
  windows of 64 characters, a quarter of each split).
* Model: ``--model transformer`` (default: causal, 2 pre-LN layers, width
  64, learned positions, tied embeddings, dropout 0.1 on the embeddings and
  the residual branches, none on the attention weights, about 0.1M
  parameters) or ``--model gru`` (2 GRU layers, width 64), same code path.
* Every optimizer runs ``--steps`` (250) steps of 16 windows of 64
  characters on the same base: gradient clipping at global norm 1, then
  AdamW (lr 1e-2, b2 0.99, weight decay 0.1 on matrices and embeddings),
  linear warm-up over the first 25 steps, cosine decay to 0 at the last step.

  - **AdamW**;
  - **SAM + AdamW**: ``sam_optax.sam(ρ)`` in front of the same base; ρ from
    ``RHOS`` = {0.02, 0.05, 0.1} (the low end of Bahri et al.'s grid
    {0.02, ..., 0.3}; their small model used 0.05), selected per fraction by
    the validation loss of the first ``select_seeds`` = 1 seed (the other
    seeds run the selected ρ only: the grid on every seed would not fit in
    30 minutes on two cores);
  - **Fisher-mask SAM + AdamW**: ``sam_optax.fisher_masked_sam`` (perturb
    the 10% of entries with the largest accumulated squared gradient, mask
    refreshed every 50 steps) at SAM's selected ρ, as Zhong et al. compare
    the two at one radius;
  - **AdamW, 2× steps**: SAM's compute (two forward/backward passes per
    step) spent on plain steps; same warm-up, cosine over the 2× steps.

* Pairing: seed ``s`` gives every optimizer the same initial weights, the
  same batches (the 2× run sees them first, then more) and the same dropout
  masks; SAM's two passes share the step's dropout key (closed over in the
  loss closure).
* Reported: test loss (nats/char) and perplexity (exp of it), mean ± std
  over seeds; the paired per-seed difference of the test loss against AdamW
  and against AdamW with 2× steps, with the seeds won; a verdict per pair:
  *win* / *loss* when the 95% t-interval of the paired difference lies
  below / above zero, *tie* otherwise.

``python benchmarks/language_model.py`` writes ``<out>/language_model.json``
(``language_model_gru.json`` for the GRU) and a plot; ``--report docs/benchmarks/language_model.md``
regenerates the page's region (``language-model``; the GRU's is
``language-model-gru``);
``--report-only`` rewrites both from the JSON; ``--quick`` is a smoke test
(about a minute on two idle cores; 23 minutes for the full run on a shared
machine, 22 minutes of process CPU time).
"""

from __future__ import annotations

import argparse
import json
import math
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

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from benchmarks import generalization as gen  # noqa: E402
from benchmarks.common import readme as readme_lib  # noqa: E402
from benchmarks.common import sequence_models as sm  # noqa: E402
from benchmarks.common import stats, text  # noqa: E402

START = "<!-- language-model:start -->"
END = "<!-- language-model:end -->"
FRACTIONS = (0.01, 0.05, 1.0)
RHOS = (0.02, 0.05, 0.1)
METHODS = ("adamw", "sam", "fsam", "adamw2x")
LABELS = {"adamw": "AdamW", "sam": "SAM + AdamW", "fsam": "Fisher-mask SAM + AdamW",
          "adamw2x": "AdamW, 2× steps"}
PASSES = {"adamw": 1, "sam": 2, "fsam": 2, "adamw2x": 1}   # forward/backward per step
STEP_FACTOR = {"adamw": 1, "sam": 1, "fsam": 1, "adamw2x": 2}
DEFAULTS = dict(d_model=64, num_layers=2, num_heads=4, length=64, batch=16,
                steps=250, lr=1e-2, b2=0.99, weight_decay=0.1, warmup=0.1,
                clip=1.0, dropout=0.1, sparsity=0.9, refresh_every=50,
                eval_windows=384, eval_batch=128, chunk=50, data_seed=0,
                select_seeds=1, attention_dropout=0.0)
QUICK = dict(d_model=32, num_layers=1, num_heads=2, length=32, batch=8, steps=20,
             eval_windows=32, eval_batch=32, chunk=20, select_seeds=1)


def region(model: str) -> tuple[str, str]:
  """Report markers of a model's table (the GRU's region is on the same page)."""
  if model == "transformer":
    return START, END
  return (f"<!-- language-model-{model}:start -->", f"<!-- language-model-{model}:end -->")


def json_name(model: str) -> str:
  return "language_model.json" if model == "transformer" else f"language_model_{model}.json"


def plot_name(model: str) -> str:
  return "language_model.png" if model == "transformer" else f"language_model_{model}.png"


# ----------------------------------------------------------------- optimizers

def schedule(cfg: dict[str, Any], total):
  """Linear warm-up over ``warmup * steps`` steps, cosine decay to 0 at ``total``.

  ``total`` may be traced, so AdamW with 2× steps runs the same program.
  """
  warm = max(1, int(round(cfg["warmup"] * cfg["steps"])))

  def lr(count):
    count = jnp.asarray(count, jnp.float32)
    ramp = jnp.minimum(1.0, (count + 1.0) / warm)
    frac = jnp.clip((count - warm) / jnp.maximum(total - warm, 1.0), 0.0, 1.0)
    return cfg["lr"] * ramp * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

  return lr


def decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_tx(method: str, cfg: dict[str, Any], rho, total):
  base = optax.chain(
      optax.clip_by_global_norm(cfg["clip"]),
      optax.adamw(schedule(cfg, total), b1=0.9, b2=cfg["b2"],
                  weight_decay=cfg["weight_decay"], mask=decay_mask))
  if method in ("adamw", "adamw2x"):
    return base
  if method == "sam":
    return optax.chain(sam_optax.sam(rho), base)
  if method == "fsam":
    return optax.chain(sam_optax.fisher_masked_sam(
        rho, sparsity=cfg["sparsity"], refresh_every=cfg["refresh_every"]), base)
  raise ValueError(f"unknown method {method!r}")


# ------------------------------------------------------------------- training

class Trainer:
  """One compiled chunk of ``cfg['chunk']`` steps per method, reused by every run.

  A run is ``(seed, rho, total steps)``; the training data (tokens and
  window starts, padded to the full training split) are arguments, so the
  three fractions share the program. ``ascent_batch``: take the clean
  gradient (SAM's ascent) on the first ``ascent_batch`` windows of each
  batch only, the closure on all of them (Bahri et al.'s cheap ascent);
  ``None`` for the whole batch.
  """

  def __init__(self, model: sm.LanguageModel, cfg: dict[str, Any], method: str,
               kind: str | None = None, ascent_batch: int | None = None):
    self.model, self.cfg, self.method = model, cfg, method
    if kind is None:
      kind = "adamw" if method == "adamw2x" else method
    T, B = cfg["length"], cfg["batch"]

    def init(seed, rho, total):
      k_init = jax.random.split(jax.random.key(seed), 3)[0]
      params = model.init(k_init)
      return params, make_tx(kind, cfg, rho, total).init(params)

    def chunk(state, seed, rho, total, start, tokens, starts, num_starts):
      _, k_data, k_drop = jax.random.split(jax.random.key(seed), 3)
      tx = make_tx(kind, cfg, rho, total)

      def body(carry, t):
        params, opt_state = carry
        x, y = text.random_windows(jax.random.fold_in(k_data, t), tokens, starts,
                                   num_starts, B, T)
        k_t = jax.random.fold_in(k_drop, t)
        loss_fn = sm.loss_closure(model, x, y, k_t)
        if ascent_batch is None:
          loss, grads = jax.value_and_grad(loss_fn)(params)
        else:  # the step's dropout key (masks of the sub-batch's shape)
          sub = sm.loss_closure(model, x[:ascent_batch], y[:ascent_batch], k_t)
          loss, grads = jax.value_and_grad(sub)(params)
        updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
        return (optax.apply_updates(params, updates), opt_state), loss

      return jax.lax.scan(body, state, start + jnp.arange(cfg["chunk"]))

    self._init = jax.jit(init)
    self._chunk_jit = jax.jit(chunk, donate_argnums=0)
    self._chunk = None
    self.compile_s = 0.0
    self.last_cpu_s = 0.0

  def run(self, seed: int, rho: float, steps: int, data) -> tuple[Any, np.ndarray, float]:
    """Trains one run; returns its parameters, its batch losses and seconds.

    The seconds exclude compilation (done on the first call, in ``compile_s``).
    """
    tokens, starts, num_starts = data
    total = jnp.asarray(steps, jnp.float32)
    rho_a = jnp.asarray(rho, jnp.float32)
    seed_a = jnp.asarray(seed, jnp.uint32)
    state = self._init(seed_a, rho_a, total)
    args = (seed_a, rho_a, total, jnp.asarray(0, jnp.int32), tokens, starts, num_starts)
    if self._chunk is None:  # compiled once, outside the timed part
      t0 = time.perf_counter()
      self._chunk = self._chunk_jit.lower(state, *args).compile()
      self.compile_s = time.perf_counter() - t0
    losses = []
    t0, c0 = time.perf_counter(), time.process_time()
    for first in range(0, steps, self.cfg["chunk"]):
      state, loss = self._chunk(state, seed_a, rho_a, total,
                                jnp.asarray(first, jnp.int32), tokens, starts, num_starts)
      losses.append(loss)
    losses = np.concatenate([np.asarray(l) for l in jax.device_get(losses)])
    self.last_cpu_s = time.process_time() - c0
    return state[0], losses, time.perf_counter() - t0


def make_evaluator(model: sm.LanguageModel, eval_batch: int):
  """``(params, windows) -> mean per-token loss`` over all windows, batched."""

  def evaluate(params, x, y, mask):
    n = x.shape[0] // eval_batch
    xs, ys, ms = (a.reshape(n, eval_batch, -1) for a in (x, y, mask))

    def one(args):
      xb, yb, mb = args
      losses = optax.softmax_cross_entropy_with_integer_labels(
          model.apply(params, xb).astype(jnp.float32), yb)
      return jnp.sum(losses * mb), jnp.sum(mb)

    total, count = jax.lax.map(one, (xs, ys, ms))
    return jnp.sum(total) / jnp.sum(count)

  return jax.jit(evaluate)


def eval_set(split: text.TokenSplit, length: int, max_windows: int,
             eval_batch: int) -> text.EvalWindows:
  """Evenly spaced windows of the split, a multiple of ``eval_batch`` of them."""
  w = text.eval_windows(split, length)
  n = min(len(w.x), max_windows)
  n = max(eval_batch, n - n % eval_batch)
  idx = np.linspace(0, len(w.x) - 1, n).round().astype(int)
  return text.EvalWindows(w.x[idx], w.y[idx], w.mask[idx])


def train_data(split: text.TokenSplit, fraction: float, length: int, seed: int,
               pad_tokens: int, pad_starts: int):
  sub = text.subset(split, fraction, seed)
  starts = text.window_starts(sub, length)
  tokens = np.full(pad_tokens, text.PAD, np.int32)
  tokens[:sub.num_tokens] = sub.tokens
  padded = np.zeros(pad_starts, np.int32)
  padded[:len(starts)] = starts
  return sub, (jnp.asarray(tokens), jnp.asarray(padded),
               jnp.asarray(len(starts), jnp.int32))


# ------------------------------------------------------------------------ run

def run_all(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
  corpus = text.load_corpus()
  print(corpus.summary(), flush=True)
  model = sm.language_model(args.model, corpus.vocab.size, length=cfg["length"],
                            d_model=cfg["d_model"], num_layers=cfg["num_layers"],
                            num_heads=cfg["num_heads"], dropout=cfg["dropout"],
                            attention_dropout=cfg["attention_dropout"])
  n_params = sm.num_params(model.init(jax.random.key(0)))
  T = cfg["length"]
  full = corpus.splits["train"]
  pad_starts = len(text.window_starts(full, T))
  windows = {s: eval_set(corpus.splits[s], T, cfg["eval_windows"], cfg["eval_batch"])
             for s in ("val", "test")}
  windows = {s: tuple(jnp.asarray(a) for a in w) for s, w in windows.items()}
  evaluate = make_evaluator(model, cfg["eval_batch"])
  kinds = {m: Trainer(model, cfg, m) for m in ("adamw", "sam", "fsam")}
  trainers = {**kinds, "adamw2x": kinds["adamw"]}  # one program, schedule over 2x
  seeds, rhos = cfg["seeds"], list(cfg["rhos"])
  fractions: dict[str, Any] = {}
  for fraction in cfg["fractions"]:
    sub, data = train_data(full, fraction, T, cfg["data_seed"], full.num_tokens, pad_starts)
    entry: dict[str, Any] = {"fraction": fraction, "train_chars": sub.num_tokens,
                             "train_blocks": sub.num_blocks,
                             "tokens_seen": cfg["steps"] * cfg["batch"] * T,
                             "methods": {}}

    runs: dict[tuple[str, float, int], dict[str, Any]] = {}

    def train(method: str, rho: float, seed: int) -> dict[str, Any]:
      key = (method, float(rho), int(seed))
      if key not in runs:
        steps = cfg["steps"] * STEP_FACTOR[method]
        params, losses, sec = trainers[method].run(seed, rho, steps, data)
        runs[key] = {"val": float(evaluate(params, *windows["val"])),
                     "test": float(evaluate(params, *windows["test"])),
                     "last": float(np.mean(losses[-max(1, steps // 10):])),
                     "curve": losses[::max(1, steps // 100)], "s": sec,
                     "cpu_s": trainers[method].last_cpu_s}
      return runs[key]

    select = seeds[:cfg["select_seeds"]]
    chosen_rho = None
    for method in METHODS:
      if method == "sam":  # ρ by mean validation loss over the selection seeds
        grid = rhos
        val_grid = [[train(method, r, sd)["val"] for sd in select] for r in grid]
        rho = grid[int(np.argmin(np.mean(val_grid, axis=1)))]
        chosen_rho = rho
      elif method == "fsam":
        grid, val_grid, rho = None, None, chosen_rho
      else:
        grid, val_grid, rho = None, None, 0.0
      res = [train(method, rho, sd) for sd in seeds]
      pick = lambda k: np.asarray([r[k] for r in res])  # noqa: E731
      entry["methods"][method] = {
          "rho": None if method.startswith("adamw") else rho,
          "rho_grid": grid, "val_loss_grid": val_grid,
          "val_loss": stats.summary(pick("val")),
          "test_loss": stats.summary(pick("test")),
          "test_ppl": stats.summary(np.exp(pick("test"))),
          "train_batch_loss_end": stats.summary(pick("last")),
          "steps": cfg["steps"] * STEP_FACTOR[method],
          "passes_per_step": PASSES[method],
          "run_s": float(pick("s").mean()),
          "run_cpu_s": float(pick("cpu_s").mean()),
          "curve": np.mean([r["curve"] for r in res], axis=0).tolist(),
      }
      m = entry["methods"][method]
      print(f"{fraction:>5.0%} {LABELS[method]:<24} ρ={m['rho']}  test"
            f" {m['test_loss']['mean']:.4f} ± {m['test_loss']['std']:.4f}"
            f"  val {m['val_loss']['mean']:.4f}  train-end"
            f" {m['train_batch_loss_end']['mean']:.4f}  {m['run_s']:.1f} s/run"
            f" ({m['run_cpu_s']:.1f} s CPU)",
            flush=True)
    entry["runs"] = len(runs)
    entry["paired"] = paired(entry["methods"])
    fractions[f"{fraction:g}"] = entry
  return {"fractions": fractions, "n_params": n_params,
          "compile_s": {m: t.compile_s for m, t in kinds.items()},
          "model_description": model.description, "vocab_size": corpus.vocab.size,
          "corpus": corpus.summary()}


def verdict(d: dict[str, Any]) -> str:
  """``win`` / ``loss`` / ``tie`` from the 95% t-interval of a paired loss difference.

  The difference is ``method − reference`` in test loss, so below zero is
  better for the method (:func:`benchmarks.common.stats.verdict`).
  """
  return stats.verdict(d, higher_is_better=False)


def paired(methods: dict[str, Any]) -> dict[str, Any]:
  """Every method against AdamW and against AdamW with 2× steps (test loss)."""
  out = {}
  for ref in ("adamw", "adamw2x"):
    for m in METHODS:
      if m == ref or (ref == "adamw2x" and m == "adamw"):
        continue
      d = stats.paired(methods[m]["test_loss"]["per_seed"],
                       methods[ref]["test_loss"]["per_seed"])
      # stats.paired counts a > b as a win; lower loss is better here.
      d["wins"] = int(np.sum(np.asarray(d["per_seed"]) < 0))
      d["verdict"] = verdict(d)
      out[f"{m}-{ref}"] = d
  return out


# --------------------------------------------------------------------- report

def _selection_text(s: dict[str, Any]) -> str:
  k = min(s["select_seeds"], len(s["seeds"]))
  if k == 1:
    return f"the validation loss of seed {s['seeds'][0]}"
  return f"the mean validation loss of seeds {s['seeds'][0]}–{s['seeds'][k - 1]}"


def _load_text(result: dict[str, Any]) -> str:
  load = result.get("load_average") or {}
  if load.get("start") is None:
    return ""
  return (f", machine shared: load average {load['start']:.1f} at the start,"
          f" {load['end']:.1f} at the end")


def _pair_cell(d: dict[str, Any] | None) -> str:
  if d is None:
    return "–"
  return (f"{d['mean']:+.4f} ± {d['std']:.4f} ({d['wins']}/{d['n']}),"
          f" **{d['verdict']}**")


def report(result: dict[str, Any]) -> str:
  s = result["settings"]
  header = ["train data", "optimizer", "ρ", "steps × passes", "train loss (end)",
            "val loss", "test loss", "test ppl", "Δ test vs AdamW (wins)",
            "Δ test vs AdamW 2× (wins)", "s/run"]
  rows = []
  for entry in result["fractions"].values():
    chars = f"{entry['fraction']:.0%} ({entry['train_chars'] / 1000:.0f}k chars)"
    for m in METHODS:
      e = entry["methods"][m]
      rows.append([
          chars, LABELS[m], "–" if e["rho"] is None else f"{e['rho']:g}",
          f"{e['steps']} × {e['passes_per_step']}",
          f"{e['train_batch_loss_end']['mean']:.3f}",
          f"{e['val_loss']['mean']:.3f}",
          f"{e['test_loss']['mean']:.3f} ± {e['test_loss']['std']:.3f}",
          f"{e['test_ppl']['mean']:.2f} ± {e['test_ppl']['std']:.2f}",
          _pair_cell(entry["paired"].get(f"{m}-adamw")),
          _pair_cell(entry["paired"].get(f"{m}-adamw2x")),
          f"{e['run_s']:.0f}"])
  cmd = "python benchmarks/language_model.py" + (
      "" if s["model"] == "transformer" else f" --model {s['model']}") + " --report docs/benchmarks/language_model.md"
  lines = [
      f"Measured by `benchmarks/language_model.py` ({result['model_description']},"
      f" {result['n_params']:,} parameters; {result['corpus']}; windows of"
      f" {s['length']} characters, batch {s['batch']}; {s['steps']} steps for"
      f" every optimizer but AdamW 2×; {len(s['seeds'])} paired seeds;"
      f" {result['environment']['cpu_count']} CPU cores, jax"
      f" {result['environment']['jax']}; {result['environment']['date']};"
      f" {result['wall_s'] / 60:.1f} min wall clock, {result.get('cpu_s', 0) / 60:.1f} min"
      f" process CPU time{_load_text(result)}). Losses in nats per character"
      f" (mean ± std over seeds); *train loss (end)*: mean mini-batch loss of the"
      f" last 10% of steps, dropout on; SAM's ρ selected per fraction from"
      f" {list(s['rhos'])} by {_selection_text(s)} (the other seeds run the"
      f" selected ρ only), Fisher-mask SAM"
      f" (sparsity {s['sparsity']:g}, mask refreshed every {s['refresh_every']}"
      f" steps) at SAM's ρ. Δ: paired per-seed difference of test loss"
      f" (negative: lower loss than the reference; in brackets the seeds where it"
      f" is lower); **win**/**loss**: the 95% t-interval of the difference lies"
      f" below/above 0, **tie** otherwise. *s/run*: training seconds per run on a"
      f" shared machine. Reproduce with `{cmd}`.", "",
      stats.markdown_table(header, rows), ""]
  lines.append("Where SAM wins, loses or ties (test loss; verdicts as above):")
  lines.append("")
  for entry in result["fractions"].values():
    cells = []
    for m in ("sam", "fsam"):
      p = entry["paired"]
      cells.append(f"{LABELS[m]} {p[f'{m}-adamw']['verdict']} against AdamW"
                   f" ({p[f'{m}-adamw']['wins']}/{p[f'{m}-adamw']['n']} seeds lower),"
                   f" {p[f'{m}-adamw2x']['verdict']} against AdamW 2×"
                   f" ({p[f'{m}-adamw2x']['wins']}/{p[f'{m}-adamw2x']['n']})")
    p2 = entry["paired"]["adamw2x-adamw"]
    cells.append(f"AdamW 2× {p2['verdict']} against AdamW")
    lines.append(f"* {entry['fraction']:.0%} of the training split: " + "; ".join(cells) + ".")
  lines.append("")
  lines.append(f"![language-model test loss](benchmarks/results/{plot_name(s['model'])})")
  return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fr = result["fractions"]
  x = [e["fraction"] for e in fr.values()]
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
  for m in METHODS:
    mean = [e["methods"][m]["test_loss"]["mean"] for e in fr.values()]
    std = [e["methods"][m]["test_loss"]["std"] for e in fr.values()]
    axes[0].errorbar(x, mean, yerr=std, marker="o", capsize=3, label=LABELS[m])
  axes[0].set_xscale("log")
  axes[0].set_xticks(x, [f"{v:.0%}" for v in x])
  axes[0].minorticks_off()
  axes[0].set_xlabel("fraction of the training split")
  axes[0].set_ylabel("test loss (nats/char)")
  axes[0].legend(fontsize=8)
  width = 0.25
  for k, m in enumerate(("sam", "fsam", "adamw2x")):
    for i, e in enumerate(fr.values()):
      d = e["paired"][f"{m}-adamw"]
      xs = np.full(len(d["per_seed"]), i + (k - 1) * width)
      axes[1].scatter(xs, d["per_seed"], s=12, color=f"C{METHODS.index(m)}",
                      label=LABELS[m] if i == 0 else None)
      axes[1].errorbar(i + (k - 1) * width, d["mean"], yerr=d["std"], fmt="_",
                       color="k", capsize=3)
  axes[1].axhline(0, color="gray", lw=0.8)
  axes[1].set_xticks(range(len(fr)), [f"{v:.0%}" for v in x])
  axes[1].set_xlabel("fraction of the training split")
  axes[1].set_ylabel("test loss − AdamW's (per seed)")
  axes[1].legend(fontsize=8)
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------- main

def _load() -> float | None:
  try:
    import os  # pylint: disable=import-outside-toplevel
    return float(os.getloadavg()[0])
  except OSError:
    return None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", choices=("transformer", "gru"), default="transformer")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
  parser.add_argument("--rhos", type=float, nargs="+", default=list(RHOS))
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
  parser.add_argument("--report", "--readme", dest="readme", type=Path, default=None)
  parser.add_argument("--report-only", action="store_true",
                      help="rewrite the report region and the plot from the JSON")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: a tiny model, 20 steps, 2 seeds, one ρ")
  args = parser.parse_args(argv)
  path = args.out / json_name(args.model)
  if args.report_only:
    result = json.loads(path.read_text())
  else:
    cfg = dict(DEFAULTS)
    if args.quick:
      cfg.update(QUICK)
      args.seeds, args.rhos = 2, [0.05]
    if args.steps is not None:
      cfg["steps"] = args.steps
    cfg["chunk"] = math.gcd(cfg["chunk"], cfg["steps"])
    cfg.update(model=args.model, seeds=list(range(args.seeds)),
               fractions=list(args.fractions), rhos=list(args.rhos),
               quick=bool(args.quick))
    t0, c0, load0 = time.perf_counter(), time.process_time(), _load()
    result = {
        "settings": cfg,
        "environment": {**gen.environment(), "date": time.strftime("%Y-%m-%d")},
        "command": "python benchmarks/language_model.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        **run_all(args, cfg),
    }
    result["wall_s"] = time.perf_counter() - t0
    result["cpu_s"] = time.process_time() - c0
    result["load_average"] = {"start": load0, "end": _load()}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
  plot(result, args.out / plot_name(result["settings"]["model"]))
  if args.readme is not None:
    readme_lib.replace_region(args.readme, *region(result["settings"]["model"]),
                              report(result))
  print(report(result))
  return result


if __name__ == "__main__":
  main()
