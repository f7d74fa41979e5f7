"""Wall-clock of one jitted step: SAM vs SAMPa sequential vs SAMPa vmap-parallel.

A small MLP on CPU, one full training step each (gradients, transform,
``sgd(momentum)``, parameter update), timed side by side with interleaved
repeats (``benchmarks.common.measure.time_interleaved``), plus XLA's FLOP
count of each compiled step. SAM takes the clean gradient and the perturbed
one, in sequence; SAMPa takes its two gradients, which do not depend on each
other, from the closure (the clean gradient it is handed is zeros, as its
docstring recommends), either one after the other or in one ``jax.vmap``
over the two points (``parallel=True``).

``python benchmarks/sampa_parallel.py [--quick] [--out DIR]`` writes
``DIR/sampa_parallel.json`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import sam_optax  # noqa: E402
from benchmarks.common import measure, models  # noqa: E402

FULL = dict(sizes=(64, 256, 256, 10), batch=256, reps=200)
QUICK = dict(sizes=(16, 32, 10), batch=32, reps=10)
NAMES = ("sam", "sampa_sequential", "sampa_parallel")


def _steps(model, x, y) -> dict[str, Any]:
  def loss(p):
    return models.cross_entropy(model.apply(p, x), y)

  base = lambda: optax.sgd(0.05, momentum=0.9)  # noqa: E731
  txs = {
      "sam": optax.chain(sam_optax.sam(0.05), base()),
      "sampa_sequential": optax.chain(sam_optax.sampa(0.05, 0.05), base()),
      "sampa_parallel": optax.chain(sam_optax.sampa(0.05, 0.05, parallel=True), base()),
  }

  def make(name, tx):
    def step(params, state):
      if name == "sam":
        g = jax.grad(loss)(params)
      else:  # SAMPa does not use the clean gradient
        g = jax.tree.map(jnp.zeros_like, params)
      updates, state = tx.update(g, state, params, loss_fn=loss)
      return optax.apply_updates(params, updates), state

    return step

  return {k: (make(k, tx), tx) for k, tx in txs.items()}


def run(quick: bool) -> dict[str, Any]:
  cfg = QUICK if quick else FULL
  model = models.mlp(cfg["sizes"])
  params = model.init(jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(cfg["batch"], cfg["sizes"][0]), jnp.float32)
  y = jnp.asarray(rng.randint(0, cfg["sizes"][-1], cfg["batch"]))
  flops, fns = {}, {}
  for name, (step, tx) in _steps(model, x, y).items():
    state = tx.init(params)
    compiled, flops[name] = measure.compile_with_flops(step, params, state)
    fns[name] = lambda c=compiled, s=state: c(params, s)
  times = measure.time_interleaved(fns, reps=cfg["reps"], warmup=3 if quick else 10)
  median = {k: float(np.median(v)) for k, v in times.items()}
  return {
      "config": {
          "quick": quick, "mlp_sizes": list(cfg["sizes"]), "batch": cfg["batch"],
          "reps": cfg["reps"], "backend": jax.default_backend(),
          "cpu_count": os.cpu_count(), "machine": platform.machine(),
          "jax": jax.__version__,
      },
      "flops": flops,
      "flops_ratio_to_sam": {k: flops[k] / flops["sam"] for k in NAMES},
      "median_seconds": median,
      "time_ratio_to_sam": {k: median[k] / median["sam"] for k in NAMES},
      "parallel_speedup_over_sequential": (
          median["sampa_sequential"] / median["sampa_parallel"]
      ),
  }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny model, few repeats")
  parser.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results")
  args = parser.parse_args(argv)
  result = run(args.quick)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "sampa_parallel.json").write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps({k: result[k] for k in ("flops_ratio_to_sam", "time_ratio_to_sam",
                                           "parallel_speedup_over_sequential")}, indent=2))
  return result


if __name__ == "__main__":
  main()
