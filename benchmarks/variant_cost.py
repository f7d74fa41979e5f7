"""XLA's FLOPs and temporary memory of one training step, for every transform.

Compiles one full step (clean gradient, transform, base optimizer, parameter
update) of the MNIST-1D MLP 40-100-100-10 at batch 128 for the base optimizer
alone and for each transform in front of it, and reports the ratios from
``compile().cost_analysis()`` and ``memory_analysis()``. These figures are
deterministic: no timing noise.

For transforms that take the second pass only on some steps (LookSAM, AE-SAM),
XLA counts the costlier branch of the conditional, so the compiled figure is
the cost of a step that takes the pass; the amortized cost uses the FLOPs of
a step without the pass (the same transform at ρ = 0).

``python benchmarks/variant_cost.py [--out results] [--report docs/benchmarks/cost.md]``
writes ``variant_cost.json`` and, with ``--readme``, rewrites the table
between the ``variant-cost`` markers of the page from that JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import sam_optax  # noqa: E402
from benchmarks.common import readme as readme_lib  # noqa: E402
from benchmarks.common import measure, models  # noqa: E402

BATCH = 128
SIZES = (40, 100, 100, 10)
START, END = "<!-- variant-cost:start -->", "<!-- variant-cost:end -->"


def _variants() -> list[dict[str, Any]]:
  """(name, factory of ρ, amortization) for every transform of the package."""
  s = sam_optax
  every = lambda k: {"kind": "every", "k": k}  # noqa: E731
  return [
      dict(name="sam", make=lambda r: s.sam(r)),
      dict(name="sam, 2 ascent steps", make=lambda r: s.sam(r, num_ascent_steps=2)),
      dict(name="sam, renormalize", make=lambda r: s.sam(r, renormalize=True)),
      dict(name="asam", make=lambda r: s.asam(r)),
      dict(name="usam", make=lambda r: s.usam(r)),
      dict(name="gsam", make=lambda r: s.gsam(r, alpha=0.1)),
      dict(name="gcsam", make=lambda r: s.gcsam(r)),
      dict(name="wsam", make=lambda r: s.wsam(r)),
      dict(name="gam", make=lambda r: s.gam(r)),
      dict(name="sampa", make=lambda r: s.sampa(0.1, r)),
      dict(name="looksam (k=5)", make=lambda r: s.looksam(r, k=5), amortize=every(5)),
      dict(name="friendly_sam", make=lambda r: s.friendly_sam(r)),
      dict(name="vasso", make=lambda r: s.vasso(r)),
      dict(name="fisher_sam", make=lambda r: s.fisher_sam(r)),
      dict(name="masked_sam", make=lambda r: s.masked_sam(
          r, lambda p: jax.tree.map(lambda x: x.ndim > 1, p))),
      dict(name="fisher_masked_sam", make=lambda r: s.fisher_masked_sam(r)),
      dict(name="sam_on", make=lambda r: s.sam_on(
          r, lambda p: jax.tree.map(lambda x: x.ndim == 1, p))),
      dict(name="rwp", make=lambda r: s.rwp(r)),
      dict(name="esam", make=lambda r: s.esam(r), per_example=True),
      dict(name="ae_sam", make=lambda r: s.ae_sam(r, total_steps=1000),
           amortize={"kind": "adaptive"}),
      dict(name="msam", make=None, full=lambda base: s.msam(base, rho=3.0)),
      dict(name="wsam_decoupled", make=None,
           full=lambda base: s.wsam_decoupled(base, 0.1, rho=0.05)),
      dict(name="lookbehind_sam (k=2)", make=None,
           full=lambda base: s.lookbehind_sam(base, rho=0.05, k=2)),
      dict(name="bsam (replaces the base)", make=None,
           full=lambda base: s.bsam(0.1, rho=0.01, num_data=1000)),
      dict(name="optax.contrib.sam (opaque)", make=None),
  ]


def _step(tx: optax.GradientTransformation, model, x, y, *, per_example=False,
          closure="loss_fn") -> Callable[..., Any]:
  def per_ex(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y)

  def loss(p):
    return per_ex(p).mean()

  def step(params, state):
    g = jax.grad(loss)(params)
    kwargs = {"loss_fn": per_ex if per_example else loss}
    if closure == "contrib":
      kwargs = {"grad_fn": lambda p, _: jax.grad(loss)(p)}
    updates, state = tx.update(g, state, params, **kwargs)
    return optax.apply_updates(params, updates), state

  return step


def _costs(step, params, state) -> tuple[float, float]:
  compiled = jax.jit(step).lower(params, state).compile()
  mem = compiled.memory_analysis()
  temp = float(getattr(mem, "temp_size_in_bytes", np.nan)) if mem is not None else np.nan
  return float(measure.flops_of(compiled)), temp


def run(out: Path) -> dict[str, Any]:
  model = models.mlp(SIZES)
  params = model.init(jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(BATCH, SIZES[0]), jnp.float32)
  y = jnp.asarray(rng.randint(0, SIZES[-1], BATCH))
  param_bytes = sum(l.size * l.dtype.itemsize for l in jax.tree.leaves(params))
  base = lambda: optax.sgd(0.1, momentum=0.9)  # noqa: E731
  tx0 = base()
  f0, m0 = _costs(_step(tx0, model, x, y), params, tx0.init(params))
  rows = []
  for v in _variants():
    if v.get("full") is not None:  # wraps the base optimizer, or replaces it
      tx = v["full"](base())
      f, m = _costs(_step(tx, model, x, y), params, tx.init(params))
    elif v["name"].startswith("optax.contrib"):
      tx = optax.contrib.sam(base(), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
                             opaque_mode=True)
      f, m = _costs(_step(tx, model, x, y, closure="contrib"), params, tx.init(params))
    else:
      pe = v.get("per_example", False)
      tx = optax.chain(v["make"](0.05), base())
      f, m = _costs(_step(tx, model, x, y, per_example=pe), params, tx.init(params))
    row = {"name": v["name"], "flops": f, "flops_ratio": f / f0,
           "temp_bytes": m, "temp_over_param_bytes": m / param_bytes}
    amort = v.get("amortize")
    if amort is not None:
      tx_skip = optax.chain(v["make"](0.0), base())
      f_skip, _ = _costs(_step(tx_skip, model, x, y), params, tx_skip.init(params))
      row["flops_ratio_without_pass"] = f_skip / f0
      if amort["kind"] == "every":
        k = amort["k"]
        row["flops_ratio_amortized"] = (f + (k - 1) * f_skip) / (k * f0)
    rows.append(row)
  result = {
      "model": f"MLP {'-'.join(map(str, SIZES))}, batch {BATCH}, float32",
      "base": "optax.sgd(0.1, momentum=0.9)",
      "base_flops": f0, "base_temp_bytes": m0, "param_bytes": param_bytes,
      "jax": jax.__version__, "optax": optax.__version__,
      "backend": jax.default_backend(),
      "rows": rows,
  }
  out.mkdir(parents=True, exist_ok=True)
  (out / "variant_cost.json").write_text(json.dumps(result, indent=2))
  return result


def table(result: dict[str, Any]) -> str:
  lines = [
      f"Measured by `benchmarks/variant_cost.py` ({result['model']}; base"
      f" `{result['base']}`; jax {result['jax']}, {result['backend']}). FLOPs"
      " of one compiled step relative to the base step; temporary memory in"
      " units of parameter bytes (base step:"
      f" {result['base_temp_bytes'] / result['param_bytes']:.2f}).",
      "",
      "| transform | FLOPs × base | amortized | temp memory / param bytes |",
      "|---|---|---|---|",
  ]
  for r in result["rows"]:
    amort = ""
    if "flops_ratio_amortized" in r:
      amort = f"{r['flops_ratio_amortized']:.2f}"
    elif "flops_ratio_without_pass" in r:
      amort = f"{r['flops_ratio_without_pass']:.2f}–{r['flops_ratio']:.2f} (data-dependent)"
    lines.append(
        f"| {r['name']} | {r['flops_ratio']:.2f} | {amort} |"
        f" {r['temp_over_param_bytes']:.2f} |"
    )
  return "\n".join(lines)


def write_readme(readme: Path, result: dict[str, Any]) -> None:
  readme_lib.replace_region(readme, START, END, table(result))


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=Path("results"))
  parser.add_argument("--report", "--readme", dest="readme", type=Path, default=None)
  args = parser.parse_args(argv)
  result = run(args.out)
  print(table(result))
  if args.readme is not None:
    write_readme(args.readme, result)
  return result


if __name__ == "__main__":
  main()
