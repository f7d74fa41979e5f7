"""Summaries of per-seed results: mean and spread, paired differences, tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def mean_std(x: Any) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
  x = np.asarray(x, np.float64).ravel()
  return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def summary(x: Any) -> dict[str, Any]:
  """``{"per_seed", "mean", "std"}`` of a 1-D array of per-seed values."""
  m, s = mean_std(x)
  return {"per_seed": np.asarray(x, np.float64).tolist(), "mean": m, "std": s}


def paired(a: Any, b: Any) -> dict[str, Any]:
  """Per-seed difference ``a - b`` with its mean, std and win/tie counts."""
  diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  m, s = mean_std(diff)
  return {
      "per_seed": diff.tolist(),
      "mean": m,
      "std": s,
      "wins": int(np.sum(diff > 0)),
      "ties": int(np.sum(diff == 0)),
      "n": int(diff.size),
  }


def pct(mean: float, std: float) -> str:
  """``mean ± std`` of a fraction, in percent."""
  return f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub-flavoured Markdown table."""
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)
