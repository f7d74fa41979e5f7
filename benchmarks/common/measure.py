"""Wall-clock timing of single steps and XLA's FLOP counts."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], reps: int = 300, warmup: int = 10
) -> dict[str, np.ndarray]:
  """Seconds per call of each zero-argument function, measured interleaved.

  Every repetition calls each function once (alternating the order between
  repetitions) and waits for its result with ``jax.block_until_ready``, so
  slow drifts of the machine affect all functions alike. Take the median.
  """
  for _ in range(warmup):
    for fn in fns.values():
      jax.block_until_ready(fn())
  names = list(fns)
  times: dict[str, list[float]] = {k: [] for k in names}
  for rep in range(reps):
    for k in names if rep % 2 == 0 else reversed(names):
      t0 = time.perf_counter()
      jax.block_until_ready(fns[k]())
      times[k].append(time.perf_counter() - t0)
  return {k: np.asarray(v) for k, v in times.items()}


def compile_with_flops(
    fn: Callable[..., Any], *args: Any
) -> tuple[Callable[..., Any], Optional[float]]:
  """Compiles ``jax.jit(fn)`` for ``args``; returns it and its XLA FLOP count.

  The count comes from XLA's cost analysis of the compiled program: it is
  deterministic (independent of the machine's speed) and ``None`` when the
  backend reports none. The compiled function takes the same ``args``.
  """
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, flops_of(compiled)


def xla_flops(fn: Callable[..., Any], *args: Any) -> Optional[float]:
  """FLOPs of one call of ``jax.jit(fn)(*args)`` as counted by XLA."""
  return compile_with_flops(fn, *args)[1]


def cost_of(compiled: Any, key: str) -> Optional[float]:
  """An entry of a compiled function's cost analysis, or ``None``.

  ``cost_analysis()`` returns a dict or, in some JAX versions, a list of
  dicts (one per program); both are handled.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  value = cost.get(key)
  return float(value) if value is not None and value >= 0 else None


def flops_of(compiled: Any) -> Optional[float]:
  """XLA's FLOP count of a compiled function, or ``None``."""
  return cost_of(compiled, "flops")


def bytes_accessed_of(compiled: Any) -> Optional[float]:
  """XLA's count of bytes read and written by a compiled function, or ``None``."""
  return cost_of(compiled, "bytes accessed")
