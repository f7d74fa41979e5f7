"""One compiled trainer over seeds, label draws and hyperparameters, any optimizer.

:func:`~benchmarks.common.train.train_grid` runs SGD or SAM over seeds x
configurations with one set of labels, vmapped. :func:`train_sweep`
generalizes it to the needs of label-noise studies and of the whole SAM
family:

* the optimizer is any factory ``(hparams, total_steps) -> transformation``,
  with an optional map from ``(params, opt_state)`` to the weights to
  evaluate (MSAM trains at perturbed weights);
* every *group* (a seed, possibly with its own noisy labels) has its own
  training and validation labels, and may have its own hyperparameters;
* metrics separate the fit of correctly and wrongly labelled training
  examples, and detect runs that collapsed to a constant prediction;
* all runs are one compiled program: ``lax.map`` over the runs (optionally
  vmapping ``run_batch`` of them at a time) of a ``lax.scan`` over several
  epochs, then an evaluation. On a CPU, running the small models of these
  benchmarks one after the other is faster than vmapping them (a vmapped
  im2col convolution is about three times slower per run), and the
  conditional branches of LookSAM and AE-SAM stay real branches.

The same seed gives the same initial parameters and batch order for every
optimizer and configuration (``model.init`` with the first half of
``jax.random.split(PRNGKey(seed))``, a permutation per epoch from the second
half folded with the epoch number, as in ``train_grid``), so results are
paired across optimizers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .models import Model, Params, cross_entropy
from .train import make_train_step

MakeTx = Callable[[Mapping[str, jax.Array], int], optax.GradientTransformation]

# A run has collapsed when this fraction of its test predictions share one class.
COLLAPSE_TOP_FRACTION = 0.9


class Problem(NamedTuple):
  """Data of a sweep; labels may differ between groups.

  Attributes:
    x_train: training inputs, ``(n_train, ...)``.
    y_train: training labels of every group, ``(groups, n_train)``.
    y_train_clean: the true training labels, ``(n_train,)``.
    x_val: validation inputs.
    y_val: validation labels of every group, ``(groups, n_val)``.
    x_test: test inputs.
    y_test: test labels (clean), ``(n_test,)``.
    num_classes: number of classes.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  y_train_clean: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


class Optimizer(NamedTuple):
  """An optimizer to sweep.

  Attributes:
    name: label.
    make: ``(hparams, total_steps) -> transformation``; ``hparams`` maps names
      to scalar (traced) arrays.
    eval_params: ``(params, opt_state) -> params`` to evaluate, or ``None``
      for the trained parameters themselves.
  """

  name: str
  make: MakeTx
  eval_params: Callable[[Params, Any], Params] | None = None


@dataclasses.dataclass
class SweepResult:
  """Metrics of every (group, configuration) run of one optimizer.

  Attributes:
    name: the optimizer's label.
    seeds: seed of every group.
    hparams: name -> array ``(groups, configs)`` of the hyperparameters.
    epochs: training epochs.
    steps_per_epoch: optimizer steps per epoch (the last partial batch is
      dropped; the data are reshuffled every epoch).
    eval_epochs: the epochs after which metrics were recorded.
    history: metric -> array ``(groups, configs, len(eval_epochs))``:
      ``train_loss``/``train_acc`` (on the labels trained on),
      ``train_acc_true`` (on the true labels), ``fit_clean`` (accuracy on the
      training examples whose label is correct), ``fit_noisy`` (fraction of
      wrongly labelled examples predicted as their wrong label; NaN without
      noise), ``noisy_true`` (fraction of them predicted as their true class),
      ``val_acc``, ``test_acc``, ``test_loss``, ``test_top_fraction`` (share
      of the most predicted class on the test set), ``finite`` (1 when all
      parameters are finite) and ``batch_loss`` (mean mini-batch loss of the
      last epoch).
    compile_s: seconds spent compiling.
    run_s: wall-clock seconds of training and evaluation (compilation
      excluded).
    fingerprints: per group, a digest of what pairs runs across optimizers:
      the training and validation labels, the initial parameters and the
      first epoch's batch order.
    label_flips: per group, the number of training labels that differ from
      the true ones.
    params: with ``return_params=True``, the evaluated weights of every run,
      leaves of shape ``(groups, configs, ...)``; else ``None``.
  """

  name: str
  seeds: list[int]
  hparams: dict[str, np.ndarray]
  epochs: int
  steps_per_epoch: int
  eval_epochs: list[int]
  history: dict[str, np.ndarray]
  compile_s: float
  run_s: float
  fingerprints: list[str]
  label_flips: list[int]
  params: Any = None

  def final(self, metric: str) -> np.ndarray:
    """``metric`` after the last epoch, shape ``(groups, configs)``."""
    return self.history[metric][..., -1]

  def collapsed(self) -> np.ndarray:
    """Boolean ``(groups, configs)``: constant predictions or non-finite weights."""
    return ((self.final("test_top_fraction") >= COLLAPSE_TOP_FRACTION)
            | (self.final("finite") < 1))

  @property
  def num_runs(self) -> int:
    return int(np.prod(self.final("test_acc").shape))


def _evaluate(apply_fn, params, y_tr, y_va, data, num_classes):
  x_tr, y_clean, x_va, x_te, y_te = data
  logits = apply_fn(params, x_tr)
  pred = jnp.argmax(logits, -1)
  correct = pred == y_tr
  flipped = y_tr != y_clean
  n_flip = flipped.sum()
  n_keep = flipped.size - n_flip
  nan = jnp.asarray(jnp.nan, jnp.float32)
  test_logits = apply_fn(params, x_te)
  test_pred = jnp.argmax(test_logits, -1)
  counts = jnp.bincount(test_pred, length=num_classes)
  return {
      "train_loss": cross_entropy(logits, y_tr),
      "train_acc": correct.mean(),
      "train_acc_true": (pred == y_clean).mean(),
      "fit_clean": (correct & ~flipped).sum() / jnp.maximum(n_keep, 1),
      "fit_noisy": jnp.where(
          n_flip > 0, (correct & flipped).sum() / jnp.maximum(n_flip, 1), nan),
      "noisy_true": jnp.where(
          n_flip > 0, ((pred == y_clean) & flipped).sum() / jnp.maximum(n_flip, 1),
          nan),
      "val_acc": (jnp.argmax(apply_fn(params, x_va), -1) == y_va).mean(),
      "test_acc": (test_pred == y_te).mean(),
      "test_loss": cross_entropy(test_logits, y_te),
      "test_top_fraction": counts.max() / test_pred.size,
      "finite": jnp.all(jnp.asarray(
          [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])),
  }


def train_sweep(
    model: Model,
    problem: Problem,
    optimizer: Optimizer,
    hparams: Mapping[str, Any],
    seeds: Sequence[int],
    *,
    epochs: int,
    batch_size: int,
    eval_every: int = 5,
    run_batch: int = 1,
    progress: bool = True,
    desc: str | None = None,
    return_params: bool = False,
) -> SweepResult:
  """Trains every group x configuration of one optimizer in one compiled program.

  Args:
    model: the model.
    problem: the data; ``problem.y_train[g]`` and ``problem.y_val[g]`` are the
      labels of group ``g``.
    optimizer: the optimizer factory.
    hparams: name -> values, of shape ``(configs,)`` (shared by all groups)
      or ``(groups, configs)``.
    seeds: the seed of every group (``len(seeds) == groups``); equal seeds
      give equal initial parameters and batch orders.
    epochs: training epochs; a multiple of ``eval_every``. The optimizer's
      ``total_steps`` is ``epochs * steps_per_epoch``.
    batch_size: mini-batch size.
    eval_every: epochs between evaluations (run inside one jitted call).
    run_batch: runs vmapped together; the batches of runs follow one another
      (``lax.map``). On a CPU, 1 (one run after the other, one compiled
      program) is fastest for these small models.
    progress: show a tqdm progress bar.
    desc: label of the progress bar.
    return_params: keep the final evaluated weights of every run in
      ``SweepResult.params``.

  Returns:
    A :class:`SweepResult`.
  """
  groups = len(seeds)
  if problem.y_train.shape[0] != groups or problem.y_val.shape[0] != groups:
    raise ValueError(
        f"{groups} seeds need labels of {groups} groups; got y_train"
        f" {problem.y_train.shape} and y_val {problem.y_val.shape}.")
  if epochs < 1 or epochs % eval_every:
    raise ValueError(
        f"epochs ({epochs}) must be a positive multiple of eval_every"
        f" ({eval_every}).")
  hp_np = {}
  for k, v in hparams.items():
    v = np.asarray(v, np.float32)
    hp_np[k] = np.broadcast_to(v, (groups, v.shape[-1])).copy()
  configs = next(iter(hp_np.values())).shape[1]
  n_train = problem.x_train.shape[0]
  steps = n_train // batch_size
  if steps < 1:
    raise ValueError(
        f"batch_size {batch_size} exceeds the {n_train} training examples.")
  total_steps = epochs * steps
  runs = groups * configs
  flat_hp = {k: jnp.asarray(v.reshape(runs)) for k, v in hp_np.items()}
  # Initialization runs eagerly, once per group: a jitted, vmapped init would
  # compile the random-number generator anew for every sweep (seconds each),
  # while eager operations are compiled once per shape for the whole process.
  split_keys = [jax.random.split(jax.random.PRNGKey(seed)) for seed in seeds]
  group_params = [model.init(k[0]) for k in split_keys]
  group_of = jnp.repeat(jnp.arange(groups), configs)
  params = jax.tree.map(lambda *leaves: jnp.stack(leaves)[group_of], *group_params)
  shuffle_keys = jnp.stack([k[1] for k in split_keys])[group_of]
  data = tuple(jnp.asarray(a) for a in (
      problem.x_train, problem.y_train, problem.y_train_clean, problem.x_val,
      problem.y_val, problem.x_test, problem.y_test))
  num_classes = int(problem.num_classes)
  eval_fn = optimizer.eval_params or (lambda p, _: p)

  def init_state(params, h):
    return optimizer.make(h, total_steps).init(params)

  def chunk(state, start, data):
    x_tr, y_tr, y_clean, x_va, y_va, x_te, y_te = data

    def one_run(args):
      state_r, h, key, g = args
      step = make_train_step(model.apply, optimizer.make(h, total_steps))

      def epoch(state_r, e):
        perm = jax.random.permutation(jax.random.fold_in(key, e), n_train)
        batches = perm[: steps * batch_size].reshape(steps, batch_size)

        def body(carry, idx):
          params, opt_state, loss = step(*carry, x_tr[idx], y_tr[g][idx])
          return (params, opt_state), loss

        state_r, losses = jax.lax.scan(body, state_r, batches)
        return state_r, losses.mean()

      state_r, losses = jax.lax.scan(
          epoch, state_r, start + jnp.arange(eval_every))
      metrics = _evaluate(
          model.apply, eval_fn(*state_r), y_tr[g], y_va[g],
          (x_tr, y_clean, x_va, x_te, y_te), num_classes)
      metrics["batch_loss"] = losses[-1]
      return state_r, metrics

    return jax.lax.map(one_run, (state, flat_hp, shuffle_keys, group_of),
                       batch_size=run_batch)

  state = (params, jax.jit(jax.vmap(init_state))(params, flat_hp))
  fingerprints = []
  for g in range(groups):
    r = g * configs
    perm = jax.random.permutation(jax.random.fold_in(shuffle_keys[r], 0), n_train)
    digest = hashlib.sha1()
    for a in (problem.y_train[g], problem.y_val[g], np.asarray(perm),
              *(np.asarray(leaf[r]) for leaf in jax.tree.leaves(params))):
      digest.update(np.ascontiguousarray(a).tobytes())
    fingerprints.append(digest.hexdigest())
  t0 = time.perf_counter()
  start = jnp.asarray(0, jnp.int32)
  chunk_fn = jax.jit(chunk, donate_argnums=0).lower(state, start, data).compile()
  compile_s = time.perf_counter() - t0

  history: dict[str, list[np.ndarray]] = {}
  eval_epochs = []
  label = desc or optimizer.name
  bar = tqdm(total=epochs, desc=f"{label} ({groups}x{configs} runs)",
             disable=not progress, leave=False)
  t0 = time.perf_counter()
  for first in range(0, epochs, eval_every):
    state, metrics = chunk_fn(state, jnp.asarray(first, jnp.int32), data)
    metrics = jax.device_get(metrics)
    for k, v in metrics.items():
      history.setdefault(k, []).append(
          np.asarray(v, np.float32).reshape(groups, configs))
    eval_epochs.append(first + eval_every)
    bar.update(eval_every)
    val = metrics["val_acc"].reshape(groups, configs)
    bar.set_postfix(val_acc=f"{val.mean(axis=0).max():.3f}")
  run_s = time.perf_counter() - t0
  bar.close()
  final_params = None
  if return_params:
    final_params = jax.device_get(jax.tree.map(
        lambda x: x.reshape(groups, configs, *x.shape[1:]),
        jax.vmap(eval_fn)(*state)))
  return SweepResult(
      name=optimizer.name,
      seeds=[int(s) for s in seeds],
      hparams=hp_np,
      epochs=epochs,
      steps_per_epoch=steps,
      eval_epochs=eval_epochs,
      history={k: np.stack(v, axis=-1) for k, v in history.items()},
      compile_s=compile_s,
      run_s=run_s,
      fingerprints=fingerprints,
      label_flips=[int(np.sum(problem.y_train[g] != problem.y_train_clean))
                   for g in range(groups)],
      params=final_params,
  )
