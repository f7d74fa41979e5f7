"""The API on sequence models (issue 17): padding masks, dropout keys,
``(loss, aux)`` closures, bf16 activations, remat, sequence-level
m-sharpness, a cheap ascent gradient, and keyword arguments through the Flax
step builders, on the tiny causal models of `tests/sequence_models.py`.

Every update is compared with a reference written out in this file, the
plain two-pass SAM step ``g = ∇L(w); ε = ρ g/‖g‖; u = ∇L(w + ε)``, in float64
(``jax.enable_x64``) where the model allows it, never with the library's own
output. Flax's dropout draws its mask from a uniform in the default float
dtype, which is another mask under x64, so the Flax references run in
float32 with the norm and ε in float64 NumPy; so does the bf16 one, whose
point is the casting.

Compiling is most of the cost here, so the compiled steps and gradients are
shared between tests (losses are module-level functions of
``(params, data)``, with the batch and a dropout key as arguments), and the
tests' own programs are compiled without LLVM's optimizations (`JIT`: a
third of the compile time on CPU; the arithmetic is the same, no fast-math).
The NNX step is compiled through Flax's functional API (split, jit, merge),
what ``nnx.jit`` does, to take the same options.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import sequence_models as sm

RHO, LR = 0.3, 0.5
TOL = 2e-4  # float32 library step against a float64 reference, relative to max |u|
FLAX_TOL = 1e-4  # float32 against float32, through one SGD step (w - LR u)

needs_flax = pytest.mark.skipif(sm.nn is None, reason="needs flax")
if sm.nn is not None:
  import sam_optax.flax  # noqa: F401
  from flax import nnx

Loss = Callable[[Any, dict[str, jax.Array]], jax.Array]
JIT = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# ------------------------------------------------------------------ losses


def padded_loss(params, data):
  return sm.loss(params, data)


def dropout_loss(params, data):
  return sm.loss(params, data, dropout_key=data["key"])


def bf16_loss(params, data):
  return sm.loss(params, data, compute_dtype=jnp.bfloat16)


def remat_block_loss(params, data):
  """The attention block under ``jax.checkpoint``."""
  return sm.loss(params, data, dropout_key=data["key"], remat=True)


# The whole loss rematerialized, nothing saved.
remat_whole_loss = jax.checkpoint(dropout_loss, policy=jax.checkpoint_policies.nothing_saveable)


def aux_loss(params, data):
  return sm.loss_and_metrics(params, data)


def unpadded_loss(params, data):
  """``Σ CE / #tokens`` of `sm.batch()`'s sequences, each run alone at its own
  length: no padding, no mask."""
  total = 0.0
  for i, n in enumerate(sm.LENGTHS):
    tokens, targets = data["tokens"][i:i + 1, :n], data["targets"][i:i + 1, :n]
    logits = sm.forward(params, tokens, jnp.ones((1, n), bool))
    total = total + optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum()
  return total / sum(sm.LENGTHS)


# ----------------------------------------------------------------- helpers


def flat64(tree: Any) -> np.ndarray:
  return np.concatenate(
      [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def assert_close(actual: Any, desired: Any, tol: float = TOL) -> None:
  """Elementwise, relative ``tol`` and absolute ``tol · max|desired|``."""
  a, d = flat64(actual), flat64(desired)
  assert a.shape == d.shape
  np.testing.assert_allclose(a, d, rtol=tol, atol=tol * np.max(np.abs(d)))


def rel_dist(a: Any, b: Any) -> float:
  a, b = flat64(a), flat64(b)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def to64(tree: Any) -> Any:
  """Float64 NumPy leaves (call under ``jax.enable_x64`` to keep them so in JAX)."""
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@functools.cache
def value_and_grad(loss: Loss):
  """One compiled ``value_and_grad`` per loss (again under x64, per dtype)."""
  return JIT(jax.value_and_grad(loss))


def two_pass_reference(
    loss: Loss,
    params: Any,
    data: dict[str, jax.Array],
    *,
    ascent_data: Optional[dict[str, jax.Array]] = None,
) -> tuple[Any, Any, float]:
  """SAM written out in float64: ``g = ∇L(w; ascent_data)``, ``ε = ρ g/‖g‖``,
  ``u = ∇L(w + ε; data)``.

  ``ascent_data`` defaults to ``data``. Returns ``(u, g, L(w + ε; data))``,
  ``u`` and ``g`` as trees of float64 NumPy arrays.
  """
  ascent_data = data if ascent_data is None else ascent_data
  with jax.enable_x64(True):
    w = to64(params)
    _, g = value_and_grad(loss)(w, ascent_data)
    g = to64(g)
    norm = np.sqrt(sum(np.sum(x * x) for x in jax.tree.leaves(g)))
    w_adv = jax.tree.map(lambda a, b: a + RHO * b / norm, w, g)
    loss_adv, u = value_and_grad(loss)(w_adv, data)
    u = to64(u)
  assert all(x.dtype == np.float64 for x in jax.tree.leaves(u))
  return u, g, float(loss_adv)


@functools.partial(JIT, static_argnums=0)
def sam_update(loss: Loss, params, data, grads=None):
  """One library update ``sam(RHO).update(grads, init, params, loss_fn=...)``.

  ``grads`` defaults to the clean gradient ``∇L(w; data)``.
  """
  tx = sam_optax.sam(RHO)
  loss_fn = lambda p: loss(p, data)  # noqa: E731
  if grads is None:
    grads = jax.grad(loss_fn)(params)
  return tx.update(grads, tx.init(params), params, loss_fn=loss_fn)


def with_key(data, key):
  return dict(data, key=key)


def implied_u(before, after):
  """``u`` from one plain SGD step, ``(w - w_new) / LR``, in float64."""
  return jax.tree.map(
      lambda a, b: (np.asarray(a, np.float64) - np.asarray(b, np.float64)) / LR,
      before, after)


# ------------------------------------------- 1. per-token losses, padding


def test_padded_per_token_loss_matches_the_unpadded_two_pass_reference():
  params, data = sm.init_params(), sm.batch()
  assert tuple(np.asarray(data["mask"]).sum(axis=1)) == sm.LENGTHS
  updates, state = sam_update(padded_loss, params, data)
  # The reference never sees a padded position: each sequence at its length.
  u, g, loss_adv = two_pass_reference(unpadded_loss, params, data)
  assert_close(updates, u)
  assert rel_dist(u, g) > 0.05  # the perturbation matters at this ρ
  np.testing.assert_allclose(float(state.stats.grad_norm), np.linalg.norm(flat64(g)), rtol=1e-5)
  np.testing.assert_allclose(float(state.stats.perturbed_loss), loss_adv, rtol=1e-5)


def test_padding_content_does_not_change_the_update():
  params, data = sm.init_params(), sm.batch()
  updates, _ = sam_update(padded_loss, params, data)
  for seed in (1, 2):
    again, _ = sam_update(padded_loss, params, sm.repad(data, seed))
    assert_close(again, updates, tol=1e-6)
  # A change of one valid token does change it: the comparison can fail.
  token = (data["tokens"][1, 2] + 1) % sm.VOCAB
  changed, _ = sam_update(padded_loss, params, dict(data, tokens=data["tokens"].at[1, 2].set(token)))
  assert rel_dist(changed, updates) > 1e-3


# ---------------------------------------------------------- 2. dropout


def test_dropout_key_closed_over_gives_the_same_mask_in_both_passes():
  params, data = sm.init_params(), with_key(sm.batch(), jax.random.key(3))
  updates, _ = sam_update(dropout_loss, params, data)
  u, _, _ = two_pass_reference(dropout_loss, params, data)
  assert_close(updates, u)
  # The float64 reference draws the float32 masks.
  with jax.enable_x64(True):
    loss64, _ = value_and_grad(dropout_loss)(to64(params), data)
  loss32, _ = value_and_grad(dropout_loss)(params, data)
  np.testing.assert_allclose(float(loss64), float(loss32), rtol=1e-5)
  # Another mask in the perturbed pass is another step, far outside the tolerance.
  other, _, _ = two_pass_reference(
      dropout_loss, params, with_key(data, jax.random.key(4)), ascent_data=data)
  assert rel_dist(updates, other) > 100 * TOL


# Linen ------------------------------------------------------------------


@functools.cache
def linen_state():
  """A fresh `sam_optax.flax.TrainState` of `sm.LinenSeq` (immutable, shared)."""
  data = sm.batch()
  init = JIT(functools.partial(sm.LinenSeq().init, train=False))
  variables = init(jax.random.key(0), data["tokens"], data["mask"])
  return sam_optax.flax.TrainState.create(
      apply_fn=sm.LinenSeq().apply, params=variables["params"],
      tx=optax.chain(sam_optax.sam(RHO), optax.sgd(LR)))


@functools.cache
def linen_step():
  return JIT(sam_optax.flax.linen_train_step(sm.linen_model_loss))


@JIT
def linen_grad(params, data, mask, key):
  """``∇L`` of the Linen model by ``model.apply``, dropout key ``key``."""

  def loss(p):
    logits = sm.LinenSeq().apply({"params": p}, data["tokens"], mask, train=True,
                                 rngs={"dropout": key})
    return sm.masked_ce(logits, data["targets"], mask)

  return jax.grad(loss)(params)


def linen_hand_step(params, data, mask, ascent_key, descent_key):
  """The SAM gradient of the Linen model written out: float32 passes, ε in float64."""
  g = to64(linen_grad(params, data, mask, ascent_key))
  norm = np.sqrt(sum(np.sum(x * x) for x in jax.tree.leaves(g)))
  w_adv = jax.tree.map(
      lambda w, d: jnp.asarray(np.asarray(w, np.float64) + RHO * d / norm, jnp.float32),
      params, g)
  return to64(linen_grad(w_adv, data, mask, descent_key))


def step_dropout_key(key, step=0):
  """The documented key of the first random stream ("dropout") at ``step``."""
  return jax.random.fold_in(jax.random.fold_in(key, step), 0)


@needs_flax
def test_linen_train_step_uses_the_same_dropout_mask_in_both_passes():
  state, data, key = linen_state(), sm.batch(), jax.random.key(5)
  new, _ = linen_step()(state, data["tokens"], data["targets"], key=key, mask=data["mask"])
  k = step_dropout_key(key)
  u = implied_u(state.params, new.params)
  assert_close(u, linen_hand_step(state.params, data, data["mask"], k, k), tol=FLAX_TOL)
  # A fresh mask in the perturbed pass would be far outside the tolerance.
  fresh = linen_hand_step(state.params, data, data["mask"], k, jax.random.fold_in(k, 1))
  assert rel_dist(u, fresh) > 100 * FLAX_TOL


# NNX --------------------------------------------------------------------


@functools.cache
def nnx_pristine():
  """An `sm.NNXSeq` as built (initialized in one compiled call); tests train clones."""
  make = lambda: sm.NNXSeq(nnx.Rngs(0, dropout=1))  # noqa: E731
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  return nnx.merge(graphdef, JIT(lambda: nnx.split(make())[1])())


@functools.cache
def nnx_tx():
  """One transformation for every NNX optimizer: it is static in the graph, so
  another would compile the step again."""
  return optax.chain(sam_optax.sam(RHO), optax.sgd(LR))


def nnx_model_and_optimizer():
  model = nnx.clone(nnx_pristine())
  return model, nnx.Optimizer(model, nnx_tx(), wrt=nnx.Param)


@functools.cache
def nnx_compiled_step(graphdef):
  train_step = sam_optax.flax.nnx_train_step(sm.nnx_model_loss)

  @JIT
  def step(state, tokens, targets, mask):
    model, optimizer = nnx.merge(graphdef, state)
    out = train_step(model, optimizer, tokens, targets, mask=mask)
    return nnx.state((model, optimizer)), out

  return step


def nnx_step(model, optimizer, tokens, targets, *, mask):
  """``nnx_train_step(sm.nnx_model_loss)(model, optimizer, tokens, targets,
  mask=mask)``, compiled with Flax's functional API (``nnx.split``, ``jax.jit``,
  ``nnx.merge``) as ``nnx.jit`` does, and `JIT`'s options."""
  graphdef, state = nnx.split((model, optimizer))
  state, out = nnx_compiled_step(graphdef)(state, tokens, targets, mask)
  nnx.update((model, optimizer), state)
  return out


@functools.cache
def nnx_grad(graphdef):
  """``params, rest, data, mask -> ∇L`` of the model ``merge(graphdef, params, rest)``.

  Each call merges a new copy, so calls with the same ``rest`` (RNG
  counters included) draw the same dropout mask.
  """

  @JIT
  def grad(params, rest, data, mask):
    model = nnx.merge(graphdef, params, rest)
    loss = lambda m: sm.nnx_model_loss(m, data["tokens"], data["targets"], mask=mask)[0]  # noqa: E731
    return nnx.grad(loss)(model)

  return grad


def nnx_params(model):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def nnx_hand_step(before, data, mask, *, fresh_perturbed_mask=False):
  """The SAM gradient of an NNX model written out on copies of ``before``.

  Both passes run on copies of the model as it stood before the step (the
  same RNG counter, hence the same dropout mask); with
  ``fresh_perturbed_mask`` the perturbed pass runs on a copy whose dropout
  stream has drawn once more (the next mask, as after the clean pass).
  Float32 passes, ε in float64 NumPy.
  """
  graphdef, params, rest = nnx.split(before, nnx.Param, ...)
  grad = nnx_grad(graphdef)
  g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grad(params, rest, data, mask))]
  if fresh_perturbed_mask:
    after = nnx.clone(before)
    after.dropout.rngs()  # the draw of the clean pass
    rest = nnx.split(after, nnx.Param, ...)[2]
  w = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
  assert [x.shape for x in w] == [x.shape for x in g]
  norm = np.sqrt(sum(np.sum(x * x) for x in g))
  adv = [jnp.asarray(a + RHO * d / norm, jnp.float32) for a, d in zip(w, g)]
  adv = jax.tree.unflatten(jax.tree.structure(params), adv)
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(grad(adv, rest, data, mask))]


@needs_flax
def test_nnx_train_step_uses_the_same_dropout_mask_in_both_passes():
  data = sm.batch()
  model, optimizer = nnx_model_and_optimizer()
  before = nnx.clone(model)
  count = int(model.dropout.rngs.count[...])
  nnx_step(model, optimizer, data["tokens"], data["targets"], mask=data["mask"])
  u = implied_u(nnx_params(before), nnx_params(model))
  assert_close(u, nnx_hand_step(before, data, data["mask"]), tol=FLAX_TOL)
  fresh = nnx_hand_step(before, data, data["mask"], fresh_perturbed_mask=True)
  assert rel_dist(u, fresh) > 100 * FLAX_TOL
  assert int(model.dropout.rngs.count[...]) == count + 1  # one mask drawn per step


# -------------------------------------------------------- 3. (loss, aux)


def test_loss_aux_closure_matches_and_the_metrics_come_from_the_clean_pass():
  params, data = sm.init_params(), sm.batch()
  tx = sam_optax.sam(RHO)

  @JIT
  def step(params, opt_state, data):
    loss_fn = lambda p: aux_loss(p, data)  # noqa: E731  -> (loss, {"accuracy", "tokens"})
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
    return updates, opt_state, loss, metrics

  updates, opt_state, loss, metrics = step(params, tx.init(params), data)
  u, _, loss_adv = two_pass_reference(padded_loss, params, data)
  assert_close(updates, u)
  # The clean pass's metrics, recomputed here from the logits in NumPy.
  logits = np.asarray(JIT(sm.forward)(params, data["tokens"], data["mask"]))
  mask = np.asarray(data["mask"])
  hits = (logits.argmax(-1) == np.asarray(data["targets"])) & mask
  assert int(metrics["tokens"]) == mask.sum() == sum(sm.LENGTHS)
  np.testing.assert_allclose(float(metrics["accuracy"]), hits.sum() / mask.sum(), rtol=1e-6)
  with jax.enable_x64(True):
    clean64, _ = value_and_grad(padded_loss)(to64(params), data)
  np.testing.assert_allclose(float(loss), float(clean64), rtol=1e-5)
  # The perturbed pass's loss is recorded; its aux is dropped.
  stats = sam_optax.sam_stats(opt_state)
  np.testing.assert_allclose(float(stats.perturbed_loss), loss_adv, rtol=1e-5)


@needs_flax
def test_flax_steps_return_the_clean_pass_metrics():
  data, key = sm.batch(), jax.random.key(5)
  mask = np.asarray(data["mask"])
  # Linen: the metrics of the clean pass, with the step's dropout key.
  state = linen_state()
  _, (loss, metrics) = linen_step()(
      state, data["tokens"], data["targets"], key=key, mask=data["mask"])
  logits = JIT(functools.partial(sm.LinenSeq().apply, train=True))(
      {"params": state.params}, data["tokens"], data["mask"],
      rngs={"dropout": step_dropout_key(key)})
  hits = (np.asarray(logits).argmax(-1) == np.asarray(data["targets"])) & mask
  assert int(metrics["tokens"]) == mask.sum()
  np.testing.assert_allclose(float(metrics["accuracy"]), hits.sum() / mask.sum(), rtol=1e-6)
  np.testing.assert_allclose(
      float(loss), float(sm.masked_ce(logits, data["targets"], data["mask"])), rtol=1e-5)
  # NNX: the same from `nnx_train_step`.
  model, optimizer = nnx_model_and_optimizer()
  loss, metrics = nnx_step(model, optimizer, data["tokens"], data["targets"],
                             mask=data["mask"])
  assert int(metrics["tokens"]) == mask.sum()
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0 and np.isfinite(float(loss))


# --------------------------------------- 4. bf16 activations, f32 params


def test_bf16_activations_with_float32_parameters():
  params, data = sm.init_params(), sm.batch()
  updates, state = sam_update(bf16_loss, params, data)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(updates))
  # Reference with the same casting: float32 gradients, ε in float64 NumPy.
  # (Compiled like the step: XLA keeps fused bf16 elementwise results in
  # float32, op-by-op execution rounds each, a difference of bf16 size.)
  _, g = value_and_grad(bf16_loss)(params, data)
  g = to64(g)
  norm = np.sqrt(sum(np.sum(x * x) for x in jax.tree.leaves(g)))
  w_adv = jax.tree.map(
      lambda w, d: jnp.asarray(np.asarray(w, np.float64) + RHO * d / norm, jnp.float32),
      params, g)
  _, u = value_and_grad(bf16_loss)(w_adv, data)
  assert_close(updates, u, tol=2e-2)  # a few bf16 ulps (2^-8)
  assert rel_dist(updates, u) < 1e-2
  # The casting is real: float32 activations give another SAM gradient.
  u32, _, _ = two_pass_reference(padded_loss, params, data)
  assert rel_dist(u, u32) > 1e-3
  assert np.isfinite(float(state.stats.perturbed_loss))


# -------------------------------------------------------------- 5. remat


def remats(loss, params, data) -> bool:
  """Whether the gradient program of ``loss`` holds a ``jax.checkpoint``."""
  eqns = jax.make_jaxpr(jax.grad(loss))(params, data).jaxpr.eqns
  return any(e.primitive.name in ("remat2", "checkpoint", "remat") for e in eqns)


def test_remat_inside_the_closure_gives_the_same_update():
  params, data = sm.init_params(), with_key(sm.batch(), jax.random.key(6))
  assert remats(remat_block_loss, params, data)
  assert remats(remat_whole_loss, params, data)
  assert not remats(dropout_loss, params, data)
  want, _ = sam_update(dropout_loss, params, data)
  for loss in (remat_block_loss, remat_whole_loss):
    got, _ = sam_update(loss, params, data)
    assert_close(got, want, tol=1e-6)
  u, _, _ = two_pass_reference(dropout_loss, params, data)
  assert_close(want, u)


# ------------------------------------ 6. sequence-level m-sharpness


@functools.partial(JIT, static_argnums=0)
def grouped_update(groups: int, params, data):
  """m-sharpness over groups of whole sequences: ``sam`` with an ``axis_name``
  under ``jax.vmap``, one member per group (the distributed guide's one-device recipe)."""
  tx = sam_optax.sam(RHO, axis_name="sequences")
  grouped = jax.tree.map(lambda a: a.reshape(groups, -1, *a.shape[1:]), data)

  def member(group):
    loss_fn = lambda p: padded_loss(p, group)  # noqa: E731
    return tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)

  return jax.vmap(member, axis_name="sequences", out_axes=None)(grouped)


@pytest.mark.parametrize("per_group", [1, 2])
def test_m_sharpness_over_groups_of_whole_sequences(per_group):
  """Each group of ``per_group`` sequences gets its own ε; the groups' SAM
  gradients are averaged with equal weight (not by their token counts)."""
  params, data = sm.init_params(), sm.batch()
  groups = len(sm.LENGTHS) // per_group
  updates, _ = grouped_update(groups, params, data)
  per = [
      two_pass_reference(
          padded_loss, params,
          jax.tree.map(lambda a, i=i: a[i * per_group:(i + 1) * per_group], data))[0]
      for i in range(groups)
  ]
  assert_close(updates, jax.tree.map(lambda *u: sum(u) / groups, *per))
  whole, _, _ = two_pass_reference(padded_loss, params, data)
  assert rel_dist(updates, whole) > 100 * TOL  # not the full-batch SAM step


def test_msam_is_momentum_sam_and_m_sharpness_is_an_option_of_sam():
  """``sam_optax.msam(optimizer, rho)`` is Momentum-SAM (it wraps the base
  optimizer and takes no groups); m-sharpness is ``sam(axis_name=...)``."""
  msam = inspect.signature(sam_optax.msam).parameters
  assert list(msam)[:2] == ["optimizer", "rho"]
  assert not {"axis_name", "group_size"} & set(msam)
  assert {"axis_name", "group_size"} <= set(inspect.signature(sam_optax.sam).parameters)


# ------------------------------------------------------ 7. cheap ascent


def test_cheap_ascent_perturbation_from_a_quarter_of_the_batch():
  params, data = sm.init_params(), sm.batch()
  quarter = jax.tree.map(lambda a: a[: a.shape[0] // 4], data)
  _, g_sub = value_and_grad(padded_loss)(params, quarter)
  updates, state = sam_update(padded_loss, params, data, g_sub)
  u, g_ref, _ = two_pass_reference(padded_loss, params, data, ascent_data=quarter)
  assert_close(updates, u)
  np.testing.assert_allclose(
      float(state.stats.grad_norm), np.linalg.norm(flat64(g_ref)), rtol=1e-5)
  full, _, _ = two_pass_reference(padded_loss, params, data)
  assert rel_dist(updates, full) > 100 * TOL  # not the full-batch ε


# --------------------------------- 8. keyword arguments through Flax steps


@needs_flax
def test_linen_train_step_passes_the_padding_mask_to_both_passes():
  state, data, key = linen_state(), sm.batch(), jax.random.key(8)
  k = step_dropout_key(key)
  new, _ = linen_step()(state, data["tokens"], data["targets"], key=key, mask=data["mask"])
  u = implied_u(state.params, new.params)
  assert_close(u, linen_hand_step(state.params, data, data["mask"], k, k), tol=FLAX_TOL)
  # Had either pass dropped the mask (all tokens valid without it), the
  # padded contents would move the step: they do not, and they would.
  other = sm.repad(data, 3)
  again, _ = linen_step()(state, other["tokens"], other["targets"], key=key, mask=other["mask"])
  assert_close(implied_u(state.params, again.params), u, tol=FLAX_TOL)
  unmasked = linen_hand_step(state.params, data, jnp.ones_like(data["mask"]), k, k)
  assert rel_dist(u, unmasked) > 100 * FLAX_TOL


@needs_flax
def test_nnx_train_step_passes_the_padding_mask_to_both_passes():
  data = sm.batch()
  model, optimizer = nnx_model_and_optimizer()
  before = nnx.clone(model)
  nnx_step(model, optimizer, data["tokens"], data["targets"], mask=data["mask"])
  u = implied_u(nnx_params(before), nnx_params(model))
  assert_close(u, nnx_hand_step(before, data, data["mask"]), tol=FLAX_TOL)
  # The same step on other padded contents.
  other = sm.repad(data, 4)
  model, optimizer = nnx_model_and_optimizer()
  nnx_step(model, optimizer, other["tokens"], other["targets"], mask=other["mask"])
  assert_close(implied_u(nnx_params(before), nnx_params(model)), u, tol=FLAX_TOL)
  unmasked = nnx_hand_step(before, data, jnp.ones_like(data["mask"]))
  assert rel_dist(u, unmasked) > 100 * FLAX_TOL
