"""Data-parallel SAM: step time and communication of each perturbation mode.

Runs one training step of an MLP inside ``jax.shard_map`` over all devices
(8 fake CPU devices by default, or the GPUs/TPUs present) for

* the base step: data-parallel SGD-momentum (local gradients, one ``pmean``);
* ``sam(axis_name=...)`` per device (m = per-device batch);
* ``sam(axis_name=..., group_size=k)`` for k = 2 and 4;
* ``sam(axis_name=..., sync_perturbation=True)``.

It reports the median step time (interleaved repetitions) relative to the
base step, XLA's FLOPs per device, and the collectives in the compiled
program (count and bytes per device, parsed from the optimized HLO), which
are deterministic.

``python benchmarks/sharded.py [--device cpu|gpu] [--out benchmarks/results]
[--report docs/guide/distributed.md] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from benchmarks.common import readme as readme_lib  # noqa: E402

START, END = "<!-- sharded:start -->", "<!-- sharded:end -->"
_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
_COLLECTIVES = ("all-reduce", "collective-permute", "all-gather", "reduce-scatter", "all-to-all")


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Count and bytes of each collective in an optimized HLO module's text."""
  out: dict[str, dict[str, int]] = {}
  for line in hlo_text.splitlines():
    for kind in _COLLECTIVES:
      m = re.search(rf"= (.*?) {kind}(?:-start)?\(", line)
      if m is None:
        continue
      nbytes = 0
      for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
        size = 1
        for d in filter(None, dims.split(",")):
          size *= int(d)
        nbytes += size * _BYTES.get(dtype, 4)
      entry = out.setdefault(kind, {"count": 0, "bytes": 0})
      entry["count"] += 1
      entry["bytes"] += nbytes
      break
  return out


def run(device: str, out_dir: Path, quick: bool) -> dict[str, Any]:
  import jax

  if device == "cpu":
    jax.config.update("jax_num_cpu_devices", 8)
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import PartitionSpec as P
  from tqdm import tqdm

  import sam_optax
  from benchmarks.common import measure, models

  devices = jax.devices(device)
  if device == "gpu" and not devices:
    raise SystemExit("--device gpu: no GPU is visible to JAX on this machine.")
  n = len(devices)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
  sizes = (64, 256, 256, 10) if quick else (256, 1024, 1024, 10)
  per_device = 16 if quick else 64
  model = models.mlp(sizes)
  params = model.init(jax.random.key(0))
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(n * per_device, sizes[0]), jnp.float32)
  y = jnp.asarray(rng.randint(0, sizes[-1], n * per_device))
  x, y = (jax.device_put(a, jax.sharding.NamedSharding(mesh, P("batch"))) for a in (x, y))
  base = optax.sgd(0.01, momentum=0.9)

  def make(sam_kwargs: Optional[dict[str, Any]]):
    tx = base if sam_kwargs is None else optax.chain(
        sam_optax.sam(0.05, axis_name="batch", **sam_kwargs), base
    )

    def local(params, state, x, y):
      loss_fn = lambda p: models.cross_entropy(model.apply(p, x), y)  # noqa: E731
      grads = jax.grad(loss_fn)(jax.lax.pcast(params, "batch", to="varying"))
      if sam_kwargs is None:
        grads = jax.lax.pmean(grads, "batch")
      updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
      return optax.apply_updates(params, updates), state

    step = jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")),
        out_specs=(P(), P()),
    ))
    state = tx.init(params)
    compiled = step.lower(params, state, x, y).compile()
    return compiled, state

  groups = [k for k in (2, 4) if n % k == 0 and k < n]
  contestants = {"data-parallel SGD (base)": None, "sam, per device": {}}
  contestants.update({f"sam, group_size={k}": {"group_size": k} for k in groups})
  contestants["sam, sync_perturbation"] = {"sync_perturbation": True}
  compiled, states, rows = {}, {}, []
  for name, kw in tqdm(contestants.items(), desc="compile", leave=False):
    compiled[name], states[name] = make(kw)
  fns = {k: (lambda k=k: compiled[k](params, states[k], x, y)) for k in contestants}
  times = measure.time_interleaved(fns, reps=20 if quick else 200, warmup=3)
  base_name = next(iter(contestants))
  param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
  for name in contestants:
    t = times[name]
    comm = collectives(compiled[name].as_text())
    rows.append({
        "name": name,
        "ms_median": 1e3 * float(np.median(t)),
        "ms_iqr": 1e3 * float(np.subtract(*np.percentile(t, [75, 25]))),
        "time_ratio": float(np.median(t) / np.median(times[base_name])),
        "flops": measure.flops_of(compiled[name]),
        "collectives": comm,
        "comm_bytes_over_param_bytes": sum(c["bytes"] for c in comm.values()) / param_bytes,
    })
  base_flops = rows[0]["flops"]
  for r in rows:
    r["flops_ratio"] = r["flops"] / base_flops if base_flops else None
  result = {
      "device": device,
      "devices": [str(d) for d in devices],
      "device_kind": devices[0].device_kind,
      "num_devices": n,
      "model": f"MLP {'-'.join(map(str, sizes))}, {per_device} examples per device",
      "param_bytes": int(param_bytes),
      "jax": jax.__version__,
      "machine": platform.processor() or platform.machine(),
      "quick": quick,
      "rows": rows,
  }
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f"sharded_{device}.json").write_text(json.dumps(result, indent=1))
  return result


def table(result: dict[str, Any]) -> str:
  lines = [
      f"Measured by `python benchmarks/sharded.py --device {result['device']}`"
      f" ({result['model']}, {result['num_devices']} × {result['device_kind']},"
      f" jax {result['jax']}). Time: median of interleaved repetitions; FLOPs"
      " per device from XLA; communication per device from the compiled"
      " program, in units of parameter bytes.",
      "",
      "| step | ms (IQR) | time × base | FLOPs × base | collectives | bytes / param bytes |",
      "|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    comm = ", ".join(f"{v['count']} {k}" for k, v in sorted(r["collectives"].items()))
    lines.append(
        f"| {r['name']} | {r['ms_median']:.2f} ({r['ms_iqr']:.2f}) |"
        f" {r['time_ratio']:.2f} | {r['flops_ratio']:.2f} | {comm} |"
        f" {r['comm_bytes_over_param_bytes']:.2f} |"
    )
  return "\n".join(lines)


def write_readme(readme: Path, result: dict[str, Any]) -> None:
  readme_lib.replace_region(readme, START, END, table(result))


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", choices=("cpu", "gpu", "tpu"), default="cpu")
  parser.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results")
  parser.add_argument("--report", "--readme", dest="readme", type=Path, default=None)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args(argv)
  result = run(args.device, args.out, args.quick)
  print(table(result))
  if args.readme is not None:
    write_readme(args.readme, result)
  return result


if __name__ == "__main__":
  main()
