"""MNIST-1D (generated locally) and scikit-learn digits, with validation splits and label noise."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
  """Train/validation/test arrays (features float32, labels int32).

  ``y_train`` and ``y_val`` are the labels used for training and model
  selection (noisy when label noise was requested); ``y_train_clean`` and
  ``y_val_clean`` are the original labels. The test labels are always clean.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  y_train_clean: np.ndarray
  y_val_clean: np.ndarray
  num_classes: int

  def summary(self) -> str:
    """One line with split sizes and the measured label-noise rates."""
    noise_tr = float(np.mean(self.y_train != self.y_train_clean))
    noise_va = float(np.mean(self.y_val != self.y_val_clean))
    return (
        f"train {len(self.y_train)}, val {len(self.y_val)}, test"
        f" {len(self.y_test)}; {self.x_train.shape[1]} features,"
        f" {self.num_classes} classes; flipped labels: train {noise_tr:.1%},"
        f" val {noise_va:.1%}, test 0%"
    )


def symmetric_label_noise(
    labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
  """Replaces each label, with probability ``rate``, by a different class.

  The replacement is drawn uniformly from the ``num_classes - 1`` other
  classes, so ``rate`` is exactly the expected fraction of wrong labels.
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"label-noise rate must lie in [0, 1], got {rate}.")
  labels = np.asarray(labels)
  flip = rng.random(labels.shape) < rate
  offset = rng.integers(1, num_classes, size=labels.shape)
  return np.where(flip, (labels + offset) % num_classes, labels).astype(labels.dtype)


def _with_noise(
    x_train, x_val, x_test, y_train_clean, y_val_clean, y_test,
    num_classes, label_noise, noise_on_val, noise_seed,
) -> Dataset:
  """A :class:`Dataset` whose train (and optionally val) labels get noise."""
  rng = np.random.default_rng(noise_seed)
  y_train = symmetric_label_noise(y_train_clean, label_noise, num_classes, rng)
  y_val = (
      symmetric_label_noise(y_val_clean, label_noise, num_classes, rng)
      if noise_on_val
      else y_val_clean.copy()
  )
  return Dataset(
      x_train=x_train.astype(np.float32),
      y_train=y_train,
      x_val=x_val.astype(np.float32),
      y_val=y_val,
      x_test=x_test.astype(np.float32),
      y_test=y_test,
      y_train_clean=y_train_clean,
      y_val_clean=y_val_clean,
      num_classes=num_classes,
  )


def load_mnist1d(
    n_val: int = 500,
    *,
    label_noise: float = 0.0,
    noise_on_val: bool = True,
    noise_seed: int = 0,
    standardize: bool = True,
) -> Dataset:
  """Generates MNIST-1D with its default arguments (4000 train, 1000 test).

  The data set is generated in memory (about a second, no download). The
  last ``n_val`` training examples form the validation split.

  Args:
    n_val: size of the validation split taken from the end of the training set.
    label_noise: rate of symmetric label noise applied to the training labels
      (and to the validation labels when ``noise_on_val``); test labels stay
      clean.
    noise_on_val: whether the validation labels are corrupted as well, as they
      would be in practice when all labelled data is noisy.
    noise_seed: seed of the label-noise draw.
    standardize: subtract the training mean and divide by the training standard
      deviation (one scalar each, so the shape of every signal is preserved).

  Returns:
    A :class:`Dataset`.
  """
  # Imported here so that the other helpers work without mnist1d installed.
  from mnist1d.data import get_dataset_args, make_dataset

  raw = make_dataset(get_dataset_args())
  x_all = np.asarray(raw["x"], np.float32)
  y_all = np.asarray(raw["y"], np.int32)
  x_test = np.asarray(raw["x_test"], np.float32)
  y_test = np.asarray(raw["y_test"], np.int32)
  num_classes = int(max(y_all.max(), y_test.max())) + 1
  if not 0 < n_val < len(y_all):
    raise ValueError(f"n_val must lie in (0, {len(y_all)}), got {n_val}.")

  n_train = len(y_all) - n_val
  x_train, x_val = x_all[:n_train], x_all[n_train:]
  y_train_clean, y_val_clean = y_all[:n_train], y_all[n_train:]
  if standardize:
    mean, std = x_train.mean(), x_train.std()
    x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))

  return _with_noise(
      x_train, x_val, x_test, y_train_clean, y_val_clean, y_test,
      num_classes, label_noise, noise_on_val, noise_seed,
  )


def load_digits(
    n_val: int = 250,
    *,
    label_noise: float = 0.0,
    noise_on_val: bool = True,
    noise_seed: int = 0,
    standardize: bool = True,
) -> Dataset:
  """scikit-learn's bundled 8x8 digits (1,797 images; no download).

  Pixels are divided by 16 and the images shuffled with ``RandomState(0)``;
  the first 1,197 form the training set, whose last ``n_val`` examples are the
  validation split, and the remaining 600 the test set. Standardization is per
  feature with the mean and standard deviation of the training split;
  constant features are only centred.

  Args:
    n_val: size of the validation split taken from the end of the training set.
    label_noise: rate of symmetric label noise, as in :func:`load_mnist1d`.
    noise_on_val: whether the validation labels are corrupted as well.
    noise_seed: seed of the label-noise draw.
    standardize: standardize every feature with the training statistics.

  Returns:
    A :class:`Dataset` with 64 features (row-major 8x8 images).
  """
  from sklearn.datasets import load_digits as sk_load_digits

  raw = sk_load_digits()
  x_all = np.asarray(raw.data, np.float32) / 16.0
  y_all = np.asarray(raw.target, np.int32)
  order = np.random.RandomState(0).permutation(len(y_all))
  x_all, y_all = x_all[order], y_all[order]
  n_all_train = 1197
  if not 0 < n_val < n_all_train:
    raise ValueError(f"n_val must lie in (0, {n_all_train}), got {n_val}.")
  n_train = n_all_train - n_val
  x_train, x_val = x_all[:n_train], x_all[n_train:n_all_train]
  x_test, y_test = x_all[n_all_train:], y_all[n_all_train:]
  y_train_clean, y_val_clean = y_all[:n_train], y_all[n_train:n_all_train]
  num_classes = 10
  if standardize:
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))

  return _with_noise(
      x_train, x_val, x_test, y_train_clean, y_val_clean, y_test,
      num_classes, label_noise, noise_on_val, noise_seed,
  )
