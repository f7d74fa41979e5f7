"""Calibration of a classifier's probabilities: reliability bins and the ECE.

Used to compare the predictions of SAM variants, for instance :func:`bsam`'s
Bayesian model average (see :func:`sam_optax.bsam_sample`) with the
prediction at the mean weights::

    from sam_optax import calibration

    probs = jax.nn.softmax(logits)               # (n, classes)
    ece = calibration.expected_calibration_error(probs, labels)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._core import validation

__all__ = ("ReliabilityResult", "expected_calibration_error", "reliability")


class ReliabilityResult(NamedTuple):
  """Result of :func:`reliability`: the reliability diagram and the ECE.

  Attributes:
    ece: the expected calibration error, a scalar.
    edges: the bin edges, shape ``(num_bins + 1,)``, from 0 to 1; bin ``b``
      holds the confidences in ``(edges[b], edges[b + 1]]``.
    count: the number of examples in each bin, shape ``(num_bins,)``.
    confidence: the mean confidence (top probability) in each bin, 0 for an
      empty bin.
    accuracy: the fraction of correct top-1 predictions in each bin, 0 for
      an empty bin.
  """

  ece: jax.Array
  edges: jax.Array
  count: jax.Array
  confidence: jax.Array
  accuracy: jax.Array


def _check(caller: str, probs: Any, labels: Any, num_bins: Any):
  validation.check_int(caller, "num_bins", num_bins, low=1)
  probs = jnp.asarray(probs)
  labels = jnp.asarray(labels)
  if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
    raise ValueError(
        f"`{caller}`: `probs` must be a non-empty array of class"
        f" probabilities of shape (examples, classes); got shape {probs.shape}."
    )
  if not jnp.issubdtype(probs.dtype, jnp.floating):
    raise ValueError(
        f"`{caller}`: `probs` must be floating point (softmax"
        f" probabilities), got dtype {probs.dtype}."
    )
  if labels.shape == probs.shape:  # one-hot (or soft) labels
    labels = jnp.argmax(labels, axis=-1)
  elif labels.shape != probs.shape[:1] or not jnp.issubdtype(
      labels.dtype, jnp.integer
  ):
    raise ValueError(
        f"`{caller}`: `labels` must be integer class indices of shape"
        f" {probs.shape[:1]} or one-hot labels of shape {probs.shape}; got"
        f" shape {labels.shape} and dtype {labels.dtype}."
    )
  return probs, labels, int(num_bins)


def reliability(probs: Any, labels: Any, num_bins: int = 15) -> ReliabilityResult:
  r"""The reliability diagram of top-1 predictions, and their ECE.

  Each example's confidence is its largest probability
  :math:`c_i = \max_k p_{ik}` and its prediction the class of that
  probability. With the confidences binned into ``num_bins`` equal bins
  :math:`B_b = (b/B, (b+1)/B]` of :math:`[0, 1]`,

  .. math::

    \mathrm{ECE} = \sum_b \frac{|B_b|}{n}
      \bigl|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\bigr|,

  the binning of Guo et al. (2017) (gpleiss/temperature_scaling, 15 bins,
  ``conf > lower`` and ``conf <= upper``). The bSAM authors' ``ece`` in
  ``util.py`` of team-approx-bayes/bayesian-sam uses 20 bins and counts a
  confidence that falls exactly on an inner edge in both bins around it;
  otherwise the two agree (pass ``num_bins=20`` to compare with their
  numbers).

  Args:
    probs: class probabilities, shape ``(n, classes)`` (rows need not be
      normalized; only their top entry is read).
    labels: integer class indices, shape ``(n,)``, or one-hot labels of the
      shape of ``probs`` (their argmax is taken).
    num_bins: the number of equal-width bins, at least 1.

  Returns:
    A :class:`ReliabilityResult`; computed in at least float32, jit-able
    (``num_bins`` static).

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import calibration
    >>> probs = jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    >>> r = calibration.reliability(probs, jnp.array([0, 1, 1]), num_bins=2)
    >>> [int(c) for c in r.count]      # confidences 0.9, 0.6, 0.7: all > 0.5
    [0, 3]
    >>> round(float(r.ece), 4)         # |2/3 - (0.9 + 0.6 + 0.7)/3|
    0.0667
  """
  probs, labels, bins = _check("reliability", probs, labels, num_bins)
  return _reliability(probs, labels, bins)


def expected_calibration_error(
    probs: Any, labels: Any, num_bins: int = 15
) -> jax.Array:
  r"""The expected calibration error (ECE) of top-1 predictions.

  :math:`\sum_b \frac{|B_b|}{n} |\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|`
  over ``num_bins`` equal confidence bins; see :func:`reliability` (which
  also returns the bins) for the binning and how it compares with the bSAM
  authors' ``ece`` (20 bins there).

  Args:
    probs: class probabilities, shape ``(n, classes)``.
    labels: integer class indices ``(n,)`` or one-hot labels.
    num_bins: the number of equal-width bins (default 15, as Guo et al.).

  Returns:
    The ECE, a scalar in :math:`[0, 1]`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import calibration
    >>> probs = jnp.array([[0.8, 0.2], [0.8, 0.2], [0.8, 0.2], [0.8, 0.2],
    ...                    [0.8, 0.2]])
    >>> labels = jnp.array([0, 0, 0, 0, 1])   # 80% correct at confidence 0.8
    >>> round(float(calibration.expected_calibration_error(probs, labels)), 6)
    0.0
  """
  probs, labels, bins = _check("expected_calibration_error", probs, labels,
                               num_bins)
  return _reliability(probs, labels, bins).ece


def _reliability_impl(probs: jax.Array, labels: jax.Array,
                      num_bins: int) -> ReliabilityResult:
  dtype = jnp.promote_types(probs.dtype, jnp.float32)
  probs = probs.astype(dtype)
  confidence = jnp.max(probs, axis=-1)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(dtype)
  edges = jnp.asarray(np.linspace(0.0, 1.0, num_bins + 1), dtype)
  # Bin b holds (edges[b], edges[b + 1]]: the number of inner edges below c.
  index = jnp.searchsorted(edges[1:-1], confidence, side="left")
  count = jax.ops.segment_sum(jnp.ones_like(confidence), index, num_bins)
  conf_sum = jax.ops.segment_sum(confidence, index, num_bins)
  acc_sum = jax.ops.segment_sum(correct, index, num_bins)
  safe = jnp.maximum(count, 1.0)
  n = confidence.shape[0]
  ece = jnp.sum(jnp.abs(acc_sum - conf_sum)) / n
  return ReliabilityResult(
      ece=ece,
      edges=edges,
      count=count.astype(jnp.int32),
      confidence=conf_sum / safe,
      accuracy=acc_sum / safe,
  )


_reliability = jax.jit(_reliability_impl, static_argnums=2)
