"""Domain generalization, DomainBed style: ERM, SAM and DGSAM on rotated digits.

Data: scikit-learn's bundled digits (8 x 8), split at random into five equal
parts, part ``k`` rotated by ``ANGLES[k]`` degrees: five domains of the same
task, as in DomainBed's Rotated MNIST. Leave one domain out: train on the
other four, select on their held-out 20% (training-domain validation), test
on every image of the unseen domain; each domain is held out in turn.

Training: an MLP 64-128-128-10, SGD with momentum 0.9, a cosine learning
rate, ``--steps`` steps, each step a batch of ``--batch`` images from every
training domain (the same batches for every optimizer and seed). ERM
descends the pooled loss (the mean of the domains' losses); SAM perturbs
along the pooled gradient; DGSAM (``sam_optax.dgsam``) takes ``S + 1``
single-domain gradients. SAM's and DGSAM's ρ are selected on validation
from the same grid, per held-out domain, by the mean over the seeds.

Reported: test accuracy on each unseen domain (mean ± std over the seeds),
the mean and the worst over the unseen domains, their spread, the paired
per-seed differences of the domain-averaged accuracy, and each method's
cost: single-domain gradient evaluations per step and XLA's FLOPs per step.

``python benchmarks/domain_generalization.py`` writes
``<out>/domain_generalization.json``; ``--report docs/benchmarks/domain_generalization.md`` regenerates the
the page's region; ``--report-only`` rewrites it from the JSON; ``--quick`` is
a smoke test.
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

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from benchmarks import generalization as gen  # noqa: E402
from benchmarks.common import measure, models, stats  # noqa: E402
from benchmarks.common import readme as readme_lib  # noqa: E402

START = "<!-- domain-generalization:start -->"
END = "<!-- domain-generalization:end -->"
JSON_NAME = "domain_generalization.json"
ANGLES = (0, 20, 40, 60, 80)
RHOS = (0.02, 0.05, 0.1, 0.2)
LR, WD, MOMENTUM = 0.05, 5e-4, 0.9
METHODS = ("erm", "sam", "dgsam")
LABELS = {"erm": "ERM", "sam": "SAM", "dgsam": "DGSAM"}


def domains(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
  """Five rotated domains of digits: ``(x (n, 64) in [0, 1], y (n,))`` each."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  digits = load_digits()
  images, labels = digits.images / 16.0, digits.target
  order = np.random.default_rng(seed).permutation(len(labels))
  parts = np.array_split(order, len(ANGLES))
  out = []
  for angle, idx in zip(ANGLES, parts):
    rotated = np.stack([ndimage.rotate(im, angle, reshape=False, order=1)
                        for im in images[idx]])
    out.append((rotated.reshape(len(idx), -1).astype(np.float32),
                labels[idx].astype(np.int32)))
  return out


def split(data, held_out: int, n_per_domain: int):
  """Training domains (train/val, equal sizes) and the unseen test domain."""
  train_x, train_y, val_x, val_y = [], [], [], []
  for d, (x, y) in enumerate(data):
    if d == held_out:
      continue
    n_val = len(y) // 5
    train_x.append(x[n_val:][:n_per_domain])
    train_y.append(y[n_val:][:n_per_domain])
    val_x.append(x[:n_val])
    val_y.append(y[:n_val])
  n_val = min(len(v) for v in val_y)
  return (np.stack(train_x), np.stack(train_y),
          np.stack([v[:n_val] for v in val_x]), np.stack([v[:n_val] for v in val_y]),
          data[held_out][0], data[held_out][1])


def make_tx(method: str, rho: float, steps: int, num_domains: int):
  base = optax.chain(optax.add_decayed_weights(WD),
                     optax.sgd(optax.cosine_decay_schedule(LR, steps), momentum=MOMENTUM))
  if method == "erm":
    return base
  if method == "sam":
    return optax.chain(sam_optax.sam(rho), base)
  return optax.chain(sam_optax.dgsam(rho, num_domains=num_domains), base)


def make_step(model: models.Model, method: str, tx):
  def domain_loss(p, x, y, d):
    return models.cross_entropy(model.apply(p, x[d]), y[d])

  def step(params, opt_state, x, y):
    num = x.shape[0]
    pooled = lambda p: jnp.mean(jnp.stack(  # noqa: E731
        [domain_loss(p, x, y, d) for d in range(num)]))
    if method == "dgsam":
      grads = jax.tree.map(jnp.zeros_like, params)  # unused: removed by XLA
      closure = {"domain_loss_fn": lambda p, d: domain_loss(p, x, y, d)}
    else:
      grads = jax.grad(pooled)(params)
      closure = {"loss_fn": pooled}
    updates, opt_state = tx.update(grads, opt_state, params, **closure)
    return optax.apply_updates(params, updates), opt_state

  return step


def train(model, method, rhos, seeds, data, *, steps, batch):
  """Every (rho, seed) pair trained in one vmapped program.

  Returns validation and test accuracy, each of shape ``(len(rhos), len(seeds))``.
  """
  x_tr, y_tr, x_va, y_va, x_te, y_te = (jnp.asarray(a) for a in data)
  num, n = x_tr.shape[:2]

  def run(rho, seed):
    tx = make_tx(method, rho, steps, num)
    step = make_step(model, method, tx)
    init_key, data_key = jax.random.split(jax.random.key(seed))
    params = model.init(init_key)

    def body(carry, t):
      params, opt_state = carry
      idx = jax.random.randint(jax.random.fold_in(data_key, t), (num, batch), 0, n)
      xb = jnp.take_along_axis(x_tr, idx[..., None], axis=1)
      yb = jnp.take_along_axis(y_tr, idx, axis=1)
      return step(params, opt_state, xb, yb), None

    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(steps))
    val = jnp.mean(jnp.stack([models.accuracy(model.apply(params, x_va[d]), y_va[d])
                              for d in range(num)]))
    test = models.accuracy(model.apply(params, x_te), y_te)
    return val, test

  r, sd = np.meshgrid(np.asarray(rhos, np.float32), np.asarray(seeds), indexing="ij")
  val, test = jax.jit(jax.vmap(run))(jnp.asarray(r.ravel()), jnp.asarray(sd.ravel()))
  shape = (len(rhos), len(seeds))
  return np.asarray(val).reshape(shape), np.asarray(test).reshape(shape)


def step_cost(model, method, data, batch) -> dict[str, Any]:
  """XLA's FLOPs of one step, and the single-domain gradients it takes."""
  x_tr, y_tr = (jnp.asarray(a[:, :batch]) for a in data[:2])
  num = x_tr.shape[0]
  tx = make_tx(method, 0.05, 100, num)
  params = model.init(jax.random.key(0))
  _, flops = measure.compile_with_flops(make_step(model, method, tx), params,
                                        tx.init(params), x_tr, y_tr)
  passes = {"erm": num, "sam": 2 * num, "dgsam": num + 1}[method]
  return {"flops_per_step": flops, "domain_gradients_per_step": passes}


def run_all(args) -> dict[str, Any]:
  data = domains()
  model = models.mlp((64, 128, 128, 10))
  seeds = list(range(args.seeds))
  held = list(range(len(ANGLES))) if not args.quick else [len(ANGLES) - 1]
  rhos = RHOS if not args.quick else RHOS[1:3]
  per_domain: dict[str, Any] = {}
  for h in held:
    parts = split(data, h, args.per_domain)
    entry = {}
    for method in METHODS:
      grid = [0.0] if method == "erm" else list(rhos)
      val, test = train(model, method, grid, seeds, parts, steps=args.steps,
                        batch=args.batch)
      best = int(np.argmax(val.mean(axis=1)))
      entry[method] = {"rho": None if method == "erm" else grid[best],
                       "rho_grid": None if method == "erm" else grid,
                       "val_acc": val[best].tolist(),
                       "test_acc": stats.summary(test[best])}
    per_domain[str(ANGLES[h])] = entry
    print(f"held out {ANGLES[h]}°: " + ", ".join(
        f"{LABELS[m]} {100 * entry[m]['test_acc']['mean']:.1f}" for m in METHODS),
        flush=True)
  costs = {m: step_cost(model, m, split(data, held[0], args.per_domain), args.batch)
           for m in METHODS}
  erm_flops = costs["erm"]["flops_per_step"]
  for c in costs.values():
    c["flops_ratio"] = (None if erm_flops is None or c["flops_per_step"] is None
                        else c["flops_per_step"] / erm_flops)
  return {"per_domain": per_domain, "costs": costs,
          "summary": summarize(per_domain)}


def summarize(per_domain: dict[str, Any]) -> dict[str, Any]:
  """Per method: mean, worst and spread over unseen domains; paired differences."""
  names = list(per_domain)
  acc = {m: np.asarray([per_domain[d][m]["test_acc"]["per_seed"] for d in names])
         for m in METHODS}  # (domains, seeds)
  out: dict[str, Any] = {}
  for m, a in acc.items():
    by_domain = a.mean(axis=1)
    out[m] = {"mean": float(by_domain.mean()), "worst": float(by_domain.min()),
              "spread": float(by_domain.std(ddof=1)) if len(names) > 1 else 0.0,
              "domain_mean_per_seed": a.mean(axis=0).tolist()}
  for a, b in (("dgsam", "erm"), ("dgsam", "sam"), ("sam", "erm")):
    out[f"{a}-{b}"] = stats.paired(acc[a].mean(axis=0), acc[b].mean(axis=0))
  return out


def report(result: dict[str, Any]) -> str:
  s, per_domain, summ = result["settings"], result["per_domain"], result["summary"]
  names = list(per_domain)
  header = ["method", *[f"{d}° held out" for d in names], "mean", "worst", "spread",
            "grads/step", "FLOPs/step vs ERM"]
  rows = []
  for m in METHODS:
    cost = result["costs"][m]
    ratio = cost["flops_ratio"]
    rows.append([LABELS[m], *[
        stats.pct(per_domain[d][m]["test_acc"]["mean"], per_domain[d][m]["test_acc"]["std"])
        + ("" if per_domain[d][m]["rho"] is None else f" (ρ {per_domain[d][m]['rho']:g})")
        for d in names],
        f"{100 * summ[m]['mean']:.1f}", f"{100 * summ[m]['worst']:.1f}",
        f"{100 * summ[m]['spread']:.1f}", str(cost["domain_gradients_per_step"]),
        "–" if ratio is None else f"{ratio:.2f}×"])
  lines = [
      f"Measured by `benchmarks/domain_generalization.py` (rotated digits,"
      f" {len(ANGLES)} domains, leave one out; MLP 64-128-128-10; {s['steps']}"
      f" steps of {s['batch']} images per training domain; {len(s['seeds'])}"
      f" paired seeds; {result['environment']['date']}; {result['wall_s']:.0f} s)."
      " Test accuracy on the unseen domain, mean ± std over seeds; ρ selected"
      " on the training domains' validation split. *spread*: std of the"
      " per-domain means across unseen domains; *grads/step*: single-domain"
      " gradient evaluations. Reproduce with `python"
      " benchmarks/domain_generalization.py --report docs/benchmarks/domain_generalization.md`.", "",
      stats.markdown_table(header, rows), ""]
  for pair in ("dgsam-erm", "dgsam-sam", "sam-erm"):
    d = summ[pair]
    lines.append(f"* {pair.replace('-', ' − ').upper()}, accuracy averaged over"
                 f" the unseen domains: {100 * d['mean']:+.1f} ± {100 * d['std']:.1f}"
                 f" points ({d['wins']}/{d['n']} seeds)")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--per-domain", type=int, default=280)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
  parser.add_argument("--report", "--readme", dest="readme", type=Path, default=None)
  parser.add_argument("--report-only", action="store_true")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: 20 steps, 2 seeds, one held-out domain, one rho")
  args = parser.parse_args(argv)
  path = args.out / JSON_NAME
  if args.report_only:
    result = json.loads(path.read_text())
  else:
    if args.quick:
      args.steps, args.seeds = 20, 2
    t0 = time.perf_counter()
    result = {
        "settings": {"steps": args.steps, "batch": args.batch, "seeds": list(range(args.seeds)),
                     "per_domain": args.per_domain, "angles": list(ANGLES),
                     "rho_grid": list(RHOS), "lr": LR, "wd": WD, "momentum": MOMENTUM,
                     "quick": bool(args.quick)},
        "environment": {**gen.environment(), "date": time.strftime("%Y-%m-%d")},
        "command": "python benchmarks/domain_generalization.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        **run_all(args),
    }
    result["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
  if args.readme is not None:
    readme_lib.replace_region(args.readme, START, END, report(result))
  print(report(result))
  return result


if __name__ == "__main__":
  main()
