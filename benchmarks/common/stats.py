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


def t_half_width(d: dict[str, Any], level: float = 0.95) -> float:
  """Half-width of the ``level`` t-interval of the mean of a :func:`paired` result.

  ``nan`` with fewer than two seeds.
  """
  from scipy import stats as st  # pylint: disable=import-outside-toplevel

  n = d["n"]
  if n < 2:
    return float("nan")
  return float(st.t.ppf(0.5 + level / 2, n - 1) * d["std"] / np.sqrt(n))


def verdict(d: dict[str, Any], *, higher_is_better: bool) -> str:
  """``win`` / ``loss`` / ``tie`` of a paired difference ``method − reference``.

  *win* when the 95% t-interval lies entirely on the better side of zero
  (above it when ``higher_is_better``, below it otherwise), *loss* when on
  the worse side, *tie* otherwise (and always with fewer than two seeds).
  """
  half = t_half_width(d)
  if not np.isfinite(half):
    return "tie"
  lo, hi = d["mean"] - half, d["mean"] + half
  if (lo > 0) if higher_is_better else (hi < 0):
    return "win"
  if (hi < 0) if higher_is_better else (lo > 0):
    return "loss"
  return "tie"


def pct(mean: float, std: float) -> str:
  """``mean ± std`` of a fraction, in percent."""
  return f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub-flavoured Markdown table."""
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)
