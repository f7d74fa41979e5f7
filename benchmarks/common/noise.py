"""Symmetric label noise with an exact number of flipped labels."""

from __future__ import annotations

import numpy as np


def flip_exact(
    labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
  """Flips exactly ``round(rate * len(labels))`` labels to a different class.

  The flipped positions are a uniformly random subset of that size; each new
  label is uniform over the ``num_classes - 1`` other classes.

  Args:
    labels: integer labels, 1-D.
    rate: fraction of labels to flip, in ``[0, 1]``.
    num_classes: number of classes (at least 2).
    rng: the random generator (the draw is reproducible from its seed).

  Returns:
    The noisy labels, same dtype as ``labels``.
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"label-noise rate must lie in [0, 1], got {rate}.")
  if num_classes < 2:
    raise ValueError(f"label noise needs at least 2 classes, got {num_classes}.")
  labels = np.asarray(labels)
  n_flip = round(rate * labels.size)
  where = rng.choice(labels.size, size=n_flip, replace=False)
  offset = rng.integers(1, num_classes, size=n_flip)
  out = labels.copy()
  out[where] = (labels[where] + offset) % num_classes
  return out


def noisy_labels(
    labels: np.ndarray, rate: float, num_classes: int, seed: int, tag: int = 0
) -> np.ndarray:
  """:func:`flip_exact` with the generator ``default_rng((tag, seed))``.

  Use ``tag`` to draw independent noise for different splits of one seed.
  """
  rng = np.random.default_rng((int(tag), int(seed)))
  return flip_exact(labels, rate, num_classes, rng)
