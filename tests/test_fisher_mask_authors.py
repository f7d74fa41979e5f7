"""``fisher_masked_sam(style="fsam4plm")`` against a float64 transcription of
Zhong et al.'s Fisher-mask SAM.

Transcribed from WHU-ZQH/FSAM4PLM (commit 77d5b3bc5de6e613078ceb33a41c45dc9b2fc0cc),
``fairseq-FSAM/optim/samsgd.py``, class ``SAM_Mask``, and the fairseq loop
around it (``trainer.py`` ``train_step``, ``optim/fairseq_optimizer.py``
``step``):

* ``init_mask`` (l. 249-256): every named parameter gets a mask, then those
  whose dotted name contains ``'bias'`` or ``'embed'`` and the parameters of
  ``BatchNorm1d``/``BatchNorm2d`` modules are removed from it;
* every ``mask_iter_e`` updates (``num_updates % mask_iter_e == 0``, trainer
  l. 690; 100 in the scripts), before the step, ``set_fisher_mask``
  (l. 277-313) squares the gradient in ``p.grad`` (the batch-mean gradient:
  the trainer has divided the summed loss's gradient by ``sample_size``,
  l. 824; ``--clip-norm 0.0``), for the parameters still in the mask only,
  concatenates them in ``named_parameters`` order and keeps the top
  ``int(all_param_size * keep_ratio)`` (``keep_ratio=0.1``) by
  ``torch.sort(descending=True)``;
* ``first_step`` (l. 332-347): ``grad_norm`` over *all* parameters
  (``SAM._grad_norm``), ``e_w = p.grad * rho / (grad_norm + 1e-7)``,
  multiplied by the mask for the parameters in it; the removed ones are
  moved by the whole ``e_w``;
* the gradient at ``w + e_w`` is taken, ``w`` restored and the base
  optimizer steps with it.

Not copied (documented in ``fisher_masked_sam``): on refresh steps
``set_fisher_mask`` calls ``self.model.zero_grad()`` before ``first_step``
reads ``p.grad``, so the authors' refresh steps are unperturbed; the second
pass's gradient is of the summed loss (here the same batch-mean loss); the
``old_p`` restore of ``SAM.second_step``, which ``SAM_Mask`` never stores
(the ``e_w`` restore of their ESAM classes is used); ties in ``torch.sort``.
The base optimizer here is plain SGD (theirs: torch ``Adam``), so the
comparison isolates the perturbation.

The model is written twice: hand-derived forward and backward passes in
float64 NumPy with PyTorch-style names (``embed_tokens.weight``, ``bn.weight``
...), and a JAX loss over a Flax-style tree (``Embed_0/embedding``,
``BatchNorm_0/scale`` ...), so the transcription does not reuse the library's
name rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

VOCAB, DIM, HIDDEN, OUT, BATCH = 7, 3, 6, 2, 8
NORM_EPS = 1e-5
LR = 0.3

# PyTorch name -> Flax path, in the order of the authors' `named_parameters`.
NAMES = {
    "embed_tokens.weight": ("Embed_0", "embedding"),
    "fc0.weight": ("Dense_0", "kernel"),
    "fc0.bias": ("Dense_0", "bias"),
    "bn.weight": ("BatchNorm_0", "scale"),
    "bn.bias": ("BatchNorm_0", "bias"),
    "layer_norm.weight": ("LayerNorm_0", "scale"),
    "layer_norm.bias": ("LayerNorm_0", "bias"),
    "fc1.weight": ("Dense_1", "kernel"),
    "fc1.bias": ("Dense_1", "bias"),
}
BATCH_NORM_MODULES = ("bn",)  # the modules `isinstance(m, nn.BatchNorm1d)`
# 18 + 6 + 12 = 36 masked entries: int(36 * 0.1) = 3, round(3.6) = 4.
MASKED = ("fc0.weight", "layer_norm.weight", "fc1.weight")


def _start(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shapes = {
      "embed_tokens.weight": (VOCAB, DIM), "fc0.weight": (DIM, HIDDEN),
      "fc0.bias": (HIDDEN,), "bn.weight": (HIDDEN,), "bn.bias": (HIDDEN,),
      "layer_norm.weight": (HIDDEN,), "layer_norm.bias": (HIDDEN,),
      "fc1.weight": (HIDDEN, OUT), "fc1.bias": (OUT,),
  }
  w = {k: rng.normal(size=s) * 0.7 for k, s in shapes.items()}
  w["bn.weight"] += 1.0
  w["layer_norm.weight"] += 1.0
  return w


def _batch(t: int):
  rng = np.random.default_rng(100 + t)
  return rng.integers(0, VOCAB, size=BATCH), rng.normal(size=(BATCH, OUT))


# ------------------------------------------------- float64 NumPy model (reference)

def _normalize(x, axis):
  mu = x.mean(axis, keepdims=True)
  inv = 1.0 / np.sqrt(x.var(axis, keepdims=True) + NORM_EPS)
  return (x - mu) * inv, inv


def _normalize_back(dxhat, xhat, inv, axis):
  n = xhat.shape[axis]
  return inv / n * (
      n * dxhat - dxhat.sum(axis, keepdims=True)
      - xhat * (dxhat * xhat).sum(axis, keepdims=True)
  )


def _np_grad(w, batch):
  """The batch-mean loss's gradient, by hand (what ``p.grad`` holds)."""
  tok, target = batch
  x = w["embed_tokens.weight"][tok]
  a = np.tanh(x @ w["fc0.weight"] + w["fc0.bias"])
  n, inv = _normalize(a, 0)                       # BatchNorm1d, training mode
  h = n * w["bn.weight"] + w["bn.bias"]
  m, inv2 = _normalize(h, 1)                      # LayerNorm
  l = m * w["layer_norm.weight"] + w["layer_norm.bias"]
  y = l @ w["fc1.weight"] + w["fc1.bias"]
  dy = (y - target) / BATCH                       # mean over the batch of ½‖y − t‖²
  g = {"fc1.weight": l.T @ dy, "fc1.bias": dy.sum(0)}
  dl = dy @ w["fc1.weight"].T
  g["layer_norm.weight"], g["layer_norm.bias"] = (dl * m).sum(0), dl.sum(0)
  dc = _normalize_back(dl * w["layer_norm.weight"], m, inv2, 1)
  g["bn.weight"], g["bn.bias"] = (dc * n).sum(0), dc.sum(0)
  da = _normalize_back(dc * w["bn.weight"], n, inv, 0) * (1 - a * a)
  g["fc0.weight"], g["fc0.bias"] = x.T @ da, da.sum(0)
  g["embed_tokens.weight"] = np.zeros_like(w["embed_tokens.weight"])
  np.add.at(g["embed_tokens.weight"], tok, da @ w["fc0.weight"].T)
  return g


class _SAMMask:
  """``SAM_Mask`` with plain SGD as the base optimizer, in float64."""

  def __init__(self, rho=0.05, keep_ratio=0.1, mask_iter_e=100):
    self.rho, self.keep_ratio, self.mask_iter_e = rho, keep_ratio, mask_iter_e
    self.num_updates = 0
    # init_mask
    self.mask = {name: None for name in NAMES}
    for part in ("bias", "embed"):
      for name in list(self.mask):
        if part in name:
          self.mask.pop(name)
    for module in BATCH_NORM_MODULES:
      for name in (module, module + ".weight", module + ".bias"):
        self.mask.pop(name, None)

  def set_fisher_mask(self, grad):
    fisher = {name: np.square(grad[name]) for name in NAMES if name in self.mask}
    values = np.concatenate([f.reshape(-1) for f in fisher.values()])
    keep_num = int(values.size * self.keep_ratio)
    position = np.zeros_like(values)
    position[np.argsort(-values, kind="stable")[:keep_num]] = 1.0
    start = 0
    for name, f in fisher.items():
      self.mask[name] = position[start:start + f.size].reshape(f.shape)
      start += f.size

  def step(self, w, batch):
    grad = _np_grad(w, batch)
    if self.num_updates % self.mask_iter_e == 0:
      self.set_fisher_mask(grad)
    grad_norm = np.sqrt(sum(np.sum(g * g) for g in grad.values()))
    scale = self.rho / (grad_norm + 1e-7)
    e_w = {}
    for name in NAMES:
      e_w[name] = grad[name] * scale
      if name in self.mask:
        e_w[name] = e_w[name] * self.mask[name]
    perturbed = _np_grad({k: w[k] + e_w[k] for k in NAMES}, batch)
    self.num_updates += 1
    new_w = {k: w[k] - LR * perturbed[k] for k in NAMES}
    return new_w, e_w


def _reference(steps, **kw):
  opt, w, out = _SAMMask(**kw), _start(), []
  for t in range(steps):
    w, e_w = opt.step(w, _batch(t))
    out.append((w, e_w, {k: np.array(v) for k, v in opt.mask.items()}))
  return out


# ------------------------------------------------------------- the JAX side

def _to_tree(w, dtype=jnp.float32):
  tree = {}
  for name, (module, leaf) in NAMES.items():
    tree.setdefault(module, {})[leaf] = jnp.asarray(w[name], dtype)
  return tree


def _from_tree(tree):
  return {name: np.asarray(tree[m][l], np.float64) for name, (m, l) in NAMES.items()}


def _jnp_normalize(x, axis):
  mu = x.mean(axis, keepdims=True)
  return (x - mu) / jnp.sqrt(x.var(axis, keepdims=True) + NORM_EPS)


def _loss(p, tok, target):
  x = p["Embed_0"]["embedding"][tok]
  a = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  h = _jnp_normalize(a, 0) * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"]
  l = _jnp_normalize(h, 1) * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"]
  y = l @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  return jnp.mean(0.5 * jnp.sum((y - target) ** 2, axis=-1))


def _fisher_state(state):
  return [
      x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, sam_optax.FisherMaskState))
      if isinstance(x, sam_optax.FisherMaskState)
  ][0]


def _run(tx, steps, dtype=jnp.float64):
  """``steps`` jitted updates; in float64 (under ``jax.enable_x64``) by default."""
  with jax.enable_x64(dtype == jnp.float64):
    return _run_in(tx, steps, dtype)


def _run_in(tx, steps, dtype):
  chained = optax.chain(tx, optax.sgd(LR))

  @jax.jit
  def step(p, s, tok, target):
    loss_fn = lambda q: _loss(q, tok, target)
    updates, s = chained.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, updates), s

  p = _to_tree(_start(), dtype)
  s = chained.init(p)
  out = []
  for t in range(steps):
    tok, target = _batch(t)
    p, s = step(p, s, jnp.asarray(tok), jnp.asarray(target, dtype))
    mask = _fisher_state(s).mask
    out.append((_from_tree(p), {n: np.asarray(mask[m][l]) for n, (m, l) in NAMES.items()}))
  return out


def _assert_matches(got, want, rtol=1e-9, atol=1e-11):
  for t, ((p, mask), (w, _, want_mask)) in enumerate(zip(got, want)):
    for name in NAMES:
      if name in want_mask:
        np.testing.assert_array_equal(mask[name], want_mask[name] == 1.0,
                                      err_msg=f"mask of {name} at step {t}")
      else:  # outside the authors' mask: the whole perturbation
        assert mask[name].all(), f"{name} is not fully perturbed at step {t}"
      np.testing.assert_allclose(p[name], w[name], rtol=rtol, atol=atol,
                                 err_msg=f"{name} after step {t}")


# ------------------------------------------------------------------- tests

def test_the_numpy_model_is_the_jax_model():
  w, batch = _start(), _batch(0)
  with jax.enable_x64(True):
    want = jax.grad(_loss)(_to_tree(w, jnp.float64), jnp.asarray(batch[0]),
                           jnp.asarray(batch[1], jnp.float64))
  got = _np_grad(w, batch)
  for name, g in _from_tree(want).items():
    assert np.max(np.abs(g)) > 1e-3, name  # every parameter matters
    np.testing.assert_allclose(got[name], g, rtol=1e-10, atol=1e-13, err_msg=name)


def test_transcription_is_what_it_claims():
  """The reference itself: exempt names, keep count and full perturbation."""
  ref = _SAMMask(rho=0.05, mask_iter_e=2)
  assert tuple(ref.mask) == MASKED
  w, batch = _start(), _batch(0)
  _, e_w = ref.step(w, batch)
  assert sum(int(m.sum()) for m in ref.mask.values()) == 3  # int(36 * 0.1)
  g = _np_grad(w, batch)
  norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
  for name in ("embed_tokens.weight", "fc0.bias", "bn.weight", "bn.bias", "fc1.bias"):
    np.testing.assert_allclose(e_w[name], 0.05 * g[name] / (norm + 1e-7))


def test_style_fsam4plm_matches_the_authors_over_refreshes():
  """Five steps, the mask refreshed on steps 0, 2 and 4."""
  steps, every = 5, 2
  want = _reference(steps, rho=0.05, mask_iter_e=every)
  got = _run(sam_optax.fisher_masked_sam(0.05, refresh_every=every, style="fsam4plm"), steps)
  _assert_matches(got, want)
  # The refreshes changed the mask, so the test sees them.
  masks = [np.concatenate([want[t][2][n].ravel() for n in MASKED]) for t in range(steps)]
  assert not np.array_equal(masks[0], masks[2]) or not np.array_equal(masks[2], masks[4])
  np.testing.assert_array_equal(masks[0], masks[1])


def test_style_fsam4plm_with_the_authors_defaults():
  """ρ = 0.05, keep_ratio 0.1 and the 100-update refresh: one mask over 3 steps."""
  want = _reference(3)
  got = _run(sam_optax.fisher_masked_sam(style="fsam4plm"), 3)
  _assert_matches(got, want)


def test_the_explicit_options_are_the_style():
  want = _reference(4, rho=0.1, mask_iter_e=3)
  tx = sam_optax.fisher_masked_sam(
      0.1, 0.9, 3, score="current", eps=1e-7, exempt="fsam4plm", count="floor")
  _assert_matches(_run(tx, 4), want)
  tx = sam_optax.fisher_masked_sam(
      0.1, 0.9, 3, score="current", eps=1e-7, exempt=sam_optax.fsam4plm_exempt, count="floor")
  _assert_matches(_run(tx, 4), want)


@pytest.mark.parametrize(
    "options",
    [
        {},                                                    # the library's defaults
        {"style": "fsam4plm", "exempt": False},               # the exempt leaves masked too
        {"style": "fsam4plm", "count": "round"},              # 4 entries kept, not 3
        {"style": "fsam4plm", "score": "accumulated"},        # Σ g² since the last refresh
        {"style": "fsam4plm", "normalize": "masked"},         # ‖M ⊙ g‖
        {"style": "fsam4plm", "eps": 1e-12},                  # SAM's eps, not 1e-7
    ],
    ids=["defaults", "no-exempt", "round", "accumulated", "masked-norm", "eps"],
)
def test_each_departure_from_the_authors_is_seen(options):
  want = _reference(5, rho=0.05, mask_iter_e=2)
  got = _run(sam_optax.fisher_masked_sam(0.05, refresh_every=2, **options), 5)
  with pytest.raises(AssertionError):
    _assert_matches(got, want)


def test_float32_parameters_follow_the_authors_to_float32_precision():
  """The default dtype: same masks, values to float32 rounding (which the
  normalization layers amplify)."""
  want = _reference(3, rho=0.05, mask_iter_e=2)
  got = _run(sam_optax.fisher_masked_sam(0.05, refresh_every=2, style="fsam4plm"), 3,
             dtype=jnp.float32)
  _assert_matches(got, want, rtol=1e-3, atol=1e-5)


def test_traced_hyperparameters_keep_the_authors_count():
  want = _reference(3, rho=0.05, mask_iter_e=2)
  injected = optax.inject_hyperparams(sam_optax.fisher_masked_sam)(
      rho=0.05, sparsity=0.9, refresh_every=2, style="fsam4plm")
  _assert_matches(_run(injected, 3), want)


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("traced", [False, True])
def test_floor_of_an_exact_tenth_is_not_one_short(x64, traced):
  """30 entries, sparsity 0.9: 3 kept (int(30 * 0.1)), though 1 - 0.9 < 0.1 in float64."""
  with jax.enable_x64(x64):
    params = {"w": jnp.linspace(1.0, 2.0, 30)}
    loss_fn = lambda p: 0.5 * jnp.sum(p["w"] ** 2)
    make = optax.inject_hyperparams(sam_optax.fisher_masked_sam) if traced else (
        sam_optax.fisher_masked_sam)
    tx = make(rho=0.05, sparsity=0.9, refresh_every=1, style="fsam4plm")
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))
    _, state = update(jax.grad(loss_fn)(params), state, params)
    mask = _fisher_state(state).mask["w"]
    assert np.asarray(mask).tolist() == [False] * 27 + [True] * 3


def test_fsam4plm_exempt_follows_the_authors_names():
  params = jax.tree.map(jnp.asarray, _to_tree(_start()))
  got = sam_optax.fsam4plm_exempt(params)
  for name, (module, leaf) in NAMES.items():
    assert got[module][leaf] is (name not in MASKED), name
  more = {
      "bn1": {"scale": 1.0}, "batch_norm": {"scale": 1.0},
      "ln_f": {"scale": 1.0}, "norm1": {"scale": 1.0},
      "pos_embed": {"kernel": 1.0}, "layernorm_embedding": {"scale": 1.0},
      "attention": {"kernel": {"value": 1.0}, "bias": {"value": 1.0}},
  }
  assert sam_optax.fsam4plm_exempt(more) == {
      "bn1": {"scale": True}, "batch_norm": {"scale": True},
      "ln_f": {"scale": False}, "norm1": {"scale": False},
      "pos_embed": {"kernel": True}, "layernorm_embedding": {"scale": True},
      "attention": {"kernel": {"value": False}, "bias": {"value": True}},
  }


def test_floor_can_keep_nothing_and_then_only_exempt_leaves_move():
  """keep_ratio · n < 1: the authors keep no entry; exempt leaves still move."""
  params = _to_tree(_start())
  tok, target = _batch(0)
  loss_fn = lambda q: _loss(q, jnp.asarray(tok), jnp.asarray(target, jnp.float32))
  tx = sam_optax.fisher_masked_sam(0.05, sparsity=0.99, style="fsam4plm")
  state = tx.init(params)
  tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
  _, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
  mask = _fisher_state(state).mask
  for name, (module, leaf) in NAMES.items():
    assert bool(mask[module][leaf].any()) is (name not in MASKED), name


def test_option_errors():
  with pytest.raises(ValueError, match=r"`fisher_masked_sam`: `style` must be one of 'fsam4plm'; got style='fsam'"):
    sam_optax.fisher_masked_sam(style="fsam")
  with pytest.raises(ValueError, match=r"`exempt` must be one of 'fsam4plm'"):
    sam_optax.fisher_masked_sam(exempt="biases")
  with pytest.raises(ValueError, match=r"`count` must be one of 'round', 'floor'; got count='ceil'"):
    sam_optax.fisher_masked_sam(count="ceil")
  params = _to_tree(_start())
  bad = jax.tree.map(lambda x: jnp.zeros(x.shape, bool), params)
  with pytest.raises(ValueError, match=r"`exempt` leaves must be Python bools"):
    sam_optax.fisher_masked_sam(exempt=bad).init(params)
  with pytest.raises(ValueError, match=r"`exempt` must have the tree structure"):
    sam_optax.fisher_masked_sam(exempt={"Dense_0": True}).init(params)


def test_map_params_sees_the_mask_with_exempt_leaves():
  """``optax.tree.map_params`` calls ``init`` with a placeholder: ``exempt``
  must not be resolved against it, and the mask still maps to the params."""
  params = _to_tree(_start())
  tx = sam_optax.fisher_masked_sam(style="fsam4plm")
  state = tx.init(params)
  same_shape = optax.tree.map_params(
      tx, lambda leaf, param: jnp.shape(leaf) == jnp.shape(param), state, params,
      transform_non_params=lambda _: None)
  found = jax.tree.leaves(same_shape)
  assert found and all(found) and len(found) >= len(NAMES)
  mask = _fisher_state(state).mask  # exempt leaves start (and stay) selected
  for name, (module, leaf) in NAMES.items():
    assert bool(mask[module][leaf].all()) is (name not in MASKED), name
