"""What SAM costs: time, FLOPs and memory of one training step, side by side.

For three models (an MLP, a ResNet-style CNN with BatchNorm, a small
Transformer; ``benchmarks/common/zoo.py``) every contestant compiles ONE full
training step with ``jax.jit``: the clean gradient, the transform, the base
optimizer ``optax.sgd(lr, momentum=0.9)`` and ``optax.apply_updates``. The
contestants are the base optimizer alone, every transform of ``sam_optax``
in front of it (the list of ``benchmarks/variant_cost.py``, plus ``sam`` with
``nonfinite='propagate'`` to show what the default guard costs), ``msam``
wrapped around it, the peer ``optax.contrib.sam`` in opaque mode, and the
ways users give ρ other than a Python number: a schedule, an
``optax.inject_hyperparams`` value, GSAM's ``gsam_rho_schedule``, and
LookSAM with ``sam_pass`` chosen by the Python loop (two compiled programs,
the one with the pass on every fifth step).

Measured per contestant:

* **time**: samples interleaved across contestants
  (``measure.time_interleaved``); a sample is the mean over
  ``STEPS_PER_SAMPLE`` (5) consecutive steps, each waited for, with the
  parameters, optimizer state and BatchNorm statistics carried from step to
  step (buffers donated, as in a training loop). Five is LookSAM's period, so
  every sample holds exactly one LookSAM step that takes the second pass and
  four that do not (``lax.switch`` runs one branch at run time): its figure
  is the amortized cost. Reported: median and interquartile range per step,
  and the ratio to the base step's median (with the quartiles of the
  per-sample paired ratios).
* **FLOPs**: XLA's ``compile().cost_analysis()``; deterministic. For
  conditional steps XLA counts the costlier branch; the amortized figure uses
  the same transform at ρ = 0 for the steps without the pass.
* **memory**: ``compile().memory_analysis()``: temporary, argument and
  output bytes, in units of the parameters' bytes.

The floors checked (and printed with pass/fail): SAM's FLOPs ≤ 2.02× and
time ≤ 2.1× the base step; SAM no slower than ``optax.contrib.sam`` (the 95%
bootstrap interval of the median paired time ratio reaches 1) and no larger
(temporary memory at most 0.05 parameter sizes more: scalars, not buffers);
LookSAM (k=5) amortized ≤ 1.3× and MSAM ≤ 1.1× the base step, in time and
in FLOPs (LookSAM with ``sam_pass`` from the loop: in time); a scheduled or
injected ρ as fast as a number (paired 95% interval reaches 1), with no
more temporary memory and no conditional in the compiled step.

``python benchmarks/overhead.py [--device cpu|gpu] [--dtype float32|bfloat16]
[--size default|large] [--quick] [--out benchmarks/results]
[--report docs/benchmarks/cost.md]`` writes ``overhead_<device>.json`` (a suffix names a
non-default dtype, size or ``--quick``) and, with ``--readme``, rewrites the
report region between the ``overhead`` markers from that JSON.
``--from-json FILE --report docs/benchmarks/cost.md`` regenerates the region from a saved
JSON without measuring; ``--models`` and ``--variants`` measure a subset.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

try:
  import resource
except ImportError:  # not on Windows: page faults are then not counted
  resource = None

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import sam_optax
from benchmarks import variant_cost
from benchmarks.common import readme as readme_lib
from benchmarks.common import measure, zoo

START, END = "<!-- overhead:start -->", "<!-- overhead:end -->"
LR, RHO, MSAM_RHO = 0.01, 0.05, 3.0
STEPS_PER_SAMPLE = 5
BASE, SAM, PEER = "base", "sam", "optax.contrib.sam (opaque)"
SAM_PROPAGATE = "sam, nonfinite='propagate'"
LOOKSAM, MSAM = "looksam (k=5)", "msam"
LOOKSAM_HOST = "looksam (k=5), sam_pass from the loop"
SAM_SCHEDULE, SAM_INJECT = "sam, ρ schedule", "sam, injected ρ"
GSAM_SCHEDULE = "gsam, gsam_rho_schedule"
# A ρ that is not a Python number: compared with `sam` (the same ρ as a
# number), pair by pair.
TRACED_RHO = (SAM_SCHEDULE, SAM_INJECT)
FLOOR = {"sam_flops": 2.02, "sam_time": 2.1, "looksam": 1.3, "msam": 1.1}
# "No larger than optax.contrib.sam" is about parameter-sized buffers: scalar
# statistics (a few hundred bytes) are within this fraction of one.
MEMORY_SLACK = 0.05
_CALL = "(empty step)"
_PAGE = resource.getpagesize() if resource is not None else 4096
QUICK_VARIANTS = (SAM, LOOKSAM, MSAM, PEER, SAM_SCHEDULE, LOOKSAM_HOST)


def base_optimizer() -> optax.GradientTransformation:
  return optax.sgd(LR, momentum=0.9)


# ------------------------------------------------------------------ contestants


def contestants(only: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """The base optimizer, then ``variant_cost._variants()`` in its order.

  Each entry: ``name``, ``tx`` (the full optimizer), ``closure``
  (``"loss_fn"`` or ``"contrib"``), ``per_example`` (ESAM's protocol),
  ``amortize`` and ``tx_without_pass`` (the transform at ρ = 0, for
  conditional variants).
  """
  variants = variant_cost._variants()
  if _accepts_nonfinite():
    # The default guard against a non-finite perturbed gradient, measured
    # by comparison: the same transform without it.
    at = next(i for i, v in enumerate(variants) if v["name"] == SAM) + 1
    propagate = {
        "name": SAM_PROPAGATE,
        "make": lambda r: sam_optax.sam(r, nonfinite="propagate"),
    }
    variants.insert(at, propagate)
  variants += _traced_rho_variants()
  unknown = set(only or ()) - {v["name"] for v in variants}
  if unknown:
    raise ValueError(f"unknown transforms {sorted(unknown)}; known:"
                     f" {[v['name'] for v in variants]}")
  out = [{"name": BASE, "tx": base_optimizer(), "closure": "loss_fn"}]
  for v in variants:
    if only is not None and v["name"] not in only:
      continue
    entry = {
        "name": v["name"],
        "closure": "loss_fn",
        "per_example": v.get("per_example", False),
        "amortize": v.get("amortize"),
    }
    if v["name"] == MSAM:
      entry["tx"] = sam_optax.msam(base_optimizer(), rho=MSAM_RHO)
    elif v["name"].startswith("optax.contrib"):
      adv = optax.chain(optax.contrib.normalize(), optax.sgd(RHO))
      entry["tx"] = optax.contrib.sam(base_optimizer(), adv, opaque_mode=True)
      entry["closure"] = "contrib"
    else:
      entry["tx"] = optax.chain(v["make"](RHO), base_optimizer())
      if v.get("host_every"):  # two programs, chosen by the Python loop
        entry["host_every"] = v["host_every"]
        entry["amortize"] = {"kind": "every", "k": v["host_every"]}
      elif entry["amortize"] is not None:
        entry["tx_without_pass"] = optax.chain(v["make"](0.0), base_optimizer())
    out.append(entry)
  return out


def _traced_rho_variants() -> list[dict[str, Any]]:
  """ρ as a schedule, injected, GSAM's schedule; LookSAM chosen by the loop.

  Each should cost what the same transform with a Python-number ρ costs
  (no conditional around the pass), and LookSAM with ``sam_pass`` chosen
  on the host what its FLOPs say.
  """
  if not _accepts_sam_pass():
    return []
  lr = optax.cosine_decay_schedule(LR, 10_000)
  return [
      dict(name=SAM_SCHEDULE,
           make=lambda r: sam_optax.sam(optax.linear_schedule(r, r, 1))),
      dict(name=SAM_INJECT,
           make=lambda r: optax.inject_hyperparams(sam_optax.sam)(rho=r)),
      dict(name=GSAM_SCHEDULE, make=lambda r: sam_optax.gsam(
          sam_optax.gsam_rho_schedule(lr, rho_max=r, rho_min=r / 10, lr_max=LR),
          alpha=0.1)),
      dict(name=LOOKSAM_HOST, make=lambda r: sam_optax.looksam(r, k=5),
           host_every=5),
  ]


def _accepts_sam_pass() -> bool:
  try:
    params = jnp.zeros(2)
    tx = sam_optax.sam(RHO)
    tx.update(params, tx.init(params), params, loss_fn=jnp.sum, sam_pass=False)
  except (TypeError, ValueError):
    return False
  return True


def _accepts_nonfinite() -> bool:
  try:
    sam_optax.sam(RHO, nonfinite="propagate")
  except TypeError:
    return False
  return True


def train_step(
    problem: zoo.Problem,
    tx: optax.GradientTransformation,
    *,
    closure: str = "loss_fn",
    per_example: bool = False,
    sam_pass: bool | None = None,
) -> Callable[..., Any]:
  """One training step as a pure function of the carried state and a batch.

  ``(params, opt_state, model_state, x, y) -> (params, opt_state,
  model_state, loss)``. The loss closure is what a Flax user writes: the
  mean loss, paired with the new BatchNorm statistics when the model has
  them (``loss_fn(p) -> (loss, new_batch_stats)``); the statistics of the
  clean pass are kept. ESAM gets per-example losses and the clean ones from
  the first pass (``clean_losses=``); ``optax.contrib.sam`` gets
  ``grad_fn(params, i)``.
  """
  stateful = problem.state is not None

  def step(params, opt_state, model_state, x, y):
    def losses(p):
      return problem.per_example(p, model_state, x, y)

    def loss_fn(p):
      per, new_state = losses(p)
      return (per.mean(), new_state) if stateful else per.mean()

    def mean_and_losses(p):  # ESAM: the clean per-example losses as aux
      per, new_state = losses(p)
      return per.mean(), (new_state, per)

    if per_example:
      (loss, (new_state, clean)), g = jax.value_and_grad(
          mean_and_losses, has_aux=True
      )(params)
      per_ex = losses if stateful else (lambda p: losses(p)[0])
      kwargs = {"loss_fn": per_ex, "clean_losses": clean}
    else:
      out, g = jax.value_and_grad(loss_fn, has_aux=stateful)(params)
      loss, new_state = out if stateful else (out, model_state)
      kwargs = {"loss_fn": loss_fn}
      if closure == "contrib":
        grad = jax.grad(loss_fn, has_aux=stateful)
        kwargs = {"grad_fn": lambda p, _: grad(p)[0] if stateful else grad(p)}
    if sam_pass is not None:
      kwargs["sam_pass"] = sam_pass
    updates, opt_state = tx.update(g, opt_state, params, **kwargs)
    return optax.apply_updates(params, updates), opt_state, new_state, loss

  return step


def _compile(step, args) -> Any:
  return jax.jit(step, donate_argnums=(0, 1, 2)).lower(*args).compile()


def _memory(compiled) -> dict[str, float]:
  mem = compiled.memory_analysis()
  keys = ("temp", "argument", "output", "alias")
  if mem is None:
    return {f"{k}_bytes": float("nan") for k in keys}
  return {
      f"{k}_bytes": float(getattr(mem, f"{k}_size_in_bytes", np.nan))
      for k in keys
  }


class _Runner:
  """Calls a compiled step ``STEPS_PER_SAMPLE`` times, carrying the state.

  Every step is waited for; ``times`` keeps each step's seconds, one row per
  call, so the steps of a period can be told apart (LookSAM's pass is the
  first of each row: its step count is a multiple of 5 there).
  """

  def __init__(self, compiled, carry, x, y):
    # One program, or one per step of a period (the host's choice).
    self.programs = compiled if isinstance(compiled, list) else [compiled]
    self.carry, self.x, self.y = carry, x, y
    self.step = 0
    self.times: list[list[float]] = []
    self.faults: list[float] = []  # minor page faults per step, per call

  def __call__(self):
    row = []
    f0 = _minor_faults()
    for _ in range(STEPS_PER_SAMPLE):
      t0 = time.perf_counter()
      program = self.programs[self.step % len(self.programs)]
      out = jax.block_until_ready(program(*self.carry, self.x, self.y))
      self.step += 1
      row.append(time.perf_counter() - t0)
      self.carry = out[:3]
    self.faults.append((_minor_faults() - f0) / STEPS_PER_SAMPLE)
    self.times.append(row)
    return self.carry


def _conditionals(compiled) -> int:
  """Conditionals (``lax.cond``/``lax.switch``) in the compiled program."""
  return compiled.as_text().count("conditional(")


def _minor_faults() -> float:
  """Minor page faults of this process so far (NaN where not available)."""
  if resource is None:
    return float("nan")
  return float(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def _fresh(tree: Any, device: Any) -> Any:
  """New device buffers holding ``tree`` (donation consumes them)."""
  return jax.device_put(jax.tree.map(np.asarray, tree), device)


# ------------------------------------------------------------------- measuring


def _quartiles(a: np.ndarray) -> tuple[float, float, float]:
  q25, q50, q75 = np.percentile(a, [25, 50, 75])
  return float(q25), float(q50), float(q75)


def _median_ci(a: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
  """95% bootstrap interval of the median of ``a``."""
  rng = np.random.default_rng(seed)
  meds = np.median(rng.choice(a, size=(n, len(a)), replace=True), axis=1)
  lo, hi = np.percentile(meds, [2.5, 97.5])
  return float(lo), float(hi)


def measure_problem(
    problem: zoo.Problem,
    entries: list[dict[str, Any]],
    device: Any,
    *,
    reps: int,
    warmup: int,
    bar: Any,
) -> dict[str, Any]:
  """Compiles every contestant on ``problem``, then times them interleaved."""
  params = _fresh(problem.params, device)
  model_state = _fresh(problem.state, device)
  x, y = _fresh(problem.x, device), _fresh(problem.y, device)
  p_bytes = zoo.param_bytes(params)
  rows, runners = [], {}
  for e in entries:
    bar.set_postfix_str(f"{problem.name}: compile {e['name']}")
    tx = e["tx"]
    host_every = e.get("host_every")
    step = train_step(problem, tx, closure=e["closure"],
                      per_example=e.get("per_example", False),
                      sam_pass=True if host_every else None)
    args = (params, tx.init(params), model_state, x, y)
    t0 = time.perf_counter()
    compiled = _compile(step, args)
    row = dict(name=e["name"], compile_s=time.perf_counter() - t0,
               flops=measure.flops_of(compiled),
               bytes_accessed=measure.bytes_accessed_of(compiled),
               conditionals=_conditionals(compiled),
               **_memory(compiled))
    program = compiled
    if host_every:
      compiled0 = _compile(train_step(problem, tx, sam_pass=False), args)
      row["flops_without_pass"] = measure.flops_of(compiled0)
      row["conditionals"] += _conditionals(compiled0)
      row["has_conditional"] = row["conditionals"] > 0
      # Step count j takes the pass where j % k == 0, as LookSAM's policy.
      program = [compiled] + [compiled0] * (host_every - 1)
    elif e.get("tx_without_pass") is not None:
      tx0 = e["tx_without_pass"]
      compiled0 = _compile(train_step(problem, tx0),
                           (params, tx0.init(params), model_state, x, y))
      row["flops_without_pass"] = measure.flops_of(compiled0)
      row["has_conditional"] = "conditional(" in compiled.as_text()
    carry = (_fresh(params, device), _fresh(args[1], device),
             _fresh(model_state, device))
    runners[e["name"]] = _Runner(program, carry, x, y)
    rows.append(row)
    bar.update(1)

  # The cost of calling a compiled step at all: one that returns its inputs.
  def noop(params, opt_state, model_state, x, y):
    del x, y
    return params, opt_state, model_state, jnp.zeros((), jnp.float32)

  opt_state = entries[0]["tx"].init(params)
  runners[_CALL] = _Runner(
      _compile(noop, (params, opt_state, model_state, x, y)),
      (_fresh(params, device), _fresh(opt_state, device),
       _fresh(model_state, device)), x, y)

  # Timing, in chunks so that the bar moves; the order alternates within
  # every chunk, and the samples of all chunks are pooled.
  bar.set_postfix_str(f"{problem.name}: timing")
  samples: dict[str, list[np.ndarray]] = {k: [] for k in runners}
  chunk = min(6, reps)  # even: as many forward as reversed orders
  done = 0
  while done < reps:
    n = min(chunk, reps - done)
    got = measure.time_interleaved(runners, reps=n,
                                   warmup=warmup if done == 0 else 0)
    for k, v in got.items():
      samples[k].append(v / STEPS_PER_SAMPLE)
    done += n
    bar.update(n)
  per_step = {k: np.concatenate(v) for k, v in samples.items()}

  base_row = rows[0]
  t_base = per_step[BASE]
  for row, e in zip(rows, entries):
    t = per_step[row["name"]]
    q25, med, q75 = _quartiles(t)
    paired = t / t_base
    r25, _, r75 = _quartiles(paired)
    row.update(
        time_median_s=med, time_q25_s=q25, time_q75_s=q75,
        time_ratio=med / float(np.median(t_base)),
        time_ratio_q25=r25, time_ratio_q75=r75,
        flops_ratio=row["flops"] / base_row["flops"],
        temp_over_param_bytes=row["temp_bytes"] / p_bytes,
        fresh_mb_per_step=float(
            np.median(runners[row["name"]].faults[warmup:]) * _PAGE / 1e6
        ),
        extra_temp_over_param_bytes=(row["temp_bytes"] - base_row["temp_bytes"])
        / p_bytes,
    )
    if "flops_without_pass" in row:
      row["flops_ratio_without_pass"] = row["flops_without_pass"] / base_row["flops"]
      amort = e.get("amortize") or {}
      if amort.get("kind") == "every":
        k = amort["k"]
        row["flops_ratio_amortized"] = (
            row["flops_ratio"] + (k - 1) * row["flops_ratio_without_pass"]
        ) / k
        # Column j of a sample is step count j (mod k): the pass is at j % k == 0.
        steps = np.asarray(runners[row["name"]].times[warmup:])
        with_pass = np.arange(STEPS_PER_SAMPLE) % k == 0
        row["time_step_with_pass_s"] = float(np.median(steps[:, with_pass]))
        row["time_step_without_pass_s"] = float(np.median(steps[:, ~with_pass]))

  def paired(name: str, other: str) -> dict[str, Any] | None:
    """Paired time ratio of ``name`` to ``other``, with a 95% CI."""
    t, other_t = per_step.get(name), per_step.get(other)
    if t is None or other_t is None:
      return None
    ratio = t / other_t
    lo, hi = _median_ci(ratio)
    return {"median": float(np.median(ratio)), "ci95": [lo, hi]}

  def against_peer(name: str) -> dict[str, Any] | None:
    """Paired time ratio of ``name`` to optax.contrib.sam, with a 95% CI."""
    return paired(name, PEER)

  return {
      "name": problem.name, "description": problem.description,
      "num_params": int(sum(p.size for p in jax.tree.leaves(params))),
      "param_bytes": p_bytes,
      "state_bytes": zoo.param_bytes(model_state) if model_state is not None else 0,
      "base_time_s": float(np.median(t_base)),
      "call_overhead_s": float(np.median(per_step[_CALL])),
      "rows": rows, "sam_vs_peer_time": against_peer(SAM),
      "traced_rho_vs_sam_time": {
          name: paired(name, SAM) for name in TRACED_RHO if name in per_step
      },
      "propagate_vs_peer_time": against_peer(SAM_PROPAGATE),
  }


def floors(model: dict[str, Any]) -> list[dict[str, Any]]:
  """The checks of the module docstring for one measured model."""
  rows = {r["name"]: r for r in model["rows"]}
  out = []

  def add(check, value, limit, ok, shown=None):
    out.append({
        "model": model["name"], "check": check, "value": value,
        "limit": limit, "passed": bool(ok), "shown": shown,
    })

  if SAM in rows:
    s = rows[SAM]
    add("sam FLOPs / base", s["flops_ratio"], FLOOR["sam_flops"],
        s["flops_ratio"] <= FLOOR["sam_flops"])
    add("sam time / base", s["time_ratio"], FLOOR["sam_time"],
        s["time_ratio"] <= FLOOR["sam_time"])
    if PEER in rows:
      p = rows[PEER]
      cmp = model["sam_vs_peer_time"]
      add("sam time / contrib time, paired (no slower: 95% CI reaches 1)",
          cmp["median"], 1.0, cmp["ci95"][0] <= 1.0,
          f"{cmp['median']:.3f} [{cmp['ci95'][0]:.3f}, {cmp['ci95'][1]:.3f}]")
      extra = (s["temp_bytes"] - p["temp_bytes"]) / model["param_bytes"]
      add("sam temp memory − contrib, in parameter sizes (no larger)",
          extra, MEMORY_SLACK, extra <= MEMORY_SLACK, f"{extra:+.3f}")
  if LOOKSAM in rows:
    r = rows[LOOKSAM]
    add("looksam (k=5) amortized time / base", r["time_ratio"],
        FLOOR["looksam"], r["time_ratio"] <= FLOOR["looksam"])
    add("looksam (k=5) amortized FLOPs / base", r["flops_ratio_amortized"],
        FLOOR["looksam"], r["flops_ratio_amortized"] <= FLOOR["looksam"])
  for name, cmp in (model.get("traced_rho_vs_sam_time") or {}).items():
    if cmp is None or name not in rows or SAM not in rows:
      continue
    add(f"{name}: time / sam with a number, paired (as fast: 95% CI reaches 1)",
        cmp["median"], 1.0, cmp["ci95"][0] <= 1.0,
        f"{cmp['median']:.3f} [{cmp['ci95'][0]:.3f}, {cmp['ci95'][1]:.3f}]")
    extra = (rows[name]["temp_bytes"] - rows[SAM]["temp_bytes"]) / model["param_bytes"]
    add(f"{name}: temp memory − sam with a number, in parameter sizes",
        extra, MEMORY_SLACK, extra <= MEMORY_SLACK, f"{extra:+.3f}")
    add(f"{name}: conditionals in the compiled step", rows[name]["conditionals"],
        0, rows[name]["conditionals"] == 0)
  if LOOKSAM_HOST in rows:
    r = rows[LOOKSAM_HOST]
    add("looksam (k=5), sam_pass from the loop: amortized time / base",
        r["time_ratio"], FLOOR["looksam"], r["time_ratio"] <= FLOOR["looksam"])
  if MSAM in rows:
    r = rows[MSAM]
    add("msam time / base", r["time_ratio"], FLOOR["msam"],
        r["time_ratio"] <= FLOOR["msam"])
    add("msam FLOPs / base", r["flops_ratio"], FLOOR["msam"],
        r["flops_ratio"] <= FLOOR["msam"])
  return out


def machine_info(device: Any) -> dict[str, Any]:
  def version(mod: str) -> str | None:
    try:
      return __import__(mod).__version__
    except Exception:  # noqa: BLE001
      return None

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  return {
      "device": str(device), "device_kind": getattr(device, "device_kind", ""),
      "devices": [str(d) for d in jax.devices()],
      "backend": jax.default_backend(), "cpu": cpu, "cpu_count": os.cpu_count(),
      "usable_cpus": usable, "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__, "jaxlib": version("jaxlib"), "optax": optax.__version__,
      "flax": version("flax"), "numpy": np.__version__,
      "sam_optax": sam_optax.__version__,
  }


def _load() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
  try:
    device = jax.devices(args.device)[0]
  except RuntimeError as err:
    raise SystemExit(
        f"overhead.py: --device {args.device} was requested but JAX sees no"
        f" {args.device.upper()} (available: {[str(d) for d in jax.devices()]};"
        f" {err}). Install a JAX build with {args.device.upper()} support"
        " (e.g. `pip install -U 'jax[cuda12]'`) or use --device cpu."
    ) from None
  size = "quick" if args.quick else args.size
  reps = args.reps if args.reps is not None else (3 if args.quick else 24)
  warmup = 1 if args.quick else 2
  dtype = jnp.dtype(args.dtype)
  only = list(args.variants) if args.variants else None
  if only is None and args.quick:
    only = QUICK_VARIANTS
  entries = contestants(only)
  problems = zoo.problems(size, dtype=dtype)
  if args.models:
    keep = list(args.models)
    problems = [p for p in problems if p.name in keep]
  load_start = _load()
  t0 = time.perf_counter()
  bar = tqdm(total=len(problems) * (len(entries) + reps), desc="overhead",
             disable=args.no_progress)
  measured = [
      measure_problem(p, entries, device, reps=reps, warmup=warmup, bar=bar)
      for p in problems
  ]
  bar.close()
  flags = [f"--device {args.device}"]
  if args.dtype != "float32":
    flags.append(f"--dtype {args.dtype}")
  flags.append("--quick" if args.quick else f"--size {args.size}")
  if args.reps is not None:
    flags.append(f"--reps {args.reps}")
  if args.models:
    flags.append("--models " + " ".join(args.models))
  if args.variants:
    flags.append("--variants " + " ".join(f'"{v}"' for v in args.variants))
  result = {
      "command": "python benchmarks/overhead.py " + " ".join(flags)
      + " --report docs/benchmarks/cost.md",
      "date": datetime.date.today().isoformat(),
      "device": args.device, "dtype": args.dtype, "size": size,
      "machine": machine_info(device),
      "load_average_start": load_start, "load_average_end": _load(),
      "wall_s": round(time.perf_counter() - t0, 1),
      "method": {
          "base": f"optax.sgd({LR}, momentum=0.9)", "rho": RHO, "msam_rho": MSAM_RHO,
          "steps_per_sample": STEPS_PER_SAMPLE, "samples": reps,
          "warmup_samples": warmup,
          "model_dtype": "float32 parameters, " + args.dtype + " computation",
      },
      "models": measured,
      "floors": [f for m in measured for f in floors(m)],
  }
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / result_name(args)).write_text(json.dumps(result, indent=1))
  return result


def result_name(args: argparse.Namespace) -> str:
  parts = [f"overhead_{args.device}"]
  if args.dtype != "float32":
    parts.append(args.dtype)
  if args.quick:
    parts.append("quick")
  elif args.size != "default":
    parts.append(args.size)
  return "_".join(parts) + ".json"


# --------------------------------------------------------------------- report

_SHORT = {"mlp": "MLP", "resnet": "ResNet", "transformer": "Transformer"}


def _ms(s: float) -> str:
  return f"{s * 1e3:.3g}"


def _fmt_floor(f: dict[str, Any]) -> str:
  shown = f["shown"] if f.get("shown") else f"{f['value']:.3f}"
  return (f"| {_SHORT.get(f['model'], f['model'])} | {f['check']} | {shown} |"
          f" {f['limit']:g} | {'pass' if f['passed'] else '**fail**'} |")


def report(result: dict[str, Any]) -> str:
  """The report region: generated from the JSON alone."""
  m = result["machine"]
  meth = result["method"]
  models = result["models"]
  lines = [
      (f"Measured by `benchmarks/overhead.py` on {m['device_kind'] or m['device']}"
      f" ({m['cpu']}, {m['usable_cpus']} usable cores; jax {m['jax']}, optax"
      f" {m['optax']}, flax {m['flax']}; {result['date']}; load average"
      f" {result['load_average_start']} at the start). Reproduce with"
      f" `{result['command']}`. Base step: `{meth['base']}`; ρ = {meth['rho']}"
      f" (msam: {meth['msam_rho']}); {meth['model_dtype']}. Time: median of"
      f" {meth['samples']} interleaved samples, each the mean of"
      f" {meth['steps_per_sample']} consecutive steps (one LookSAM period)."),
      "",
      ("| model | parameters | base step, ms (IQR) | empty step, ms | base GFLOPs |"
      " base temp memory / param bytes |"),
      "|---|---|---|---|---|---|",
  ]
  for mod in models:
    b = mod["rows"][0]
    lines.append(
        f"| {mod['description']} | {mod['num_params']:,} |"
        f" {_ms(b['time_median_s'])}"
        f" ({_ms(b['time_q25_s'])}–{_ms(b['time_q75_s'])}) |"
        f" {_ms(mod['call_overhead_s'])} | {b['flops'] / 1e9:.3g} |"
        f" {b['temp_over_param_bytes']:.2f} |"
    )
  header = "| transform |" + "".join(
      f" {_SHORT.get(mod['name'], mod['name'])} time × | FLOPs × | Δ temp |"
      for mod in models
  ) + " conditionals |"
  lines += [
      "",
      ("Each cell relative to the base step of the same model: time (median"
      " ratio), XLA FLOPs, and the extra temporary memory in units of"
      " parameter bytes. LookSAM's time is the average over its period."
      " Conditionals: `lax.cond`/`lax.switch` in the compiled step (of both"
      " programs, where the loop chooses)."),
      "",
      header,
      "|---|" + "---|---|---|" * len(models) + "---|",
  ]
  names = [r["name"] for r in models[0]["rows"]]
  for name in names:
    cells = []
    for mod in models:
      r = next(x for x in mod["rows"] if x["name"] == name)
      flops = f"{r['flops_ratio']:.2f}"
      if "flops_ratio_amortized" in r:
        flops = f"{r['flops_ratio_amortized']:.2f} (pass {r['flops_ratio']:.2f})"
      elif "flops_ratio_without_pass" in r:
        flops = f"{r['flops_ratio_without_pass']:.2f}–{r['flops_ratio']:.2f}"
      cells.append(f" {r['time_ratio']:.2f} | {flops} |"
                   f" {r['extra_temp_over_param_bytes']:+.2f} |")
    conds = next(x for x in models[0]["rows"] if x["name"] == name).get(
        "conditionals", "")
    lines.append(f"| {name} |" + "".join(cells) + f" {conds} |")
  lines += [
      "",
      "| model | check | measured | limit | result |",
      "|---|---|---|---|---|",
  ]
  lines += [_fmt_floor(f) for f in result["floors"]]
  lines += ["", _limits_text(result)]
  return "\n".join(lines)


def _span(values: list[float], fmt: str) -> str:
  lo, hi = min(values), max(values)
  return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else (
      f"{format(lo, fmt)}–{format(hi, fmt)}")


def _speed_against_peer(result: dict[str, Any]) -> str:
  """What the default's guard costs in time, against optax.contrib.sam."""
  parts = []
  for mod in result["models"]:
    rows = {r["name"]: r for r in mod["rows"]}
    sam_t, prop_t = mod.get("sam_vs_peer_time"), mod.get("propagate_vs_peer_time")
    if sam_t is None or prop_t is None or PEER not in rows:
      continue
    peer_bytes = rows[PEER].get("bytes_accessed")

    def more_bytes(name, peer_bytes=peer_bytes, rows=rows):
      mine = rows[name].get("bytes_accessed")
      if not mine or not peer_bytes:
        return ""
      return f", {100 * (mine / peer_bytes - 1):+.1f}% bytes"

    parts.append(
        f"{_SHORT.get(mod['name'], mod['name'])}: `sam` {sam_t['median']:.3f}×"
        f" [{sam_t['ci95'][0]:.3f}, {sam_t['ci95'][1]:.3f}]{more_bytes(SAM)},"
        f" `nonfinite='propagate'` {prop_t['median']:.3f}×"
        f" [{prop_t['ci95'][0]:.3f}, {prop_t['ci95'][1]:.3f}]"
        f"{more_bytes(SAM_PROPAGATE)}"
    )
  if not parts:
    return ""
  above = [f"{_SHORT.get(m['name'], m['name'])} ({label})"
           for m in result["models"]
           for label, key in (("default", "sam_vs_peer_time"),
                              ("propagate", "propagate_vs_peer_time"))
           if m.get(key) and m[key]["ci95"][0] > 1]
  below = [f"{_SHORT.get(m['name'], m['name'])} ({label})"
           for m in result["models"]
           for label, key in (("default", "sam_vs_peer_time"),
                              ("propagate", "propagate_vs_peer_time"))
           if m.get(key) and m[key]["ci95"][1] < 1]
  return (
      "* **Time against `optax.contrib.sam`** (paired median ratio, 95% CI;"
      " XLA's bytes accessed relative to it): " + "; ".join(parts) + ". Both"
      " pipelines run the same two passes; `sam` adds the norm of its output"
      " (the stats and the finiteness check) and a select on it."
      f" Intervals above 1: {', '.join(above) or 'none'}; below 1:"
      f" {', '.join(below) or 'none'}. The gaps are a few percent either way"
      " and move between runs; the FLOPs and bytes columns do not."
  )


def _limits_text(result: dict[str, Any]) -> str:
  """How close two-pass SAM gets to its limits, and why it falls short."""
  per_model, sams, empties, extra = [], [], [], []
  slow_branches = []
  for mod in result["models"]:
    rows = {r["name"]: r for r in mod["rows"]}
    if SAM not in rows:
      continue
    s = rows[SAM]
    sams.append(s)
    empties.append(mod["call_overhead_s"] / mod["base_time_s"])
    short = _SHORT.get(mod["name"], mod["name"])
    text = (
        f"{short} {s['flops_ratio']:.3f}× FLOPs, {s['time_ratio']:.2f}× time"
        f" (paired IQR {s['time_ratio_q25']:.2f}–{s['time_ratio_q75']:.2f}),"
        f" {s['extra_temp_over_param_bytes']:+.2f} P"
    )
    if SAM_PROPAGATE in rows:
      extra.append((short, s, rows[SAM_PROPAGATE], rows.get(PEER)))
    look = rows.get(LOOKSAM, {})
    if "time_step_with_pass_s" in look:
      with_pass = look["time_step_with_pass_s"] / mod["base_time_s"]
      text += (
          f"; LookSAM {with_pass:.2f}× on the step with the pass,"
          f" {look['time_step_without_pass_s'] / mod['base_time_s']:.2f}× on"
          " the others"
      )
      if with_pass > 3 * s["time_ratio"] / 2:
        slow_branches.append((short, with_pass))
    per_model.append(text)
  if not sams:
    return ""
  load = result.get("load_average_start")
  msam = [r["time_ratio"] for m in result["models"] for r in m["rows"]
          if r["name"] == MSAM]
  skip = [r["time_step_without_pass_s"] / m["base_time_s"]
          for m in result["models"] for r in m["rows"]
          if "time_step_without_pass_s" in r]
  lines = [
      "How close two-pass SAM gets to its limits (2.0× the base step's"
      " compute; memory: what the base step needs, since the buffers of g"
      " and of w + ε are free again once each is used up; P is one"
      " parameter-sized buffer): " + "; ".join(per_model) + ".",
      "",
      ("* **FLOPs.** Beside the second forward/backward pass, SAM adds work"
      " proportional to the parameters alone (the norm of g, w + ε, the norm"
      " of the result), not to batch × parameters; the excess over 2.0 is"
      f" {_span([100 * (x['flops_ratio'] - 2) for x in sams], '.1f')}%."),
      "* **Time.** The second pass runs the same kernels as the first. The"
      " rest is work per parameter, not per example: elementwise passes over"
      " the parameter tree, memory-bound and one kernel per leaf, which cost"
      " more time than their FLOPs suggest."
      + (" The same work is all that MSAM"
         f" ({_span(msam, '.2f')}×) and LookSAM's steps without the pass"
         f" ({_span(skip, '.2f')}×) add to the base step; it weighs less as"
         " the batch grows." if msam and skip else "")
      + " An empty compiled step (dispatch and"
      f" synchronization) costs {_span([100 * e for e in empties], '.1f')}%"
      " of a base step, so per-call overhead does not explain the ratios."
      + (f" The machine was shared (load average {load[0]} on"
         f" {result['machine']['usable_cpus']} cores at the start):"
         " interleaving cancels slow drifts, but a single time ratio can move"
         " by more than 10% between runs (the paired IQRs show the spread"
         " within this one); the FLOPs and memory columns do not move."
         if load else ""),
  ]
  for short, s, prop, peer in extra:
    line = (
        f"* **Memory ({short}).** `sam` holds"
        f" {s['extra_temp_over_param_bytes']:+.2f} P over the base step,"
        f" {prop['extra_temp_over_param_bytes']:+.2f} P with"
        " `nonfinite='propagate'`"
    )
    if peer is not None:
      line += f", `optax.contrib.sam` {peer['extra_temp_over_param_bytes']:+.2f} P"
    line += (
        ". Once w + ε is formed, the clean gradient g is no longer needed"
        " (the default `nonfinite='skip'` hands on a zero gradient where the"
        " perturbed one is not finite, by a select on its norm), so XLA"
        " reuses its buffer, and that of w + ε, during the second pass:"
        " the step needs what `optax.contrib.sam` needs. Only"
        " `nonfinite='fallback'` keeps g alive, for one more P."
    )
    lines.append(line)
    break  # one model states the mechanism; the table has the others
  speed = _speed_against_peer(result)
  if speed:
    lines.append(speed)
  big = [m for m in result["models"]
         if m["rows"][0]["temp_over_param_bytes"] > 20]
  if big:
    names = ", ".join(_SHORT.get(m["name"], m["name"]) for m in big)
    lines.append(
        f"* **Activations.** In the {names} the parameters are small next to"
        " the activations (base temp memory"
        f" {_span([m['rows'][0]['temp_over_param_bytes'] for m in big], '.0f')}"
        " P), so Δ temp measured in P mostly reflects how XLA lays out"
        " activation buffers for two passes, for every implementation alike."
    )
  fresh = [(m, m["rows"][0]) for m in result["models"]
           if m["rows"][0].get("fresh_mb_per_step", 0) > 0]
  if fresh:
    parts = ", ".join(
        f"{_SHORT.get(m['name'], m['name'])} {b['fresh_mb_per_step']:.1f} MB"
        f" ({b['temp_bytes'] / 1e6:.1f} MB temporary)" for m, b in fresh)
    lines.append(
        "* **Fresh memory per step.** XLA's CPU runtime allocates a step's"
        " temporary buffers on every call; above the C allocator's threshold"
        " for giving memory back to the system (at most 32 MB with glibc)"
        " they are mapped afresh and faulted in at first touch. The minor"
        f" page faults per base step amount to {parts}, and to about as much"
        " for a SAM step, whose two passes share one allocation. That cost is"
        " paid once per step, so where it is large next to the compute the"
        " two-pass ratios fall below 2.0×."
    )
  if slow_branches:
    names = ", ".join(f"{n} ({x:.0f}×)" for n, x in slow_branches)
    lines.append(
        "* **Convolutions inside a conditional on CPU.** LookSAM and AE-SAM"
        " skip the pass with `lax.switch` when their policy decides at run"
        " time. Inside a conditional or loop body"
        " XLA's CPU backend leaves the weight-gradient convolutions of a"
        " backward pass in the dimension order autodiff gives them"
        " (`dim_labels=f01b_i01o->01bf`) instead of rewriting them, as it"
        " does at the top level of the program, to the `b01f_01io` form its"
        " fast convolution kernels take; they run 20–100× slower"
        " (jax-ml/jax#12868). On convolutional models their steps with the"
        f" pass are therefore slow: {names} against the base step. Their"
        " FLOPs columns give the algorithmic cost; the MLP and the"
        " Transformer, without convolutions, do not show the effect. For the"
        " same reason a Python-int `num_ascent_steps` is unrolled rather"
        " than looped, a traced or scheduled ρ runs the pass on every step"
        " instead of skipping it under a conditional where ρ = 0, and the"
        " loop can choose LookSAM's steps itself (`sam_pass`, the row"
        f" '{LOOKSAM_HOST}'): two programs without a conditional."
    )
  return "\n".join(lines)


def write_readme(readme: Path, result: dict[str, Any]) -> None:
  readme_lib.replace_region(readme, START, END, report(result))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                      default="float32",
                      help="computation dtype (parameters stay float32)")
  parser.add_argument("--size", choices=("default", "large"), default="default",
                      help="model sizes: 'default' for a CPU, 'large' for a GPU")
  parser.add_argument("--quick", action="store_true",
                      help="tiny models, few samples and a subset of transforms")
  parser.add_argument("--reps", type=int, default=None,
                      help="timing samples per contestant (default 24; quick 3)")
  parser.add_argument("--models", nargs="+", default=None,
                      choices=("mlp", "resnet", "transformer"),
                      help="a subset of the models")
  parser.add_argument("--variants", nargs="+", default=None,
                      help="subset of the transforms, by name (quote names"
                      " with spaces); the base step is always measured")
  parser.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results")
  parser.add_argument("--report", "--readme", dest="readme", type=Path, default=None,
                      help="rewrite the region between the overhead markers")
  parser.add_argument("--from-json", type=Path, default=None,
                      help="measure nothing: report (and --readme) this JSON")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  if args.from_json is not None:
    result = json.loads(args.from_json.read_text())
  else:
    result = run(args)
  print(report(result))
  if args.readme is not None:
    write_readme(args.readme, result)
  return result


if __name__ == "__main__":
  main()
