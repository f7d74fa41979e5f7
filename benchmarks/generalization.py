"""What SAM buys: test accuracy, label noise, compute and stability, paired with SGD.

Trains SGD with momentum and the SAM family on MNIST-1D and scikit-learn's
digits, each clean and with 25% and 40% symmetric label noise, with an MLP and
a small CNN. Every optimizer uses the same base (``add_decayed_weights(wd)``,
``sgd(cosine(lr), momentum=0.9)``) and, per seed, the same initialization,
batch order and noisy labels, so differences are paired.

Tuning: SGD searches lr x wd; SAM and the other variants search lr x rho at
SGD's selected weight decay. Selection uses the mean final validation
accuracy over the seeds (the validation split comes from the training set and
carries the same label noise); the test split is clean and never used for
selection. Two comparisons come out of the same runs:

* **tuned**: every optimizer at its own validation-best configuration;
* **drop-in**: SAM (and each variant) at SGD's selected lr and weight decay,
  only rho chosen on validation (the same runs, restricted to SGD's lr).

SGD is also run at its selected configuration for twice the epochs (about
SAM's compute). The stability part trains the 1-D CNN at lr 0.3, where SAM
tends to collapse to a constant predictor, and tests two remedies: SAM's
``renormalize=True`` and a linear rho warm-up (``rho * min(1, t / W)``, the
schedule ``optax.linear_schedule(0, rho, W)``); a learning-rate warm-up is
included for comparison.

``python benchmarks/generalization.py`` runs the three parts (``mnist1d``,
``digits``, ``stability``; ``--part`` runs one, keeping the others in the
JSON), writes ``<out>/generalization.json`` and PNG plots, and with
``--report docs/benchmarks/generalization.md`` regenerates the page's generalization section from
the JSON (``--part none --report docs/benchmarks/generalization.md`` only does that). ``--quick`` is
a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import sam_optax

# `python benchmarks/generalization.py` puts benchmarks/ on the path, not the
# repository.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from benchmarks.common import readme as readme_lib
from benchmarks.common import cnn, measure, models, noise, stats, sweep
from benchmarks.common import data as data_lib
from benchmarks.common.train import make_train_step

START = "<!-- generalization:start -->"
END = "<!-- generalization:end -->"
JSON_NAME = "generalization.json"
PARTS = ("mnist1d", "digits", "stability")
MOMENTUM = 0.9
NOISE = (0.0, 0.25, 0.4)
RHO = (0.1, 0.3)


# ---------------------------------------------------------------------------
# Optimizers.


class Variant(NamedTuple):
  """One optimizer of the comparison.

  Attributes:
    label: display name.
    front: ``rho -> transform`` chained in front of the base optimizer;
      ``None`` for plain SGD or a ``build``.
    rho_scale: the rho grid of this variant is ``RHO`` times this.
    wraps: the transform wraps the base optimizer (MSAM) instead.
    every: the second pass runs every ``every`` steps (LookSAM), else 0.
    build: ``(hparams, total_steps, num_data) -> optimizer`` for a full
      optimizer that wraps the base (``sgd_base``) or replaces it; ``None``
      for the others.
    is_base_at_rho_zero: ``rho = 0`` gives the base optimizer's update
      (false for an optimizer that replaces the base, or steps it several
      times per update).
    note: its settings besides ρ, for the page's limits paragraph.
  """

  label: str
  front: Callable[[Any], optax.GradientTransformation] | None
  rho_scale: float = 1.0
  wraps: bool = False
  every: int = 0
  build: Callable[[dict[str, Any], int, int], optax.GradientTransformation] | None = None
  is_base_at_rho_zero: bool = True
  note: str = ""


def sgd_base(h: dict[str, Any], total_steps: int) -> optax.GradientTransformation:
  """The shared base: ``add_decayed_weights(wd)``, SGD with momentum, cosine lr."""
  return optax.chain(
      optax.add_decayed_weights(h["wd"]),
      optax.sgd(lr_schedule(h, total_steps), momentum=MOMENTUM))


LOOKBEHIND_K = 2


def _wsam_decoupled(h, total_steps, num_data):
  del num_data
  return sam_optax.wsam_decoupled(
      sgd_base(h, total_steps), lr_schedule(h, total_steps), rho_value(h),
      gamma=0.88)


def _lookbehind(h, total_steps, num_data):
  # The base steps k times per update: its cosine spans k times the updates.
  del num_data
  return sam_optax.lookbehind_sam(
      sgd_base(h, LOOKBEHIND_K * total_steps), rho_value(h), k=LOOKBEHIND_K,
      alpha=0.5)


def _sampa(h, total_steps, num_data):
  # The extrapolation predicts the shared base: SGD with momentum and wd.
  del num_data
  return optax.chain(
      sam_optax.sampa(lr_schedule(h, total_steps), rho_value(h), lam=0.2,
                      momentum=MOMENTUM, weight_decay=h["wd"]),
      sgd_base(h, total_steps))


def _bsam(h, total_steps, num_data):
  # The prior's pull delta = prior_precision / N is the weight decay.
  return sam_optax.bsam(
      lr_schedule(h, total_steps), rho_value(h), num_data=num_data,
      prior_precision=h["wd"] * num_data)


VARIANTS: dict[str, Variant] = {
    "sgd": Variant("SGD", None),
    "sam": Variant("SAM", lambda r: sam_optax.sam(r)),
    "asam": Variant("ASAM", lambda r: sam_optax.asam(r), rho_scale=5.0,
                    note="ASAM η = 0.01"),
    "gsam": Variant("GSAM", lambda r: sam_optax.gsam(r, alpha=0.1),
                    note="GSAM α = 0.1 with a constant ρ"),
    "looksam": Variant(
        "LookSAM", lambda r: sam_optax.looksam(r, k=5, alpha=0.7), every=5,
        note="LookSAM k = 5 and α = 0.7, whose steps without the second pass"
             " add a stored direction of norm α‖g‖ whatever ρ"),
    "vasso": Variant("VaSSO", lambda r: sam_optax.vasso(r, theta=0.9),
                     note="VaSSO θ = 0.9"),
    "friendly_sam": Variant("F-SAM", lambda r: sam_optax.friendly_sam(r),
                            note="F-SAM σ = 1 and λ = 0.6"),
    "msam": Variant("MSAM", None, rho_scale=5.0, wraps=True,
                    note="MSAM evaluated at its unperturbed weights"),
    "sam_renorm": Variant("SAM, renormalize",
                          lambda r: sam_optax.sam(r, renormalize=True)),
    "gcsam": Variant("GCSAM", lambda r: sam_optax.gcsam(r),
                     note="GCSAM's ascent centralized per output filter"),
    "wsam": Variant("WSAM", lambda r: sam_optax.wsam(r, gamma=0.88),
                    note="WSAM γ = 0.88, a sharpness weight γ/(1−γ) ≈ 7.3,"
                         " coupled or decoupled (its step at the base's lr)"),
    "wsam_decoupled": Variant("WSAM, decoupled", None, build=_wsam_decoupled),
    "lookbehind": Variant(
        "Lookbehind-SAM", None, build=_lookbehind, is_base_at_rho_zero=False,
        note=f"Lookbehind-SAM k = {LOOKBEHIND_K} and α = 0.5, its base stepped"
             f" {LOOKBEHIND_K} times per update with the cosine spread over"
             " all of them"),
    "sam_2steps": Variant(
        "SAM, 2 ascent steps", lambda r: sam_optax.sam(r, num_ascent_steps=2),
        note="SAM with 2 ascent steps of ρ/2 (3 passes, as Lookbehind-SAM's)"),
    "gam": Variant("GAM", lambda r: sam_optax.gam(r),
                   note="GAM ρ′ = ρ/10, β0 = 0.5, β1 = 0.6, γ = 0.03"),
    "sampa": Variant(
        "SAMPa", None, build=_sampa, is_base_at_rho_zero=False,
        note="SAMPa λ = 0.2, its extrapolation predicting the momentum base,"
             " both gradients on the current batch"),
    "bsam": Variant(
        "bSAM", None, rho_scale=0.1, build=_bsam, is_base_at_rho_zero=False,
        note="bSAM (which replaces SGD) on SGD's lr grid and a tenth of its"
             " ρ grid, prior precision wd × N, damping 0.1, β = 0.9/0.999,"
             " evaluated at its mean"),
}
SGD_2X = "sgd_2x"
LABELS = {**{k: v.label for k, v in VARIANTS.items()}, SGD_2X: "SGD, 2× epochs"}


def lr_schedule(h: dict[str, Any], total_steps: int) -> optax.Schedule:
  """Cosine decay of ``h["lr"]``, times a linear warm-up over ``h["lr_warmup"]`` steps."""
  cosine = optax.cosine_decay_schedule(h["lr"], total_steps)
  if "lr_warmup" not in h:
    return cosine
  w = h["lr_warmup"]
  return lambda count: cosine(count) * jnp.where(
      w > 0, jnp.minimum(1.0, (count + 1) / jnp.maximum(w, 1.0)), 1.0)


def rho_value(h: dict[str, Any]) -> Any:
  """``h["rho"]``, or the schedule ``rho * min(1, count / h["rho_warmup"])``.

  For a positive warm-up ``W`` this is ``optax.linear_schedule(0, rho, W)``;
  it is written out so that ``W`` can be a traced hyperparameter (0 means no
  warm-up).
  """
  rho = h["rho"]
  if "rho_warmup" not in h:
    return rho
  w = h["rho_warmup"]
  return lambda count: rho * jnp.where(
      w > 0, jnp.minimum(1.0, count / jnp.maximum(w, 1.0)), 1.0)


def make_optimizer(key: str, num_data: int = 1) -> sweep.Optimizer:
  """The sweep optimizer of ``VARIANTS[key]`` on the shared SGD-momentum base.

  ``num_data`` is the training-set size, read by optimizers that model it
  (bSAM's posterior).
  """
  v = VARIANTS[key]

  def make(h, total_steps):
    if v.build is not None:
      return v.build(h, total_steps, num_data)
    base = sgd_base(h, total_steps)
    if v.wraps:
      return sam_optax.msam(base, rho_value(h))
    if v.front is None:
      return base
    return optax.chain(v.front(rho_value(h)), base)

  return sweep.Optimizer(
      v.label, make, sam_optax.msam_unperturbed if v.wraps else None)


# ---------------------------------------------------------------------------
# Data and settings.


class DataSpec(NamedTuple):
  """One data set of the comparison and its grid."""

  label: str
  load: Callable[[], data_lib.Dataset]
  batch: int
  lr: tuple[float, ...]
  wd: tuple[float, ...]
  models: dict[str, tuple[str, Callable[[], models.Model]]]


DATA: dict[str, DataSpec] = {
    "mnist1d": DataSpec(
        "MNIST-1D", lambda: data_lib.load_mnist1d(500), 128,
        lr=(0.1, 0.3), wd=(5e-4, 5e-3),
        models={"MLP": ("MLP 40-100-100-10", lambda: models.mlp((40, 100, 100, 10))),
                "CNN": ("1-D CNN, Conv(25) x3, kernels 5/3/3, stride 2",
                        cnn.mnist1d_cnn)}),
    "digits": DataSpec(
        "digits", lambda: data_lib.load_digits(250), 64,
        lr=(0.01, 0.05), wd=(5e-4, 2e-2),
        models={"MLP": ("MLP 64-256-256-10", lambda: models.mlp((64, 256, 256, 10))),
                "CNN": ("2-D CNN, 3x3 Conv 8/16/16, strides 1/2/2",
                        cnn.digits_cnn)}),
}

STABILITY = {
    "lr": 0.3, "wd": 5e-4, "sgd_lr": (0.3, 0.5), "rho": (0.2, 0.5),
    "noise": (0.0, 0.25), "warmup_epochs": 5,
}


@dataclasses.dataclass
class Settings:
  """What one invocation runs."""

  parts: list[str]
  epochs: int
  eval_every: int
  seeds: list[int]
  stability_seeds: list[int]
  noise: tuple[float, ...]
  optimizers: list[str]
  models: dict[str, list[str]]
  out: Path
  readme: Path | None
  quick: bool
  progress: bool
  added: list[str] | None = None

  def describe(self) -> dict[str, Any]:
    """The settings as plain JSON values."""
    return json.loads(json.dumps({
        "epochs": self.epochs, "eval_every": self.eval_every,
        "seeds": self.seeds, "stability_seeds": self.stability_seeds,
        "noise": list(self.noise), "optimizers": self.optimizers,
        "models": self.models, "quick": self.quick, "momentum": MOMENTUM,
        "rho_grid": list(RHO),
        "rho_scale": {k: VARIANTS[k].rho_scale for k in self.optimizers},
        "grids": {k: {"lr": list(d.lr), "wd": list(d.wd), "batch": d.batch}
                  for k, d in DATA.items()},
        "stability": STABILITY,
        "selection": "best mean final validation accuracy over seeds",
        "std": "sample standard deviation over seeds (ddof=1)",
        "collapse": "at least"
                    f" {sweep.COLLAPSE_TOP_FRACTION:.0%} of test predictions"
                    " in one class, or non-finite parameters",
    }))


def parse_args(argv: Sequence[str] | None) -> Settings:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--part", choices=("all", *PARTS, "none"), default="all",
                      help="which part to run; 'none' only rewrites the report page")
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--stability-seeds", type=int, default=5)
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
  parser.add_argument("--report", "--readme", dest="readme", type=Path, default=None,
                      help="rewrite this page's generalization region")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: 2 epochs, 2 seeds, SGD and SAM, MLPs")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--add", nargs="+", default=None, metavar="KEY",
                      choices=[k for k in VARIANTS if k != "sgd"],
                      help="train only these optimizers (and SGD, their"
                           " pairing reference) on the data-set parts and add"
                           " them to the stored JSON")
  args = parser.parse_args(argv)
  parts = list(PARTS) if args.part == "all" else (
      [] if args.part == "none" else [args.part])
  if args.add is not None:
    parts = [p for p in parts if p != "stability"]
  if args.quick:
    return Settings(
        parts=parts, epochs=2, eval_every=1, seeds=[0, 1],
        stability_seeds=[0, 1], noise=(0.0, 0.25),
        optimizers=["sgd", *(args.add or ["sam"])],
        models={"mnist1d": ["MLP"], "digits": ["MLP"]},
        out=args.out, readme=args.readme, quick=True,
        progress=not args.no_progress, added=args.add)
  eval_every = 10 if args.epochs % 10 == 0 else args.epochs
  return Settings(
      parts=parts, epochs=args.epochs, eval_every=eval_every,
      seeds=list(range(args.seeds)),
      stability_seeds=list(range(args.stability_seeds)), noise=NOISE,
      optimizers=(["sgd", *args.add] if args.add else list(VARIANTS)),
      models={k: list(d.models) for k, d in DATA.items()},
      out=args.out, readme=args.readme, quick=False,
      progress=not args.no_progress, added=args.add)


def noise_key(p: float) -> str:
  return f"{round(100 * p)}"


def build_problem(
    ds: data_lib.Dataset, noise_levels: Sequence[float], seeds: Sequence[int]
) -> tuple[sweep.Problem, list[tuple[float, int]]]:
  """One group per (noise level, seed): exact symmetric noise on train and val."""
  groups = [(p, s) for p in noise_levels for s in seeds]
  y_tr = np.stack([noise.noisy_labels(ds.y_train_clean, p, ds.num_classes, s, 0)
                   for p, s in groups])
  y_va = np.stack([noise.noisy_labels(ds.y_val_clean, p, ds.num_classes, s, 1)
                   for p, s in groups])
  problem = sweep.Problem(
      x_train=ds.x_train, y_train=y_tr, y_train_clean=ds.y_train_clean,
      x_val=ds.x_val, y_val=y_va, x_test=ds.x_test, y_test=ds.y_test,
      num_classes=ds.num_classes)
  return problem, groups


def grid(**axes: Sequence[float]) -> dict[str, np.ndarray]:
  """The Cartesian product of ``axes``, one array per name, in row-major order."""
  names = list(axes)
  combos = list(itertools.product(*(axes[n] for n in names)))
  return {n: np.asarray([c[i] for c in combos], np.float32)
          for i, n in enumerate(names)}


# ---------------------------------------------------------------------------
# Cost of one step.


def step_flops(model: models.Model, key: str, x: np.ndarray, y: np.ndarray,
               rho: float, num_data: int = 1) -> float | None:
  """XLA's FLOPs of one unbatched training step of optimizer ``key``."""
  opt = make_optimizer(key, num_data)
  tx = opt.make({"lr": 0.1, "wd": 5e-4, "rho": rho}, 1000)
  params = model.init(jax.random.PRNGKey(0))
  _, flops = measure.compile_with_flops(
      make_train_step(model.apply, tx), params, tx.init(params),
      jnp.asarray(x), jnp.asarray(y))
  return flops


def optimizer_costs(model: models.Model, problem: sweep.Problem, batch: int,
                    keys: Sequence[str]) -> dict[str, dict[str, Any]]:
  """FLOPs per step of every optimizer, absolute and relative to SGD.

  For LookSAM, whose second pass runs every ``k`` steps, the figure is
  amortized: ``(f_pass + (k - 1) f_skip) / k``, ``f_skip`` from rho = 0.
  """
  x, y = problem.x_train[:batch], problem.y_train[0, :batch]
  out = {}
  for key in keys:
    v = VARIANTS[key]
    f = step_flops(model, key, x, y, RHO[0] * v.rho_scale,
                   len(problem.y_train_clean))
    if v.every and f is not None:
      f_skip = step_flops(model, key, x, y, 0.0)
      f = (f + (v.every - 1) * f_skip) / v.every
    out[key] = {"flops_per_step": f}
  f0 = out["sgd"]["flops_per_step"]
  for c in out.values():
    c["flops_ratio"] = (c["flops_per_step"] / f0
                        if c["flops_per_step"] and f0 else None)
  return out


# ---------------------------------------------------------------------------
# Selection and summaries.


def rows_of(groups: Sequence[tuple[float, int]], p: float) -> np.ndarray:
  return np.asarray([i for i, (q, _) in enumerate(groups) if q == p])


def select(res: sweep.SweepResult, rows: np.ndarray,
           candidates: np.ndarray | None = None) -> int:
  """Configuration with the best mean final validation accuracy over ``rows``."""
  val = res.final("val_acc")[rows].mean(axis=0).astype(np.float64)
  if candidates is not None:
    val = np.where(candidates, val, -np.inf)
  return int(np.argmax(val))


def hparams_at(res: sweep.SweepResult, row: int, idx: int) -> dict[str, float]:
  return {k: float(v[row, idx]) for k, v in res.hparams.items()}


METRICS = ("test_acc", "val_acc", "train_acc", "train_acc_true", "fit_clean",
           "fit_noisy", "noisy_true", "test_loss", "train_loss")


def selection_summary(res: sweep.SweepResult, rows: np.ndarray, idx: int,
                      sgd_test: np.ndarray | None) -> dict[str, Any]:
  """Per-seed results of configuration ``idx`` over the groups ``rows``."""
  out: dict[str, Any] = {"index": idx, "hparams": hparams_at(res, rows[0], idx)}
  for m in METRICS:
    vals = res.final(m)[rows, idx]
    out[m] = stats.summary(vals) if np.all(np.isfinite(vals)) else None
  out["collapsed"] = int(res.collapsed()[rows, idx].sum())
  out["curve_test_acc"] = res.history["test_acc"][rows, idx].tolist()
  if sgd_test is not None:
    out["vs_sgd"] = stats.paired(res.final("test_acc")[rows, idx], sgd_test)
  return out


def summarize_model(results: dict[str, sweep.SweepResult],
                    groups: list[tuple[float, int]],
                    noise_levels: Sequence[float]) -> dict[str, Any]:
  """Tuned and drop-in selections per noise level, paired with tuned SGD."""
  out = {}
  sgd = results["sgd"]
  for p in noise_levels:
    rows = rows_of(groups, p)
    i_sgd = select(sgd, rows)
    sgd_hp = hparams_at(sgd, rows[0], i_sgd)
    sgd_test = sgd.final("test_acc")[rows, i_sgd]
    entry = {}
    for key, res in results.items():
      val = res.final("val_acc")[rows].mean(axis=0)
      collapsed = res.collapsed()[rows]
      e: dict[str, Any] = {
          "configs": [hparams_at(res, rows[0], c) for c in range(val.size)],
          "mean_val_acc": val.tolist(),
          "collapsed_runs": int(collapsed.sum()),
          "collapsed_per_config": collapsed.sum(axis=0).tolist(),
          "runs": int(collapsed.size),
          "label_flips": [res.label_flips[r] for r in rows],
          "fingerprints": [res.fingerprints[r] for r in rows],
      }
      ref = None if key == "sgd" else sgd_test
      e["tuned"] = selection_summary(res, rows, select(res, rows), ref)
      if key not in ("sgd", SGD_2X):
        same = np.asarray([
            np.isclose(res.hparams["lr"][rows[0], c], sgd_hp["lr"])
            and np.isclose(res.hparams["wd"][rows[0], c], sgd_hp["wd"])
            for c in range(val.size)])
        if same.any():
          e["dropin"] = selection_summary(res, rows, select(res, rows, same), ref)
      entry[key] = e
    out[noise_key(p)] = entry
  return out


# ---------------------------------------------------------------------------
# Parts.


def run_dataset(name: str, s: Settings, sgd_2x: bool = True) -> dict[str, Any]:
  """All optimizers on one data set: both models, every noise level.

  ``sgd_2x=False`` leaves out SGD with twice the epochs (for ``--add``).
  """
  spec = DATA[name]
  t0 = time.perf_counter()
  ds = spec.load()
  problem, groups = build_problem(ds, s.noise, s.seeds)
  seeds_g = [seed for _, seed in groups]
  common = {"epochs": s.epochs, "batch_size": spec.batch,
            "eval_every": s.eval_every, "progress": s.progress}
  part: dict[str, Any] = {
      "label": spec.label,
      "data": {"n_train": len(ds.y_train), "n_val": len(ds.y_val),
               "n_test": len(ds.y_test), "features": int(ds.x_train.shape[1]),
               "batch": spec.batch},
      "models": {},
  }
  keys = [k for k in s.optimizers if k != "sgd"]
  for model_name in s.models[name]:
    desc, make_model = spec.models[model_name]
    model = make_model()
    tag = f"{spec.label} {model_name}"
    results: dict[str, sweep.SweepResult] = {}
    results["sgd"] = sweep.train_sweep(
        model, problem, make_optimizer("sgd"), grid(lr=spec.lr, wd=spec.wd),
        seeds_g, desc=f"{tag} SGD", **common)
    # SGD's selection per noise level, as per-group hyperparameters.
    sgd_sel = {p: select(results["sgd"], rows_of(groups, p)) for p in s.noise}
    sgd_hp = {k: np.asarray([results["sgd"].hparams[k][g, sgd_sel[p]]
                             for g, (p, _) in enumerate(groups)])
              for k in ("lr", "wd")}
    if sgd_2x:
      results[SGD_2X] = sweep.train_sweep(
          model, problem, make_optimizer("sgd"),
          {k: v[:, None] for k, v in sgd_hp.items()}, seeds_g,
          desc=f"{tag} SGD 2x", **{**common, "epochs": 2 * s.epochs})
    for key in keys:
      v = VARIANTS[key]
      g = grid(lr=spec.lr, rho=tuple(r * v.rho_scale for r in RHO))
      hp = {**g, "wd": np.repeat(sgd_hp["wd"][:, None], g["lr"].size, axis=1)}
      results[key] = sweep.train_sweep(
          model, problem, make_optimizer(key, len(ds.y_train)), hp, seeds_g,
          desc=f"{tag} {v.label}", **common)
    costs = optimizer_costs(model, problem, spec.batch, s.optimizers)
    if sgd_2x:
      costs[SGD_2X] = dict(costs["sgd"])
    for key, res in results.items():
      c = costs[key]
      c["steps_per_run"] = res.epochs * res.steps_per_epoch
      c["gflops_per_run"] = (c["flops_per_step"] * c["steps_per_run"] / 1e9
                             if c["flops_per_step"] else None)
      c["s_per_run"] = res.run_s / res.num_runs
      c["compile_s"] = res.compile_s
      c["runs"] = res.num_runs
    part["models"][model_name] = {
        "description": desc,
        "params": models.num_params(model.init(jax.random.PRNGKey(0))),
        "costs": costs,
        "noise": summarize_model(results, groups, s.noise),
        "eval_epochs": results["sgd"].eval_epochs,
    }
  part["wall_s"] = time.perf_counter() - t0
  return part


def stability_configs(warmup_steps: int) -> dict[str, dict[str, np.ndarray]]:
  """Hyperparameters of the stability runs, per optimizer."""
  st = STABILITY
  n_sgd = len(st["sgd_lr"])
  sam_rows = [(r, rw, lw) for r in st["rho"]
              for rw, lw in ((0, 0), (warmup_steps, 0), (0, warmup_steps))]
  renorm_rows = [(r, rw) for r in st["rho"] for rw in (0, warmup_steps)]

  def arr(x):
    return np.asarray(x, np.float32)

  return {
      "sgd": {"lr": arr(st["sgd_lr"]), "wd": arr([st["wd"]] * n_sgd)},
      "sam": {"lr": arr([st["lr"]] * len(sam_rows)),
              "wd": arr([st["wd"]] * len(sam_rows)),
              "rho": arr([r for r, _, _ in sam_rows]),
              "rho_warmup": arr([w for _, w, _ in sam_rows]),
              "lr_warmup": arr([w for _, _, w in sam_rows])},
      "sam_renorm": {"lr": arr([st["lr"]] * len(renorm_rows)),
                     "wd": arr([st["wd"]] * len(renorm_rows)),
                     "rho": arr([r for r, _ in renorm_rows]),
                     "rho_warmup": arr([w for _, w in renorm_rows])},
  }


def stability_label(key: str, hp: dict[str, float]) -> str:
  if key == "sgd":
    return f"SGD, lr {hp['lr']:g}"
  text = f"{VARIANTS[key].label}, ρ={hp['rho']:g}"
  if hp.get("rho_warmup", 0) > 0:
    text += ", ρ warm-up"
  if hp.get("lr_warmup", 0) > 0:
    text += ", lr warm-up"
  return text


def run_stability(s: Settings) -> dict[str, Any]:
  """The 1-D CNN at lr 0.3: collapse with and without the remedies."""
  t0 = time.perf_counter()
  st = STABILITY
  ds = DATA["mnist1d"].load()
  noise_levels = st["noise"]
  problem, groups = build_problem(ds, noise_levels, s.stability_seeds)
  seeds_g = [seed for _, seed in groups]
  batch = DATA["mnist1d"].batch
  steps = len(ds.y_train) // batch
  warmup_steps = min(st["warmup_epochs"], max(1, s.epochs // 2)) * steps
  # The smoke test checks the plumbing with the faster-compiling MLP.
  model_name = "MLP" if s.quick else "CNN"
  desc, make_model = DATA["mnist1d"].models[model_name]
  model = make_model()
  rows_out = []
  configs = stability_configs(warmup_steps)
  if s.quick:
    configs.pop("sam_renorm")
  for key, hp in configs.items():
    res = sweep.train_sweep(
        model, problem, make_optimizer(key), hp, seeds_g, epochs=s.epochs,
        batch_size=batch, eval_every=s.eval_every, progress=s.progress,
        desc=f"stability {VARIANTS[key].label}")
    collapsed_at = _first_collapse(res)
    for c in range(next(iter(hp.values())).size):
      h = hparams_at(res, 0, c)
      row = {"optimizer": key, "label": stability_label(key, h), "hparams": h,
             "noise": {}}
      for p in noise_levels:
        rows = rows_of(groups, p)
        test = res.final("test_acc")[rows, c]
        coll = res.collapsed()[rows, c]
        row["noise"][noise_key(p)] = {
            "collapsed": int(coll.sum()), "runs": int(coll.size),
            "test_acc": stats.summary(test),
            "test_acc_not_collapsed": (stats.summary(test[~coll])
                                       if (~coll).any() else None),
            "collapse_epoch": [None if e is None else int(e)
                               for e in collapsed_at[rows, c]],
            "fingerprints": [res.fingerprints[r] for r in rows],
        }
      rows_out.append(row)
  return {
      "model": desc,
      "lr": st["lr"], "wd": st["wd"], "warmup_steps": warmup_steps,
      "warmup_epochs": warmup_steps // steps, "epochs": s.epochs,
      "seeds": s.stability_seeds, "rows": rows_out,
      "wall_s": time.perf_counter() - t0,
  }


def _first_collapse(res: sweep.SweepResult) -> np.ndarray:
  """First evaluated epoch at which each run was collapsed (None if never)."""
  top = res.history["test_top_fraction"] >= sweep.COLLAPSE_TOP_FRACTION
  bad = top | (res.history["finite"] < 1)
  out = np.full(bad.shape[:2], None, dtype=object)
  for idx in np.ndindex(*bad.shape[:2]):
    hits = np.flatnonzero(bad[idx])
    if hits.size:
      out[idx] = res.eval_epochs[hits[0]]
  return out


# ---------------------------------------------------------------------------
# Report: tables, report region, plots.


def _settings_order(result: dict[str, Any]) -> list[tuple[str, str, str]]:
  """(data set, model, noise key) of every setting present, in a fixed order."""
  out = []
  for name in ("mnist1d", "digits"):
    part = result.get("parts", {}).get(name)
    if not part:
      continue
    for model_name, m in part["models"].items():
      out.extend((name, model_name, n) for n in m["noise"])
  return out


def _setting_label(result, name, model_name, nk, short=False) -> str:
  part = result["parts"][name]
  noise_text = "clean" if nk == "0" else f"{nk}%"
  if short:
    return f"{part['label']} {model_name} {noise_text}"
  return f"{model_name}, {noise_text}"


def _pct(summary: dict[str, Any] | None) -> str:
  return "–" if summary is None else stats.pct(summary["mean"], summary["std"])


def _delta(d: dict[str, Any]) -> str:
  """Mean paired difference in points, signed, without a negative zero."""
  x = round(100 * d["mean"], 1)
  return f"{x + 0.0:+.1f}"


def _diff(d: dict[str, Any]) -> str:
  return f"{_delta(d)} ({d['wins']}/{d['n']})"


def _optimizer_keys(result: dict[str, Any]) -> list[str]:
  keys = result["settings"]["optimizers"]
  return [keys[0], SGD_2X, *keys[1:]]


def tuned_table(result: dict[str, Any], name: str) -> str:
  """Test accuracy at each optimizer's own selected setting, one data set."""
  part = result["parts"][name]
  cols = [(m, n) for m, md in part["models"].items() for n in md["noise"]]
  header = ["optimizer", *(_setting_label(result, name, m, n) for m, n in cols)]
  rows = []
  for key in _optimizer_keys(result):
    cells = [LABELS[key]]
    for m, n in cols:
      e = part["models"][m]["noise"][n][key]["tuned"]
      cell = _pct(e["test_acc"])
      if "vs_sgd" in e:
        d = e["vs_sgd"]
        cell += f" ({_delta(d)}, {d['wins']}/{d['n']})"
      cells.append(cell)
    rows.append(cells)
  return stats.markdown_table(header, rows)


def dropin_table(result: dict[str, Any]) -> str:
  """Paired difference from tuned SGD at SGD's lr and weight decay."""
  order = _settings_order(result)
  header = ["optimizer", *(_setting_label(result, *o, short=True) for o in order)]
  rows = []
  for key in _optimizer_keys(result):
    if key == SGD_2X:
      continue
    cells = [LABELS[key]]
    for name, m, n in order:
      e = result["parts"][name]["models"][m]["noise"][n][key]
      if key == "sgd":
        cells.append(_pct(e["tuned"]["test_acc"]))
      else:
        cells.append(_diff(e["dropin"]["vs_sgd"]) if "dropin" in e else "–")
    rows.append(cells)
  return stats.markdown_table(header, rows)


def noise_fit_table(result: dict[str, Any]) -> str:
  """Training-set fit of correctly vs wrongly labelled examples (tuned)."""
  order = [o for o in _settings_order(result) if o[2] != "0"]
  header = ["optimizer",
            *(_setting_label(result, *o, short=True) for o in order)]
  rows = []
  for key in _optimizer_keys(result):
    cells = [LABELS[key]]
    for name, m, n in order:
      e = result["parts"][name]["models"][m]["noise"][n][key]["tuned"]
      clean, noisy = e["fit_clean"], e["fit_noisy"]
      cells.append("–" if clean is None or noisy is None else
                   f"{100 * clean['mean']:.0f} / {100 * noisy['mean']:.0f}")
    rows.append(cells)
  return stats.markdown_table(header, rows)


def cost_table(result: dict[str, Any]) -> str:
  """FLOPs per step relative to SGD and measured seconds per run, per model."""
  models_present = [(name, m) for name in ("mnist1d", "digits")
                    if name in result.get("parts", {})
                    for m in result["parts"][name]["models"]]
  head = [f"{result['parts'][n]['label']} {m}" for n, m in models_present]
  header = ["optimizer", *(f"FLOPs × SGD, {h}" for h in head),
            *(f"s/run, {h}" for h in head)]
  rows = []
  for key in _optimizer_keys(result):
    cells = [LABELS[key]]
    for kind in ("flops_ratio", "s_per_run"):
      for n, m in models_present:
        c = result["parts"][n]["models"][m]["costs"][key]
        v = c[kind]
        if kind == "flops_ratio" and key == SGD_2X and v is not None:
          v = 2 * v  # per run, twice the steps
        mark = "†" if kind == "s_per_run" and c.get("added") else ""
        cells.append("–" if v is None else f"{v:.2f}{mark}")
    rows.append(cells)
  return stats.markdown_table(header, rows)


def stability_table(result: dict[str, Any]) -> str:
  st = result["parts"]["stability"]
  nks = list(st["rows"][0]["noise"])
  header = [f"optimizer (lr {st['lr']:g} unless noted)"]
  for nk in nks:
    label = "clean" if nk == "0" else f"{nk}% noise"
    header += [f"collapsed, {label}", f"test acc %, {label}"]
  rows = []
  for r in st["rows"]:
    cells = [r["label"]]
    for nk in nks:
      e = r["noise"][nk]
      epochs = sorted({x for x in e["collapse_epoch"] if x is not None})
      when = ("" if not epochs else f" (epoch {epochs[0]})" if len(epochs) == 1
              else f" (epochs {epochs[0]}–{epochs[-1]})")
      cells += [f"{e['collapsed']}/{e['runs']}{when}", _pct(e["test_acc"])]
    rows.append(cells)
  return stats.markdown_table(header, rows)


def summary_sentences(result: dict[str, Any]) -> list[str]:
  """Counts that the tables support, written out."""
  order = _settings_order(result)
  out = []
  if not order:
    return out
  for mode, text in (("tuned", "at its own selected setting"),
                     ("dropin", "at SGD's lr and weight decay")):
    parts = []
    for key in result["settings"]["optimizers"][1:]:
      ahead, wins, n_runs, n_set = 0, 0, 0, 0
      for name, m, n in order:
        e = result["parts"][name]["models"][m]["noise"][n][key]
        if mode not in e:
          continue
        d = e[mode]["vs_sgd"]
        n_set += 1
        ahead += d["mean"] > 0
        wins += d["wins"]
        n_runs += d["n"]
      if n_set:
        parts.append(f"{LABELS[key]} {ahead}/{n_set} ({wins}/{n_runs} seeds)")
    out.append(f"Settings where the mean paired difference from tuned SGD is"
               f" positive, {text}: " + ", ".join(parts) + ".")
  e2 = [result["parts"][name]["models"][m]["noise"][n][SGD_2X]["tuned"]["vs_sgd"]
        for name, m, n in order]
  out.append(
      f"SGD given twice the epochs (SAM's compute) beats SGD on the mean in"
      f" {sum(d['mean'] > 0 for d in e2)}/{len(e2)} settings.")
  return out


def collapse_table(result: dict[str, Any]) -> str:
  """Collapsed runs of every tuning grid, summed over noise levels, per model."""
  models_present = [(name, m) for name in ("mnist1d", "digits")
                    if name in result.get("parts", {})
                    for m in result["parts"][name]["models"]]
  header = ["optimizer", *(f"{result['parts'][n]['label']} {m}"
                           for n, m in models_present)]
  rows = []
  for key in _optimizer_keys(result):
    cells = [LABELS[key]]
    for name, m in models_present:
      noise_entries = result["parts"][name]["models"][m]["noise"].values()
      c = sum(e[key]["collapsed_runs"] for e in noise_entries)
      n = sum(e[key]["runs"] for e in noise_entries)
      cells.append(f"{c}/{n}")
    rows.append(cells)
  return stats.markdown_table(header, rows)


def limits(result: dict[str, Any]) -> str:
  """What the tables do not show, from the settings."""
  s = result["settings"]
  n = len(s["seeds"])
  notes = [VARIANTS[k].note for k in s["optimizers"]
           if k in VARIANTS and VARIANTS[k].note]
  return (
      f"Limits: {n} seeds per setting and 2 × 2 grids support no claim of"
      " significance (read the win counts and the spread, not the last digit;"
      " one validation split per data set, with noisy labels, does the"
      f" selecting). All runs last {s['epochs']} epochs; larger ρ needs"
      " longer training, so longer runs may favour the SAM family more. The"
      " variants use their papers' defaults besides ρ"
      f" ({'; '.join(notes)}) and share SGD's weight decay:"
      " every optimizer chooses among 4 configurations. The seconds per run"
      " were measured on a machine shared with other work."
      + rerun_sentence(result)
  )


def rerun_sentence(result: dict[str, Any]) -> str:
  """How far SGD rerun by ``--add`` is from the stored SGD, if anywhere.

  An added optimizer is paired with the SGD of its own run (same data,
  same seeds); the SGD rows of the tables are the stored run's.
  """
  worst: dict[str, dict[str, float]] = {}
  for name, model_name, nk in _settings_order(result):
    e = result["parts"][name]["models"][model_name]["noise"][nk]["sgd"]
    label = result["parts"][name]["label"]
    for keys, r in e.get("sgd_rerun", {}).items():
      d = abs(r["test_acc"]["mean"] - r["stored_test_acc"]["mean"])
      per = worst.setdefault(keys, {})
      per[label] = max(per.get(label, 0.0), d)
  if not worst:
    return ""
  runs = []
  for keys, per in worst.items():
    added = "; ".join(LABELS[x] for x in keys.split(","))
    gaps = ", ".join("identical" + f" on {label}" if d == 0 else
                     f"up to {100 * d:.1f} points on {label}"
                     for label, d in per.items())
    runs.append(f"the run adding {added}: {gaps}")
  return (" Optimizers added later (`--add`) are paired with SGD rerun in their"
          " own run, on the same data and seeds; that rerun's mean test"
          " accuracy differs from the SGD shown by (" + "; ".join(runs) + ").")


def stability_sentences(result: dict[str, Any]) -> list[str]:
  st = result["parts"]["stability"]

  def tot(row):
    c = sum(e["collapsed"] for e in row["noise"].values())
    n = sum(e["runs"] for e in row["noise"].values())
    return c, n

  by = {r["label"]: tot(r) for r in st["rows"]}
  plain = [(lab, c, n) for lab, (c, n) in by.items()
           if lab.startswith("SAM, ρ") and "warm-up" not in lab]
  out = []
  for lab, c, n in plain:
    rw = by.get(lab + ", ρ warm-up")
    lw = by.get(lab + ", lr warm-up")
    rn = by.get(lab.replace("SAM,", "SAM, renormalize,"))
    rnw = by.get(lab.replace("SAM,", "SAM, renormalize,") + ", ρ warm-up")
    bits = [f"{lab}: {c}/{n} runs collapsed"]
    if rn:
      bits.append(f"with renormalize {rn[0]}/{rn[1]}")
    if rw:
      bits.append(f"with a {st['warmup_epochs']}-epoch ρ warm-up {rw[0]}/{rw[1]}")
    if rnw:
      bits.append(f"with renormalize and the ρ warm-up {rnw[0]}/{rnw[1]}")
    if lw:
      bits.append(f"with a {st['warmup_epochs']}-epoch lr warm-up {lw[0]}/{lw[1]}")
    out.append(", ".join(bits) + ".")
  sgd = [(lab, c, n) for lab, (c, n) in by.items() if lab.startswith("SGD")]
  out.append("SGD: " + ", ".join(f"{lab.split(', ')[1]} {c}/{n}" for lab, c, n in sgd)
             + " runs collapsed.")
  return out


def _rho_scales(settings: dict[str, Any]) -> str:
  scaled = {}
  for key, scale in settings["rho_scale"].items():
    if scale != 1:
      scaled.setdefault(scale, []).append(LABELS[key])
  return "".join(f" (×{scale:g} for {' and '.join(labels)})"
                 for scale, labels in scaled.items())


def readme_region(result: dict[str, Any]) -> str:
  """The generated report text between the markers."""
  s = result["settings"]
  env = result["environment"]
  wall = result.get("wall_s", {})
  total = sum(v for v in wall.values())
  lines = [
      f"Generated by `{result['command']}` from"
      f" `benchmarks/results/{JSON_NAME}` (machine: {env['cpu_count']} CPU"
      f" cores, {env['platform']}, jax {env['jax']}, optax {env['optax']};"
      f" {total / 60:.0f} min wall clock). Base optimizer for all:"
      f" `add_decayed_weights(wd)`, `sgd(cosine(lr), momentum={MOMENTUM})`;"
      f" {s['epochs']} epochs; {len(s['seeds'])} paired seeds (same"
      " initialization, batch order and noisy labels for every optimizer);"
      " symmetric label noise flips exactly round(p·N) training and"
      " validation labels, test labels are clean. Grids:"
      + ";".join(f" {DATA[k].label} (batch {g['batch']}) lr {g['lr']}, wd"
                 f" {g['wd']}" for k, g in s["grids"].items())
      + f"; ρ {s['rho_grid']}" + _rho_scales(s) + ". SGD tunes lr × wd, the"
      " SAM family lr × ρ at SGD's selected wd; each"
      " picks the configuration with the best mean final validation accuracy"
      " (noisy labels, taken from the training set).",
      "",
  ]
  for name in ("mnist1d", "digits"):
    if name not in result.get("parts", {}):
      continue
    part = result["parts"][name]
    descs = "; ".join(f"{m}: {md['description']}"
                      for m, md in part["models"].items())
    lines += [
        (f"**{part['label']}, tuned** ({part['data']['n_train']} train /"
        f" {part['data']['n_val']} val / {part['data']['n_test']} test;"
        f" {descs}). Test accuracy %, mean ± std over seeds; in brackets the"
        " paired difference from tuned SGD in points and the seeds won."),
        "",
        tuned_table(result, name),
        "",
    ]
  if _settings_order(result):
    lines += [
        ("**Drop-in**: each variant at SGD's selected lr and wd (only ρ"
        " chosen on validation); paired difference from tuned SGD in points"
        " (seeds won); the SGD row is its test accuracy."),
        "",
        dropin_table(result),
        "",
        ("**Label noise**: fit of the training set at the tuned setting,"
        " % of correctly labelled examples predicted as labelled / % of"
        " wrongly labelled examples predicted as their wrong label"
        " (memorization)."),
        "",
        noise_fit_table(result),
        "",
        ("**Compute**: XLA FLOPs of one training step relative to SGD's (LookSAM"
        " amortized over its k = 5 steps; per run for SGD 2×), and measured"
        " seconds per run (wall clock of a sweep, evaluations included, divided"
        " by its runs; one run after another on this machine, shared with"
        " other work, so the seconds are indicative only; † marks optimizers"
        " added later with `--add`, timed in another run under another load,"
        " not comparable with the rows above them)."),
        "",
        cost_table(result),
        "",
        ("**Collapse** in the tuning grids: runs ending with at least"
         f" {sweep.COLLAPSE_TOP_FRACTION:.0%} of the test predictions in one"
         " class (every configuration, seed and noise level of the grid)."),
        "",
        collapse_table(result),
        "",
        " ".join(summary_sentences(result)),
        "",
        "![test accuracy vs FLOPs](benchmarks/results/generalization_compute.png)",
        "",
    ]
  if _settings_order(result):
    lines += [limits(result), ""]
  if "stability" in result.get("parts", {}):
    st = result["parts"]["stability"]
    lines += [
        (f"**Stability** (MNIST-1D, {st['model']}, lr {st['lr']}, wd {st['wd']},"
        f" {st['epochs']} epochs, {len(st['seeds'])} seeds per noise level;"
        f" warm-ups are linear over the first {st['warmup_epochs']} epochs,"
        f" ρ warm-up = `optax.linear_schedule(0, rho, {st['warmup_steps']})`;"
        " in brackets the first evaluation, every"
        f" {result['settings']['eval_every']} epochs, at which runs were"
        " collapsed):"),
        "",
        stability_table(result),
        "",
        " ".join(stability_sentences(result)),
        "",
        "![stability](benchmarks/results/generalization_stability.png)",
    ]
  return "\n".join(lines).rstrip()


def write_readme(readme: Path, result: dict[str, Any]) -> None:
  readme_lib.replace_region(readme, START, END, readme_region(result))


def plot_compute(result: dict[str, Any], path: Path) -> None:
  """Test accuracy (tuned) vs FLOPs per run, one panel per setting."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [(n, m) for n in ("mnist1d", "digits") if n in result["parts"]
            for m in result["parts"][n]["models"]]
  nks = list(result["parts"][panels[0][0]]["models"][panels[0][1]]["noise"])
  fig, axes = plt.subplots(len(panels), len(nks), squeeze=False,
                           figsize=(4.2 * len(nks), 3.2 * len(panels)))
  keys = _optimizer_keys(result)
  colors = plt.get_cmap("tab10")
  markers = "os^vD<>ph*"
  for i, (name, m) in enumerate(panels):
    md = result["parts"][name]["models"][m]
    for j, nk in enumerate(nks):
      ax = axes[i][j]
      for k, key in enumerate(keys):
        c = md["costs"][key]
        e = md["noise"][nk][key]["tuned"]["test_acc"]
        if c["gflops_per_run"] is None:
          continue
        ax.errorbar(c["gflops_per_run"], 100 * e["mean"], yerr=100 * e["std"],
                    fmt=markers[k % len(markers)], color=colors(k % 10),
                    label=LABELS[key], capsize=2)
      ax.set_title(_setting_label(result, name, m, nk, short=True), fontsize=9)
      ax.grid(alpha=0.3)
      if j == 0:
        ax.set_ylabel("test accuracy % (tuned)")
      if i == len(panels) - 1:
        ax.set_xlabel("GFLOPs per run (XLA, training steps)")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 10),
             fontsize=8)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_stability(result: dict[str, Any], path: Path) -> None:
  """Collapsed runs and test accuracy per stability configuration."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  st = result["parts"]["stability"]
  rows = st["rows"]
  nks = list(rows[0]["noise"])
  y = np.arange(len(rows))
  fig, (ax_c, ax_a) = plt.subplots(1, 2, figsize=(12, 0.35 * len(rows) + 1.6),
                                   sharey=True)
  h = 0.8 / len(nks)
  for j, nk in enumerate(nks):
    label = "clean" if nk == "0" else f"{nk}% noise"
    frac = [r["noise"][nk]["collapsed"] / r["noise"][nk]["runs"] for r in rows]
    acc = [100 * r["noise"][nk]["test_acc"]["mean"] for r in rows]
    err = [100 * r["noise"][nk]["test_acc"]["std"] for r in rows]
    ax_c.barh(y + j * h, frac, h, label=label)
    ax_a.barh(y + j * h, acc, h, xerr=err, label=label, capsize=2)
  ax_c.set_yticks(y + h * (len(nks) - 1) / 2, [r["label"] for r in rows],
                  fontsize=8)
  ax_c.invert_yaxis()
  ax_c.set(xlabel="fraction of runs collapsed", xlim=(0, 1),
           title=f"{st['model']}, lr {st['lr']}: collapse")
  ax_a.set(xlabel="test accuracy % (mean ± std)", title="test accuracy")
  for ax in (ax_c, ax_a):
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ---------------------------------------------------------------------------


def environment() -> dict[str, Any]:
  return {
      "python": platform.python_version(), "jax": jax.__version__,
      "optax": optax.__version__, "sam_optax": sam_optax.__version__,
      "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
  }


def command(s: Settings) -> str:
  cmd = "python benchmarks/generalization.py"
  if s.quick:
    cmd += " --quick"
  return cmd + " --report docs/benchmarks/generalization.md"


SAME_SETTINGS = ("epochs", "eval_every", "seeds", "noise", "quick", "momentum",
                 "rho_grid", "grids")


def merge_added(result: dict[str, Any], name: str, part: dict[str, Any],
                keys: Sequence[str]) -> dict[str, Any]:
  """Adds optimizers ``keys`` of a fresh ``part`` to the stored ``result``.

  The fresh part's SGD must have trained on the same data (the label-noise
  fingerprints agree); its tuned test accuracy, rerun, is recorded beside
  the stored one (``sgd_rerun``) so that a drift shows.
  """
  stored = result["parts"][name]
  for model_name, new in part["models"].items():
    old = stored["models"][model_name]
    for nk, entry in new["noise"].items():
      old_sgd, new_sgd = old["noise"][nk]["sgd"], entry["sgd"]
      if old_sgd["fingerprints"] != new_sgd["fingerprints"]:
        raise SystemExit(
            f"--add: the {name} {model_name} data ({nk}% noise) differ from"
            " the stored run's; rerun the whole benchmark.")
      old_sgd.setdefault("sgd_rerun", {})[",".join(keys)] = {
          "test_acc": new_sgd["tuned"]["test_acc"],
          "stored_test_acc": old_sgd["tuned"]["test_acc"]}
      for key in keys:
        old["noise"][nk][key] = entry[key]
    for key in keys:
      old["costs"][key] = {**new["costs"][key], "added": True}
  stored.setdefault("added_wall_s", {})[",".join(keys)] = part["wall_s"]
  return result


def _main_add(s: Settings, path: Path) -> dict[str, Any]:
  """``--add``: the new optimizers and SGD, merged into the stored JSON."""
  if not path.exists():
    raise SystemExit(f"--add needs a stored {path}; run the benchmark first.")
  result = json.loads(path.read_text())
  described = s.describe()
  for k in SAME_SETTINGS:
    if result["settings"].get(k) != described[k]:
      raise SystemExit(
          f"--add: setting {k!r} is {described[k]!r} here but"
          f" {result['settings'].get(k)!r} in {path}; pass the stored"
          " run's options.")
  keys = [k for k in s.added if k != "sgd"]
  settings = result["settings"]
  settings["optimizers"] += [k for k in keys if k not in settings["optimizers"]]
  settings["rho_scale"].update({k: VARIANTS[k].rho_scale for k in keys})
  for part in tqdm(s.parts, desc="parts", disable=not s.progress):
    if part not in result["parts"]:
      raise SystemExit(f"--add: {path} holds no {part!r} part to add to.")
    merge_added(result, part, run_dataset(part, s, sgd_2x=False), keys)
    path.write_text(json.dumps(result, indent=1))
  flag = " --quick" if s.quick else ""
  result["command"] += (f"; python benchmarks/generalization.py{flag} --add"
                        f" {' '.join(keys)} --report docs/benchmarks/generalization.md")
  path.write_text(json.dumps(result, indent=1))
  return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the requested parts, writes JSON, plots and the report page; returns the JSON."""
  s = parse_args(argv)
  s.out.mkdir(parents=True, exist_ok=True)
  path = s.out / JSON_NAME
  if s.added:
    result = _main_add(s, path)
    return _report(s, path, result)
  result: dict[str, Any] = {}
  if path.exists() and set(s.parts) != set(PARTS):
    result = json.loads(path.read_text())
    if result.get("settings", {}).get("quick") != s.quick:
      result = {}
  if s.parts:
    result["settings"] = s.describe()
    result["environment"] = environment()
    result["command"] = command(s)
  result.setdefault("parts", {})
  result.setdefault("wall_s", {})
  bar = tqdm(s.parts, desc="parts", disable=not s.progress)
  for part in bar:
    bar.set_postfix(part=part)
    t0 = time.perf_counter()
    result["parts"][part] = (run_stability(s) if part == "stability"
                             else run_dataset(part, s))
    result["wall_s"][part] = time.perf_counter() - t0
    path.write_text(json.dumps(result, indent=1))
  return _report(s, path, result)


def _report(s: Settings, path: Path, result: dict[str, Any]) -> dict[str, Any]:
  """Plots and the report region from ``result``."""
  if not result["parts"]:
    raise SystemExit(f"no results in {path}; run a part first.")
  if _settings_order(result):
    plot_compute(result, s.out / "generalization_compute.png")
  if "stability" in result["parts"]:
    plot_stability(result, s.out / "generalization_stability.png")
  print(readme_region(result))
  if s.readme is not None:
    write_readme(s.readme, result)
    print(f"\nrewrote the generalization region of {s.readme}")
  return result


if __name__ == "__main__":
  main()
