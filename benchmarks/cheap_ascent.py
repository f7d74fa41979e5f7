"""Cheap ascent: SAM's ascent gradient on a quarter of the batch, cost and benefit.

Bahri, Mobahi and Tay (ACL 2022) take SAM's ascent gradient on a quarter of
the batch and the descent gradient on all of it, for about 1.25 times the
cost of a plain step instead of 2. With sam_optax this needs no option: the
clean gradient handed to ``update`` is the sub-batch's, the closure the whole
batch's (the user guide, "Cheap ascent"). This benchmark measures what it costs and
what it buys, beside full SAM, on the language model of
``benchmarks/language_model.py`` (same data, model, base optimizer, steps and
pairing; see that module's docstring):

* **AdamW**; **AdamW, 1.25× steps** (the cheap ascent's compute spent on
  plain steps); **SAM + AdamW** (ascent on the whole batch);
  **SAM + AdamW, ¼-batch ascent** (ascent on the first quarter of the
  windows of each batch, descent on all), both at one ρ (``--rho``, 0.05 by
  default: the value the language-model benchmark selected for SAM at 5%
  and 100% of the data);
* on ``FRACTIONS`` of the training split, ``--seeds`` paired seeds;
* cost: XLA's FLOPs of one compiled training step (deterministic) relative
  to AdamW's, and seconds per run measured side by side (the methods of a
  seed run one after the other, so the machine's load hits them alike).

The training loss of the ¼-batch method's curve is the sub-batch's (the
closure's full-batch loss at the perturbed point is not the clean loss).

``python benchmarks/cheap_ascent.py --report docs/benchmarks/cheap_ascent.md`` writes
``<out>/cheap_ascent.json`` and the report region ``cheap-ascent``;
``--report-only`` rewrites the region from the JSON; ``--quick`` is a smoke
test.
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

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from benchmarks import generalization as gen  # noqa: E402
from benchmarks import language_model as lm  # noqa: E402
from benchmarks.common import measure, stats, text  # noqa: E402
from benchmarks.common import readme as readme_lib  # noqa: E402
from benchmarks.common import sequence_models as sm  # noqa: E402

START = "<!-- cheap-ascent:start -->"
END = "<!-- cheap-ascent:end -->"
JSON_NAME = "cheap_ascent.json"
FRACTIONS = (0.05, 1.0)
METHODS = ("adamw", "adamw125", "sam", "sam_quarter")
LABELS = {"adamw": "AdamW", "adamw125": "AdamW, 1.25× steps",
          "sam": "SAM + AdamW", "sam_quarter": "SAM + AdamW, ¼-batch ascent"}
KIND = {"adamw": "adamw", "adamw125": "adamw", "sam": "sam", "sam_quarter": "sam"}
STEPS = {"adamw": 1.0, "adamw125": 1.25, "sam": 1.0, "sam_quarter": 1.0}
# (method, reference) pairs of the report: test loss, method minus reference.
PAIRS = (("sam", "adamw"), ("sam_quarter", "adamw"), ("sam_quarter", "sam"),
         ("sam_quarter", "adamw125"))


def ascent_batch(method: str, cfg: dict[str, Any]) -> int | None:
  return max(1, cfg["batch"] // 4) if method == "sam_quarter" else None


def trainer(model, cfg, method: str) -> lm.Trainer:
  return lm.Trainer(model, cfg, method, kind=KIND[method],
                    ascent_batch=ascent_batch(method, cfg))


def step_flops(model, cfg: dict[str, Any], method: str, data, rho: float) -> float:
  """XLA's FLOPs of one training step (a chunk of one step) of ``method``."""
  one = trainer(model, {**cfg, "chunk": 1}, method)
  tokens, starts, num_starts = data
  seed = jnp.asarray(0, jnp.uint32)
  rho_a, total = jnp.asarray(rho, jnp.float32), jnp.asarray(10.0, jnp.float32)
  state = one._init(seed, rho_a, total)  # pylint: disable=protected-access
  compiled = one._chunk_jit.lower(  # pylint: disable=protected-access
      state, seed, rho_a, total, jnp.asarray(0, jnp.int32), tokens, starts,
      num_starts).compile()
  return float(measure.flops_of(compiled))


def run_all(cfg: dict[str, Any]) -> dict[str, Any]:
  corpus = text.load_corpus()
  model = sm.language_model("transformer", corpus.vocab.size, length=cfg["length"],
                            d_model=cfg["d_model"], num_layers=cfg["num_layers"],
                            num_heads=cfg["num_heads"], dropout=cfg["dropout"],
                            attention_dropout=cfg["attention_dropout"])
  T = cfg["length"]
  full = corpus.splits["train"]
  pad_starts = len(text.window_starts(full, T))
  windows = {s: tuple(jnp.asarray(a) for a in
                      lm.eval_set(corpus.splits[s], T, cfg["eval_windows"],
                                  cfg["eval_batch"]))
             for s in ("val", "test")}
  evaluate = lm.make_evaluator(model, cfg["eval_batch"])
  trainers = {m: trainer(model, cfg, m) for m in METHODS}
  fractions: dict[str, Any] = {}
  flops = None
  for fraction in cfg["fractions"]:
    sub, data = lm.train_data(full, fraction, T, cfg["data_seed"], full.num_tokens,
                              pad_starts)
    if flops is None:
      flops = {m: step_flops(model, cfg, m, data, cfg["rho"]) for m in METHODS}
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for seed in cfg["seeds"]:  # the methods of a seed side by side
      for m in METHODS:
        steps = int(round(cfg["steps"] * STEPS[m]))
        rho = cfg["rho"] if KIND[m] == "sam" else 0.0
        params, losses, sec = trainers[m].run(seed, rho, steps, data)
        runs[m].append({"test": float(evaluate(params, *windows["test"])),
                        "val": float(evaluate(params, *windows["val"])),
                        "last": float(np.mean(losses[-max(1, steps // 10):])),
                        "s": sec, "steps": steps})
    methods = {}
    for m, rs in runs.items():
      pick = lambda k, rs=rs: np.asarray([r[k] for r in rs])  # noqa: E731
      methods[m] = {"test_loss": stats.summary(pick("test")),
                    "val_loss": stats.summary(pick("val")),
                    "train_batch_loss_end": stats.summary(pick("last")),
                    "steps": rs[0]["steps"],
                    "s_per_step": float(np.mean(pick("s") / pick("steps"))),
                    "run_s": float(np.mean(pick("s")))}
    paired = {}
    for m, ref in PAIRS:
      d = stats.paired(methods[m]["test_loss"]["per_seed"],
                       methods[ref]["test_loss"]["per_seed"])
      d["wins"] = int(np.sum(np.asarray(d["per_seed"]) < 0))  # lower loss wins
      d["half_width"] = stats.t_half_width(d)
      d["verdict"] = stats.verdict(d, higher_is_better=False)
      paired[f"{m}-{ref}"] = d
    fractions[f"{fraction:g}"] = {"fraction": fraction, "train_chars": sub.num_tokens,
                                  "methods": methods, "paired": paired}
  return {"fractions": fractions, "flops_per_step": flops,
          "flops_ratio": {m: flops[m] / flops["adamw"] for m in METHODS},
          "n_params": sm.num_params(model.init(jax.random.key(0))),
          "model_description": model.description, "corpus": corpus.summary()}


def _cell(d: dict[str, Any]) -> str:
  return (f"{d['mean']:+.4f} ± {d['half_width']:.4f} ({d['wins']}/{d['n']}),"
          f" **{d['verdict']}**")


def report(result: dict[str, Any]) -> str:
  s = result["settings"]
  env = result["environment"]
  flops = result["flops_ratio"]
  header = ["train data", "optimizer", "steps", "FLOPs/step × AdamW",
            "s/step × AdamW (measured)", "test loss", "Δ vs AdamW", "Δ vs SAM",
            "Δ vs AdamW 1.25×"]
  rows = []
  for e in result["fractions"].values():
    base_s = e["methods"]["adamw"]["s_per_step"]
    for m in METHODS:
      me = e["methods"][m]
      cells = [f"{e['fraction']:.0%}", LABELS[m], str(me["steps"]),
               f"{flops[m]:.2f}", f"{me['s_per_step'] / base_s:.2f}",
               f"{me['test_loss']['mean']:.4f} ± {me['test_loss']['std']:.4f}"]
      for ref in ("adamw", "sam", "adamw125"):
        d = e["paired"].get(f"{m}-{ref}")
        cells.append("–" if d is None else _cell(d))
      rows.append(cells)
  lines = [
      f"Measured by `benchmarks/cheap_ascent.py` ({result['model_description']},"
      f" {result['n_params']:,} parameters; {result['corpus']}; batch"
      f" {s['batch']} windows of {s['length']} characters, the ¼-batch ascent on"
      f" the first {s['batch'] // 4}; {s['steps']} steps; ρ = {s['rho']:g};"
      f" {len(s['seeds'])} paired seeds; {env['cpu_count']} CPU cores, jax"
      f" {env['jax']}; {result['wall_s'] / 60:.1f} min). Test loss in nats per"
      " character (mean ± std); Δ: paired per-seed difference of test loss"
      " ± the half-width of its 95% t-interval (seeds with a lower loss);"
      " **win**/**loss**: the interval lies below/above 0, **tie** otherwise."
      " FLOPs from XLA's cost analysis of one compiled step; seconds measured"
      " with the methods of a seed run one after another on a shared machine."
      " Reproduce with `python benchmarks/cheap_ascent.py --report docs/benchmarks/cheap_ascent.md`.",
      "", stats.markdown_table(header, rows), ""]
  verb = {"win": "wins", "loss": "loses", "tie": "ties"}
  for e in result["fractions"].values():
    p = {k: verb[d["verdict"]] for k, d in e["paired"].items()}
    lines.append(
        f"* {e['fraction']:.0%} of the training split: the ¼-batch ascent"
        f" {p['sam_quarter-adamw']} against AdamW, {p['sam_quarter-sam']}"
        f" against full SAM and {p['sam_quarter-adamw125']} against AdamW with"
        f" its compute (1.25× steps); full SAM {p['sam-adamw']} against AdamW.")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
  parser.add_argument("--report", "--readme", dest="readme", type=Path, default=None)
  parser.add_argument("--report-only", action="store_true")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: a tiny model, 20 steps, 2 seeds, 5%%")
  args = parser.parse_args(argv)
  path = args.out / JSON_NAME
  if args.report_only:
    result = json.loads(path.read_text())
  else:
    cfg = dict(lm.DEFAULTS)
    if args.quick:
      cfg.update(lm.QUICK)
      args.seeds, args.fractions = 2, [0.05]
    cfg["chunk"] = math.gcd(cfg["chunk"], cfg["steps"],
                            int(round(cfg["steps"] * STEPS["adamw125"])))
    cfg.update(seeds=list(range(args.seeds)), fractions=list(args.fractions),
               rho=args.rho, quick=bool(args.quick))
    t0 = time.perf_counter()
    result = {"settings": cfg,
              "environment": {**gen.environment(), "date": time.strftime("%Y-%m-%d")},
              **run_all(cfg)}
    result["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
  if args.readme is not None:
    readme_lib.replace_region(args.readme, START, END, report(result))
  print(report(result))
  return result


if __name__ == "__main__":
  main()
