"""Fine-tuning a pre-trained model: AdamW against SAM + AdamW, full and LoRA.

Bahri, Mobahi and Tay (ACL 2022) found SAM's gains on T5 largest when the
fine-tuning data are scarce. This benchmark is that experiment shrunk to two
CPU cores: the small causal Transformer of ``benchmarks/language_model.py``
is pre-trained as a character-level language model on the training split of
eight Shakespeare plays, then fine-tuned to tell which play a spoken line
comes from, with 5%, 20% and 100% of the labelled training lines.

Protocol:

* Pre-training: ``language_model.py``'s model and recipe (causal, 2 pre-LN
  layers, width 64, 4 heads, tied embeddings, dropout 0.1) and its
  ``Trainer`` with AdamW for ``pre_steps`` (1,200) steps of 16 windows of 64
  characters on the whole training split, seed ``pre_seed``. One
  pre-trained model serves every fine-tuning run; its parameters are
  cached (``--cache``, a temporary folder by default) under a hash of the
  pre-training settings and the corpus, so reruns skip it. Nothing is
  downloaded.
* Task: ``text.play_lines`` (spoken lines of at least 24 characters,
  balanced over the K = 8 plays). Training lines come from the training
  blocks, validation lines (ρ selection) from the validation blocks, test
  lines from the test blocks; a validation line whose text occurs among
  the training lines, or a test line whose text occurs among the training
  or validation lines, is dropped (a repeated line or refrain). A
  fraction takes that share of every play's training lines (a fixed
  permutation, nested: 5% inside 20%), the same for every seed. Lines are
  cut or right-padded to 48 characters (the median line has 42).
* Classifier: the pre-trained model's final hidden states (after its last
  LayerNorm, :func:`sequence_models.hidden_states`), mean-pooled over the
  real (non-padding) characters, standardized per feature with fixed
  statistics (mean and std of the pre-trained model's pooled features over
  the fraction's training lines), then a linear head to K logits
  (N(0, 0.02²) kernel, zero bias). Right padding with causal attention: the
  real characters never see a pad, and the pool leaves the pads out, so the
  prediction does not depend on them. Dropout as in pre-training.
* Modes:

  - **full**: every pre-trained weight and the head are trained;
  - **LoRA**: every Dense kernel of the blocks (attention query, key, value,
    output; MLP in and out) gets a low-rank update ``W + (α/r) A B``
    (rank ``r`` = 8, α = 16, ``A`` ~ N(0, 1/fan-in), ``B`` = 0, the kernel
    seen as a fan-in × fan-out matrix); the adapters and the head are the
    trained tree, the pre-trained weights are closed over and never
    differentiated, so they stay bit-identical.

* Optimizers, every run ``--steps`` (150) steps of 32 lines, gradient
  clipping at global norm 1 then AdamW (b2 0.99, weight decay 0.01 on
  matrices), learning rate 3e-3 (full) or 1e-2 (LoRA), linear warm-up over
  10% of the steps, cosine decay to 0:

  - **AdamW**;
  - **SAM + AdamW**: ``sam_optax.sam(ρ)`` in front of the same base. In
    LoRA mode SAM's tree is the trained tree (adapters and head), so its
    perturbation ``ρ g/‖g‖`` moves the adapters and the head only, with the
    norm over them: the same as ``sam_optax.masked_sam`` with the frozen
    weights masked out (``normalize="masked"``) over the whole tree, without
    differentiating the frozen weights. ρ from ``RHOS`` = {0.02, 0.05, 0.15}
    (Bahri et al. used 0.05–0.15), selected per fraction and mode by the
    validation accuracy of the first ``select_seeds`` = 1 seed (ties: lower
    validation loss);
  - **AdamW, 2× steps**: SAM's compute spent on plain steps.

* Pairing: seed ``s`` gives every method and both modes the same head (and
  adapter) initialization, the same batches (the 2× run sees them first,
  then more) and the same dropout masks; SAM's two passes share the step's
  dropout key.
* Reported: test accuracy, mean ± std over seeds; the paired per-seed
  difference of test accuracy of SAM against AdamW and against AdamW 2×,
  with its 95% t-interval and the seeds won; *win* / *loss* when the
  interval lies above / below zero, *tie* otherwise.

``python benchmarks/fine_tuning.py`` writes ``<out>/fine_tuning.json`` and
``<out>/fine_tuning.png``; ``--report docs/benchmarks/fine_tuning.md`` regenerates the page's
``fine-tuning`` region; ``--report-only`` rewrites both from the JSON;
``--quick`` is a smoke test (a tiny model, 20 steps, 2 seeds, one fraction,
one ρ).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import sam_optax

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from benchmarks import generalization as gen  # noqa: E402
from benchmarks import language_model as lm  # noqa: E402
from benchmarks.common import readme as readme_lib  # noqa: E402
from benchmarks.common import sequence_models as sm  # noqa: E402
from benchmarks.common import stats, text  # noqa: E402

START = "<!-- fine-tuning:start -->"
END = "<!-- fine-tuning:end -->"
JSON_NAME = "fine_tuning.json"
PLOT_NAME = "fine_tuning.png"
FRACTIONS = (0.05, 0.2, 1.0)
RHOS = (0.02, 0.05, 0.15)
MODES = ("full", "lora")
MODE_LABELS = {"full": "full", "lora": "LoRA"}
METHODS = ("adamw", "sam", "adamw2x")
LABELS = {"adamw": "AdamW", "sam": "SAM + AdamW", "adamw2x": "AdamW, 2× steps"}
PASSES = {"adamw": 1, "sam": 2, "adamw2x": 1}
STEP_FACTOR = {"adamw": 1, "sam": 1, "adamw2x": 2}
PAIRS = (("sam", "adamw"), ("sam", "adamw2x"), ("adamw2x", "adamw"))
DEFAULTS = dict(
    # model and pre-training (language_model.py's recipe)
    d_model=64, num_layers=2, num_heads=4, length=64, dropout=0.1,
    attention_dropout=0.0, pre_steps=1200, pre_batch=16, pre_lr=1e-2, pre_b2=0.99,
    pre_weight_decay=0.1, pre_seed=0, pre_eval_windows=384,
    # fine-tuning
    line_length=48, batch=32, steps=150, lr_full=3e-3, lr_lora=1e-2, b2=0.99,
    weight_decay=0.01, warmup=0.1, clip=1.0, rank=8, alpha=16.0, eval_batch=256,
    chunk=50, data_seed=0, select_seeds=1, max_eval_lines=None)
QUICK = dict(d_model=32, num_layers=1, num_heads=2, length=32, line_length=32,
             pre_steps=20, pre_batch=8, pre_eval_windows=32, batch=8, steps=20,
             chunk=20, eval_batch=64, max_eval_lines=128, rank=2, alpha=4.0)

# The Dense kernels that get adapters, as '/'-joined parameter paths.
_TARGET = re.compile(r"^block\d+/(attn/(query|key|value|out)|mlp_in|mlp_out)/kernel$")


# ----------------------------------------------------------------------- LoRA

def _fan_in_dims(name: str) -> int:
  """Leading kernel axes that are inputs: 2 for attention's output (heads, head_dim, d)."""
  return 2 if name.endswith("attn/out/kernel") else 1


def lora_targets(params) -> list[str]:
  """The '/'-joined paths of the kernels that get adapters, sorted."""
  return sorted(k for k in traverse_util.flatten_dict(params, sep="/") if _TARGET.match(k))


def init_adapters(key, params, rank: int) -> dict[str, dict[str, jax.Array]]:
  """``{kernel path: {"a": (fan_in, r) ~ N(0, 1/fan_in), "b": zeros (r, fan_out)}}``."""
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {}
  for i, name in enumerate(lora_targets(params)):
    shape = flat[name].shape
    k = _fan_in_dims(name)
    fan_in, fan_out = math.prod(shape[:k]), math.prod(shape[k:])
    a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, rank), jnp.float32)
    out[name] = {"a": a / math.sqrt(fan_in), "b": jnp.zeros((rank, fan_out), jnp.float32)}
  return out


def merge_adapters(params, adapters, scale: float):
  """The pre-trained ``params`` with ``scale · A B`` added to every adapted kernel.

  A linear layer's output with the merged kernel is ``x W + scale · (x A) B``,
  LoRA's forward pass; every other leaf is returned as it is.
  """
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for name, ab in adapters.items():
    w = flat[name]
    flat[name] = w + (scale * (ab["a"] @ ab["b"])).reshape(w.shape).astype(w.dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------- classifier

def pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``hidden (B, T, d)`` over the positions where ``mask (B, T)`` is 1."""
  m = mask.astype(hidden.dtype)[..., None]
  return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def init_head(key, d_model: int, num_classes: int) -> dict[str, jax.Array]:
  return {"kernel": 0.02 * jax.random.normal(key, (d_model, num_classes), jnp.float32),
          "bias": jnp.zeros((num_classes,), jnp.float32)}


def classify(model: sm.LanguageModel, lm_params, head, x, mask, dropout_key=None,
             norm=None):
  """Class logits ``(B, K)``: a linear head on the mean-pooled final hidden states.

  ``norm``, ``{"mean", "std"}`` of the pooled features (constants), standardizes
  them before the head; ``None`` leaves them as they are.
  """
  h = sm.hidden_states(model, lm_params, x, dropout_key=dropout_key)
  f = pool(h, mask)
  if norm is not None:
    f = (f - norm["mean"]) / norm["std"]
  return f @ head["kernel"] + head["bias"]


def feature_norm(model: sm.LanguageModel, lm_params, x, mask, batch: int = 512):
  """Per-feature mean and std of the pooled pre-trained features of ``x`` (no dropout).

  The pre-trained model's pooled states vary little from line to line
  (std about 0.13 against a mean about 0.6), so a head on them would need
  large weights; standardizing with fixed statistics of the training lines
  puts them on a unit scale.
  """
  f = jax.jit(lambda xb, mb: pool(sm.hidden_states(model, lm_params, xb), mb))
  feats = np.concatenate([np.asarray(f(x[i:i + batch], mask[i:i + batch]))
                          for i in range(0, len(x), batch)])
  return {"mean": jnp.asarray(feats.mean(0)),
          "std": jnp.asarray(np.maximum(feats.std(0), 1e-3))}


def effective(mode: str, base, trained, scale: float):
  """``(language-model parameters, head)`` that a trained tree stands for."""
  if mode == "full":
    return trained["base"], trained["head"]
  return merge_adapters(base, trained["adapters"], scale), trained["head"]


def loss_closure(model: sm.LanguageModel, mode: str, base, x, mask, y, dropout_key,
                 scale: float, norm=None):
  """``trained tree -> mean cross-entropy`` on one batch, dropout masks fixed.

  In LoRA mode ``base`` is closed over: only the adapters and the head are
  arguments, so only they are differentiated and perturbed.
  """

  def loss_fn(trained):
    lm_params, head = effective(mode, base, trained, scale)
    logits = classify(model, lm_params, head, x, mask, dropout_key, norm)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), y).mean()

  return loss_fn


def make_tx(kind: str, cfg: dict[str, Any], mode: str, rho, total):
  sched = lm.schedule({"warmup": cfg["warmup"], "steps": cfg["steps"],
                       "lr": cfg[f"lr_{mode}"]}, total)
  base = optax.chain(
      optax.clip_by_global_norm(cfg["clip"]),
      optax.adamw(sched, b1=0.9, b2=cfg["b2"], weight_decay=cfg["weight_decay"],
                  mask=lm.decay_mask))
  if kind == "adamw":
    return base
  if kind == "sam":
    return optax.chain(sam_optax.sam(rho), base)
  raise ValueError(f"unknown optimizer {kind!r}")


class FineTuner:
  """One compiled chunk of ``cfg['chunk']`` steps per (mode, optimizer).

  A run is ``(seed, rho, total steps)``; the pre-trained parameters and the
  labelled lines (padded to the full training set, ``n`` of them valid)
  are arguments, so every fraction shares the program.
  """

  def __init__(self, model: sm.LanguageModel, cfg: dict[str, Any], mode: str, kind: str,
               num_classes: int):
    self.cfg, self.mode, self.kind = cfg, mode, kind
    scale = cfg["alpha"] / cfg["rank"]
    B = cfg["batch"]

    def init(seed, rho, total, base):
      k_head, k_lora, _, _ = jax.random.split(jax.random.key(seed), 4)
      head = init_head(k_head, cfg["d_model"], num_classes)
      if mode == "full":
        trained = {"base": base, "head": head}
      else:
        trained = {"adapters": init_adapters(k_lora, base, cfg["rank"]), "head": head}
      return trained, make_tx(kind, cfg, mode, rho, total).init(trained)

    def chunk(state, base, norm, seed, rho, total, start, xs, ms, ys, n):
      _, _, k_data, k_drop = jax.random.split(jax.random.key(seed), 4)
      tx = make_tx(kind, cfg, mode, rho, total)

      def body(carry, t):
        trained, opt_state = carry
        idx = jax.random.randint(jax.random.fold_in(k_data, t), (B,), 0, n)
        loss_fn = loss_closure(model, mode, base, xs[idx], ms[idx], ys[idx],
                               jax.random.fold_in(k_drop, t), scale, norm)
        loss, grads = jax.value_and_grad(loss_fn)(trained)
        updates, opt_state = tx.update(grads, opt_state, trained, loss_fn=loss_fn)
        return (optax.apply_updates(trained, updates), opt_state), loss

      return jax.lax.scan(body, state, start + jnp.arange(cfg["chunk"]))

    self._init = jax.jit(init)
    self._chunk_jit = jax.jit(chunk, donate_argnums=0)
    self._chunk = None
    self.compile_s = 0.0
    self.last_cpu_s = 0.0

  def run(self, seed: int, rho: float, steps: int, base, data, norm=None):
    """Trains one run; returns the trained tree, its batch losses and seconds."""
    xs, ms, ys, n = data
    total = jnp.asarray(steps, jnp.float32)
    rho_a = jnp.asarray(rho, jnp.float32)
    seed_a = jnp.asarray(seed, jnp.uint32)
    state = self._init(seed_a, rho_a, total, base)
    args = (base, norm, seed_a, rho_a, total, jnp.asarray(0, jnp.int32), xs, ms, ys, n)
    if self._chunk is None:  # compiled once, outside the timed part
      t0 = time.perf_counter()
      self._chunk = self._chunk_jit.lower(state, *args).compile()
      self.compile_s = time.perf_counter() - t0
    losses = []
    t0, c0 = time.perf_counter(), time.process_time()
    for first in range(0, steps, self.cfg["chunk"]):
      state, loss = self._chunk(state, base, norm, seed_a, rho_a, total,
                                jnp.asarray(first, jnp.int32), xs, ms, ys, n)
      losses.append(loss)
    losses = np.concatenate([np.asarray(l) for l in jax.device_get(losses)])
    self.last_cpu_s = time.process_time() - c0
    return state[0], losses, time.perf_counter() - t0


def make_evaluator(model: sm.LanguageModel, mode: str, cfg: dict[str, Any]):
  """``(trained, base, norm, x, mask, y, valid) -> (accuracy, mean loss)`` over valid rows."""
  scale, eb = cfg["alpha"] / cfg["rank"], cfg["eval_batch"]

  def evaluate(trained, base, norm, x, mask, y, valid):
    lm_params, head = effective(mode, base, trained, scale)
    n = x.shape[0] // eb

    def one(args):
      xb, mb, yb, vb = args
      logits = classify(model, lm_params, head, xb, mb, None, norm).astype(jnp.float32)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      right = (jnp.argmax(logits, -1) == yb).astype(jnp.float32)
      return jnp.sum(right * vb), jnp.sum(loss * vb)

    right, loss = jax.lax.map(one, tuple(a.reshape(n, eb, *a.shape[1:])
                                         for a in (x, mask, y, valid)))
    count = jnp.sum(valid)
    return jnp.sum(right) / count, jnp.sum(loss) / count

  return jax.jit(evaluate)


# ----------------------------------------------------------------------- data

def task_data(corpus: text.Corpus, cfg: dict[str, Any]) -> dict[str, Any]:
  """Labelled lines of every split, no line text in two splits.

  A validation line whose text also occurs among the training lines is
  dropped, and a test line whose text occurs among the training or the
  validation lines (repeated lines, refrains).
  """
  lines = {s: text.play_lines(corpus, s, seed=cfg["data_seed"]) for s in text.SPLITS}
  seen = set(lines["train"].lines)
  out: dict[str, Any] = {"lines": {"train": lines["train"]}, "dropped": {}}
  for s in ("val", "test"):
    keep = [i for i, ln in enumerate(lines[s].lines) if ln not in seen]
    out["dropped"][s] = len(lines[s].lines) - len(keep)
    seen |= set(lines[s].lines)
    if cfg["max_eval_lines"] is not None:  # evenly spaced subset (quick mode)
      keep = [keep[i] for i in np.linspace(0, len(keep) - 1,
                                           min(len(keep), cfg["max_eval_lines"]))
              .round().astype(int)]
    out["lines"][s] = text.PlayLines([lines[s].lines[i] for i in keep],
                                     lines[s].labels[keep], lines[s].plays)
  return out


def fraction_order(labels: np.ndarray, seed: int) -> list[np.ndarray]:
  """Per class, a fixed permutation of its line indices (prefixes nest)."""
  rng = np.random.default_rng(seed)
  return [rng.permutation(np.flatnonzero(labels == k)) for k in range(int(labels.max()) + 1)]


def fraction_indices(order: list[np.ndarray], fraction: float) -> np.ndarray:
  """``fraction`` of every class's lines (at least one), in a fixed shuffled order."""
  idx = np.concatenate([o[:max(1, int(round(fraction * len(o))))] for o in order])
  return idx[np.random.default_rng(len(idx)).permutation(len(idx))]


def encode(pl: text.PlayLines, idx, vocab: text.Vocab, length: int, rows: int):
  """Rows ``idx`` of ``pl`` encoded and padded to ``rows`` rows: x, mask, y, valid."""
  x, m = text.encode_lines([pl.lines[i] for i in idx], vocab, length)
  xs = np.zeros((rows, length), np.int32)
  ms = np.zeros((rows, length), np.float32)
  ys = np.zeros((rows,), np.int32)
  valid = np.zeros((rows,), np.float32)
  k = len(idx)
  xs[:k], ms[:k], ys[:k], valid[:k] = x, m, pl.labels[np.asarray(idx, int)], 1.0
  return xs, ms, ys, valid


# ---------------------------------------------------------------- pre-training

def pretrain_settings(cfg: dict[str, Any]) -> dict[str, Any]:
  return {k: cfg[k] for k in ("d_model", "num_layers", "num_heads", "length", "dropout",
                               "attention_dropout", "pre_steps", "pre_batch", "pre_lr",
                               "pre_b2", "pre_weight_decay", "pre_seed",
                               "pre_eval_windows")}


def _lm_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
  """language_model.py's trainer settings for pre-training."""
  steps = cfg["pre_steps"]
  return dict(lm.DEFAULTS, length=cfg["length"], batch=cfg["pre_batch"], steps=steps,
              lr=cfg["pre_lr"], b2=cfg["pre_b2"], weight_decay=cfg["pre_weight_decay"],
              chunk=math.gcd(50, steps), eval_windows=cfg["pre_eval_windows"],
              eval_batch=min(128, cfg["pre_eval_windows"]))


def pretrained(model: sm.LanguageModel, corpus: text.Corpus, cfg: dict[str, Any],
               cache: Path | None) -> tuple[Any, dict[str, Any]]:
  """The pre-trained parameters and a record; loaded from ``cache`` when there."""
  settings = pretrain_settings(cfg)
  key = hashlib.sha256(json.dumps([settings, corpus.summary(), jax.__version__],
                                  sort_keys=True).encode()).hexdigest()[:16]
  template = model.init(jax.random.key(0))
  leaves, treedef = jax.tree.flatten(template)
  path = None if cache is None else Path(cache) / f"fine_tuning_pretrained_{key}.npz"
  if path is not None and path.exists():
    with np.load(path) as z:
      record = json.loads(str(z["record"]))
      params = jax.tree.unflatten(treedef, [jnp.asarray(z[f"p{i}"])
                                            for i in range(len(leaves))])
    return params, {**record, "cached": True}
  lcfg = _lm_cfg(cfg)
  full = corpus.splits["train"]
  pad_starts = len(text.window_starts(full, cfg["length"]))
  _, data = lm.train_data(full, 1.0, cfg["length"], 0, full.num_tokens, pad_starts)
  trainer = lm.Trainer(model, lcfg, "adamw")
  params, losses, sec = trainer.run(cfg["pre_seed"], 0.0, cfg["pre_steps"], data)
  evaluate = lm.make_evaluator(model, lcfg["eval_batch"])
  record = {"steps": cfg["pre_steps"], "s": sec, "compile_s": trainer.compile_s,
            "train_batch_loss_end": float(np.mean(losses[-max(1, len(losses) // 10):])),
            "key": key}
  for s in ("val", "test"):
    w = lm.eval_set(corpus.splits[s], cfg["length"], lcfg["eval_windows"],
                    lcfg["eval_batch"])
    record[f"{s}_loss"] = float(evaluate(params, *(jnp.asarray(a) for a in w)))
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, record=json.dumps(record),
             **{f"p{i}": np.asarray(p) for i, p in enumerate(jax.tree.leaves(params))})
    tmp.replace(path)
  return params, {**record, "cached": False}


# ------------------------------------------------------------------------ run

def paired(methods: dict[str, Any]) -> dict[str, Any]:
  """Paired test-accuracy differences with their 95% t-intervals and verdicts."""
  out = {}
  for a, b in PAIRS:
    d = stats.paired(methods[a]["test_acc"]["per_seed"], methods[b]["test_acc"]["per_seed"])
    d["half_width"] = stats.t_half_width(d)  # higher accuracy is better; wins: a > b
    d["verdict"] = stats.verdict(d, higher_is_better=True)
    out[f"{a}-{b}"] = d
  return out


def run_all(cfg: dict[str, Any], cache: Path | None) -> dict[str, Any]:
  corpus = text.load_corpus()
  print(corpus.summary(), flush=True)
  model = sm.language_model("transformer", corpus.vocab.size, length=cfg["length"],
                            d_model=cfg["d_model"], num_layers=cfg["num_layers"],
                            num_heads=cfg["num_heads"], dropout=cfg["dropout"],
                            attention_dropout=cfg["attention_dropout"])
  t0 = time.perf_counter()
  base, pre = pretrained(model, corpus, cfg, cache)
  pre["wall_s"] = time.perf_counter() - t0
  how = "cached" if pre["cached"] else f"{pre['s']:.0f} s"
  print(f"pre-trained ({how}): val loss {pre['val_loss']:.3f} nats/char", flush=True)
  task = task_data(corpus, cfg)
  K = len(corpus.plays)
  L = cfg["line_length"]
  train_lines = task["lines"]["train"]
  order = fraction_order(train_lines.labels, cfg["data_seed"])
  n_full = len(train_lines.lines)
  evals = {}
  for s in ("val", "test"):
    pl = task["lines"][s]
    rows = -(-len(pl.lines) // cfg["eval_batch"]) * cfg["eval_batch"]
    evals[s] = tuple(jnp.asarray(a) for a in encode(pl, np.arange(len(pl.lines)),
                                                    corpus.vocab, L, rows))
  tuners = {(mode, kind): FineTuner(model, cfg, mode, kind, K)
            for mode in MODES for kind in ("adamw", "sam")}
  evaluators = {mode: make_evaluator(model, mode, cfg) for mode in MODES}
  scale = cfg["alpha"] / cfg["rank"]
  n_trained = {
      "full": sm.num_params(base) + cfg["d_model"] * K + K,
      "lora": sm.num_params(init_adapters(jax.random.key(0), base, cfg["rank"]))
              + cfg["d_model"] * K + K}
  seeds, rhos = cfg["seeds"], list(cfg["rhos"])
  fractions: dict[str, Any] = {}
  for fraction in cfg["fractions"]:
    idx = fraction_indices(order, fraction)
    xs, ms, ys, _ = encode(train_lines, idx, corpus.vocab, L, n_full)
    data = (jnp.asarray(xs), jnp.asarray(ms), jnp.asarray(ys), jnp.asarray(len(idx), jnp.int32))
    k = len(idx)
    norm = feature_norm(model, base, data[0][:k], data[1][:k])
    entry: dict[str, Any] = {"fraction": fraction, "train_lines": int(len(idx)),
                             "epochs": cfg["steps"] * cfg["batch"] / len(idx), "modes": {}}
    for mode in MODES:
      runs: dict[tuple[str, float, int], dict[str, Any]] = {}

      def train(method: str, rho: float, seed: int, mode=mode, runs=runs) -> dict[str, Any]:
        key = (method, float(rho), int(seed))
        if key not in runs:
          kind = "adamw" if method == "adamw2x" else method
          steps = cfg["steps"] * STEP_FACTOR[method]
          tuner = tuners[(mode, kind)]
          trained, losses, sec = tuner.run(seed, rho, steps, base, data, norm)
          rec = {"s": sec, "cpu_s": tuner.last_cpu_s,
                 "last": float(np.mean(losses[-max(1, steps // 10):])),
                 "curve": losses[::max(1, steps // 100)]}
          for s in ("val", "test"):
            acc, loss = evaluators[mode](trained, base, norm, *evals[s])
            rec[f"{s}_acc"], rec[f"{s}_loss"] = float(acc), float(loss)
          runs[key] = rec
        return runs[key]

      select = seeds[:cfg["select_seeds"]]
      methods: dict[str, Any] = {}
      for method in METHODS:
        if method == "sam":  # ρ by validation accuracy (ties: loss) of the selection seeds
          grid = rhos
          val_grid = [[train(method, r, sd)["val_acc"] for sd in select] for r in grid]
          val_loss_grid = [[train(method, r, sd)["val_loss"] for sd in select] for r in grid]
          score = [(-np.mean(a), np.mean(l)) for a, l in zip(val_grid, val_loss_grid)]
          rho = grid[min(range(len(grid)), key=lambda i: score[i])]
        else:
          grid, val_grid, rho = None, None, 0.0
        res = [train(method, rho, sd) for sd in seeds]
        pick = lambda k: np.asarray([r[k] for r in res])  # noqa: E731
        methods[method] = {
            "rho": None if method.startswith("adamw") else rho,
            "rho_grid": grid, "val_acc_grid": val_grid,
            "val_acc": stats.summary(pick("val_acc")),
            "val_loss": stats.summary(pick("val_loss")),
            "test_acc": stats.summary(pick("test_acc")),
            "test_loss": stats.summary(pick("test_loss")),
            "train_batch_loss_end": stats.summary(pick("last")),
            "steps": cfg["steps"] * STEP_FACTOR[method],
            "passes_per_step": PASSES[method],
            "run_s": float(pick("s").mean()),
            "run_cpu_s": float(pick("cpu_s").mean()),
            "curve": np.mean([r["curve"] for r in res], axis=0).tolist(),
        }
        m = methods[method]
        print(f"{fraction:>5.0%} {MODE_LABELS[mode]:<5} {LABELS[method]:<16} ρ={m['rho']}"
              f"  test acc {m['test_acc']['mean']:.4f} ± {m['test_acc']['std']:.4f}"
              f"  val {m['val_acc']['mean']:.4f}  train-end"
              f" {m['train_batch_loss_end']['mean']:.3f}  {m['run_s']:.1f} s/run",
              flush=True)
      entry["modes"][mode] = {"methods": methods, "paired": paired(methods),
                              "runs": len(runs)}
    fractions[f"{fraction:g}"] = entry
  return {"fractions": fractions, "pretrain": pre,
          "n_params": sm.num_params(base), "n_trained": n_trained,
          "lora_targets": lora_targets(base), "lora_scale": scale,
          "task": {"classes": list(corpus.plays),
                   "lines": {s: len(task["lines"][s].lines) for s in text.SPLITS},
                   "dropped_duplicates": task["dropped"]},
          "compile_s": {f"{m}-{k}": t.compile_s for (m, k), t in tuners.items()},
          "model_description": model.description, "corpus": corpus.summary()}


# --------------------------------------------------------------------- report

def _pair_cell(d: dict[str, Any] | None) -> str:
  if d is None:
    return "–"
  half = d.get("half_width", float("nan"))
  hw = "n/a" if not math.isfinite(half) else f"{100 * half:.1f}"
  return (f"{100 * d['mean']:+.1f} ± {hw} ({d['wins']}/{d['n']}),"
          f" **{d['verdict']}**")


def report(result: dict[str, Any]) -> str:
  s = result["settings"]
  pre = result["pretrain"]
  header = ["train lines", "mode", "optimizer", "ρ", "steps × passes", "val acc",
            "test acc", "Δ test vs AdamW (wins)", "Δ test vs AdamW 2× (wins)", "s/run"]
  rows = []
  for entry in result["fractions"].values():
    lines = f"{entry['fraction']:.0%} ({entry['train_lines']:,})"
    for mode in MODES:
      e_mode = entry["modes"][mode]
      for m in METHODS:
        e = e_mode["methods"][m]
        p = e_mode["paired"]
        rows.append([
            lines, MODE_LABELS[mode], LABELS[m], "–" if e["rho"] is None else f"{e['rho']:g}",
            f"{e['steps']} × {e['passes_per_step']}",
            f"{100 * e['val_acc']['mean']:.1f}",
            stats.pct(e["test_acc"]["mean"], e["test_acc"]["std"]),
            _pair_cell(p.get(f"{m}-adamw")),
            _pair_cell(p.get(f"{m}-adamw2x")),
            f"{e['run_s']:.0f}"])
  k = min(s["select_seeds"], len(s["seeds"]))
  sel = (f"seed {s['seeds'][0]}" if k == 1 else f"seeds {s['seeds'][0]}–{s['seeds'][k - 1]}")
  task = result["task"]
  env = result["environment"]
  quick = " **Quick smoke-test settings, not a result.**" if s.get("quick") else ""
  out = [
      f"Measured by `benchmarks/fine_tuning.py`{quick} ({result['model_description']},"
      f" {result['n_params']:,} parameters, pre-trained as a language model for"
      f" {s['pre_steps']} AdamW steps of {s['pre_batch']} × {s['length']} characters on"
      f" the training split: validation loss {pre['val_loss']:.3f} nats/char."
      f" Task: which of {len(task['classes'])} plays a spoken line comes from;"
      f" {task['lines']['train']:,} training, {task['lines']['val']:,} validation and"
      f" {task['lines']['test']:,} test lines from disjoint blocks, chance"
      f" {100 / len(task['classes']):.1f}%; linear head on the mean-pooled final"
      f" hidden states (standardized). *full*: every weight trained ({result['n_trained']['full']:,}"
      f" parameters), lr {s['lr_full']:g}; *LoRA*: rank-{s['rank']} adapters"
      f" (α = {s['alpha']:g}) on the {len(result['lora_targets'])} attention and MLP"
      f" kernels plus the head ({result['n_trained']['lora']:,} parameters), the"
      f" pre-trained weights frozen and outside SAM's perturbation, lr {s['lr_lora']:g}."
      f" {s['steps']} steps of {s['batch']} lines for AdamW and SAM, AdamW 2× twice"
      f" as many; {len(s['seeds'])} paired seeds; {env['cpu_count']} CPU cores, jax"
      f" {env['jax']}; {env['date']}; {result['wall_s'] / 60:.1f} min wall clock,"
      f" {result.get('cpu_s', 0) / 60:.1f} min process CPU time{lm._load_text(result)})."
      f" Accuracies in % (mean ± std over seeds); SAM's ρ selected per fraction and"
      f" mode from {list(s['rhos'])} by the validation accuracy of {sel}. Δ: paired"
      f" per-seed difference of test accuracy in points ± the half-width of its 95%"
      f" t-interval (in brackets the seeds where it is higher); **win**/**loss**: the"
      f" interval lies above/below 0, **tie** otherwise. *s/run*: training seconds"
      f" per run on a shared machine. Reproduce with"
      f" `python benchmarks/fine_tuning.py --report docs/benchmarks/fine_tuning.md`.", "",
      stats.markdown_table(header, rows), "",
      "Where SAM wins, loses or ties (test accuracy; verdicts as above):", ""]
  for entry in result["fractions"].values():
    cells = []
    for mode in MODES:
      p = entry["modes"][mode]["paired"]
      a, b, c = p["sam-adamw"], p["sam-adamw2x"], p["adamw2x-adamw"]
      cells.append(f"{MODE_LABELS[mode]}: SAM {a['verdict']} against AdamW"
                   f" ({100 * a['mean']:+.1f} points, {a['wins']}/{a['n']} seeds higher),"
                   f" {b['verdict']} against AdamW 2× ({100 * b['mean']:+.1f},"
                   f" {b['wins']}/{b['n']}); AdamW 2× {c['verdict']} against AdamW")
    out.append(f"* {entry['fraction']:.0%} of the training lines: " + "; ".join(cells) + ".")
  out += ["", f"![fine-tuning test accuracy](benchmarks/results/{PLOT_NAME})"]
  return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fr = result["fractions"]
  x = [e["fraction"] for e in fr.values()]
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
  for j, mode in enumerate(MODES):
    for i, m in enumerate(METHODS):
      mean = [100 * e["modes"][mode]["methods"][m]["test_acc"]["mean"] for e in fr.values()]
      std = [100 * e["modes"][mode]["methods"][m]["test_acc"]["std"] for e in fr.values()]
      axes[0].errorbar(x, mean, yerr=std, marker="o" if mode == "full" else "s",
                       ls="-" if mode == "full" else "--", capsize=3, color=f"C{i}",
                       label=f"{LABELS[m]} ({MODE_LABELS[mode]})")
  axes[0].set_xscale("log")
  axes[0].set_xticks(x, [f"{v:.0%}" for v in x])
  axes[0].minorticks_off()
  axes[0].set_xlabel("fraction of the labelled training lines")
  axes[0].set_ylabel("test accuracy (%)")
  axes[0].legend(fontsize=7)
  width = 0.2
  slots = [(mode, pair) for mode in MODES for pair in ("sam-adamw", "adamw2x-adamw")]
  for k, (mode, pair) in enumerate(slots):
    off = (k - (len(slots) - 1) / 2) * width
    for i, e in enumerate(fr.values()):
      d = e["modes"][mode]["paired"][pair]
      vals = 100 * np.asarray(d["per_seed"])
      axes[1].scatter(np.full(len(vals), i + off), vals, s=12, color=f"C{k}",
                      label=(f"{'SAM' if pair.startswith('sam') else 'AdamW 2×'} − AdamW"
                             f" ({MODE_LABELS[mode]})") if i == 0 else None)
      half = d.get("half_width", float("nan"))
      if math.isfinite(half):
        axes[1].errorbar(i + off, 100 * d["mean"], yerr=100 * half, fmt="_", color="k",
                         capsize=3)
  axes[1].axhline(0, color="gray", lw=0.8)
  axes[1].set_xticks(range(len(fr)), [f"{v:.0%}" for v in x])
  axes[1].set_xlabel("fraction of the labelled training lines")
  axes[1].set_ylabel("Δ test acc. vs AdamW (points)")
  axes[1].set_title("per seed; bars: mean ± 95% t-interval", fontsize=9)
  axes[1].legend(fontsize=7)
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--seeds", type=int, default=4)
  parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
  parser.add_argument("--rhos", type=float, nargs="+", default=list(RHOS))
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
  parser.add_argument("--cache", type=Path,
                      default=Path(tempfile.gettempdir()) / "sam_optax_fine_tuning",
                      help="folder of the cached pre-trained parameters")
  parser.add_argument("--report", "--readme", dest="readme", type=Path, default=None)
  parser.add_argument("--report-only", action="store_true",
                      help="rewrite the report region and the plot from the JSON")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: a tiny model, 20 steps, 2 seeds, one fraction, one ρ")
  args = parser.parse_args(argv)
  path = args.out / JSON_NAME
  if args.report_only:
    result = json.loads(path.read_text())
  else:
    cfg = dict(DEFAULTS)
    if args.quick:
      cfg.update(QUICK)
      args.seeds, args.rhos = 2, [0.05]
      if args.fractions == list(FRACTIONS):
        args.fractions = [0.2]
    if args.steps is not None:
      cfg["steps"] = args.steps
    cfg["chunk"] = math.gcd(cfg["chunk"], cfg["steps"])
    cfg.update(seeds=list(range(args.seeds)), fractions=list(args.fractions),
               rhos=list(args.rhos), quick=bool(args.quick))
    t0, c0, load0 = time.perf_counter(), time.process_time(), lm._load()
    result = {
        "settings": cfg,
        "environment": {**gen.environment(), "date": time.strftime("%Y-%m-%d")},
        "command": "python benchmarks/fine_tuning.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        **run_all(cfg, args.cache),
    }
    result["wall_s"] = time.perf_counter() - t0
    result["cpu_s"] = time.process_time() - c0
    result["load_average"] = {"start": load0, "end": lm._load()}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
  plot(result, args.out / PLOT_NAME)
  if args.readme is not None:
    readme_lib.replace_region(args.readme, START, END, report(result))
  print(report(result))
  return result


if __name__ == "__main__":
  main()
