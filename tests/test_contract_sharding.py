"""Contract checks with optax's tree utilities and with sharded parameters.

Every transform of ``tests/contract.py`` (and the ones that need their own
construction: MSAM, SAM-ON's default mask, tree masks) must

* work with ``optax.tree.map_params``, which optax documents for deriving
  the shardings of an optimizer state from those of the parameters; it
  calls ``init`` with a placeholder instead of the parameters;
* run jitted steps on parameters sharded over a mesh axis, with JAX's
  explicit sharding mode as well as the automatic one, giving the result of
  the unsharded run, updates laid out like the parameters and a state whose
  shardings do not change from step to step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import sam_optax
from tests.contract import CASES

NUM_DEVICES = 4  # of the 8 fake CPU devices of conftest.py
WIDTH = 8  # every sharded dimension; divisible by NUM_DEVICES


class Named(NamedTuple):
  """A transform to check: ``make()`` builds the whole optimizer."""

  name: str
  make: Callable[[], optax.GradientTransformationExtraArgs]
  closure: Callable[[Callable[..., Any]], dict[str, Any]] = lambda f: {"loss_fn": f}


def _base() -> optax.GradientTransformation:
  return optax.sgd(0.1, momentum=0.9)


def _tree_mask(params: Any) -> Any:
  """Element-wise on the kernels, off on the rest (a pytree, not a callable)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (
          jnp.arange(x.size).reshape(x.shape) % 2 == 0
          if jax.tree_util.keystr(path).endswith("['kernel']")
          else False
      ),
      params,
  )


def _leaf_mask(params: Any) -> Any:
  """Whole leaves: the kernels only."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path).endswith("['kernel']"), params
  )


def _transforms() -> list[Named]:
  out = [
      Named(c.name, lambda c=c: optax.chain(c.make(), _base()), c.closure)
      for c in CASES
  ]
  out += [
      Named(  # the default mask: normalization_mask finds LayerNorm_0
          "sam_on_default_mask", lambda: optax.chain(sam_optax.sam_on(0.5), _base())
      ),
      Named(
          "masked_sam_tree_mask",
          lambda: optax.chain(sam_optax.masked_sam(0.05, _tree_mask(mlp_params())), _base()),
      ),
      Named(
          "asam_tree_mask",
          lambda: optax.chain(sam_optax.asam(0.5, mask=_leaf_mask(mlp_params())), _base()),
      ),
      Named(
          "composed_tree_mask",
          lambda: optax.chain(
              sam_optax.sharpness_aware(0.05, mask=_leaf_mask(mlp_params())), _base()
          ),
      ),
      Named("msam", lambda: sam_optax.msam(_base(), rho=0.5)),
      Named(
          "msam_momentum",
          lambda: sam_optax.msam(optax.adam(1e-2), rho=0.5, direction="momentum"),
      ),
  ]
  return out


# --------------------------------------------------------------------------
# The problem: an MLP whose widths (8) divide the number of devices, with a
# LayerNorm so that SAM-ON's default mask finds something.


def mlp_params(seed: int = 0) -> dict[str, Any]:
  rng = np.random.RandomState(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return {
      "Dense_0": {
          "kernel": f32(rng.randn(4, WIDTH) / 2),
          "bias": f32(0.1 * rng.randn(WIDTH)),
      },
      "LayerNorm_0": {
          "scale": f32(1 + 0.1 * rng.randn(WIDTH)),
          "bias": f32(0.1 * rng.randn(WIDTH)),
      },
      "Dense_1": {
          "kernel": f32(rng.randn(WIDTH, WIDTH) / np.sqrt(WIDTH)),
          "bias": f32(0.1 * rng.randn(WIDTH)),
      },
  }


# The feature dimension (the last of every leaf) is sharded over "x".
SPECS = {
    "Dense_0": {"kernel": P(None, "x"), "bias": P("x")},
    "LayerNorm_0": {"scale": P("x"), "bias": P("x")},
    "Dense_1": {"kernel": P(None, "x"), "bias": P("x")},
}


def _gathered(x: jax.Array) -> jax.Array:
  """``x`` replicated where explicit sharding splits it (before a contraction)."""
  spec = getattr(jax.typeof(x).sharding, "spec", None)
  if spec is not None and any(axis is not None for axis in spec):
    return jax.sharding.reshard(x, P())
  return x


def mlp_loss(params: dict[str, Any]) -> jax.Array:
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(16, 4), jnp.float32)
  y = jnp.asarray(rng.randint(0, WIDTH, size=16))
  h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  h = h - jnp.mean(h, axis=-1, keepdims=True)
  h = h / jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-5)
  h = h * params["LayerNorm_0"]["scale"] + params["LayerNorm_0"]["bias"]
  logits = _gathered(h) @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
  logp = jax.nn.log_softmax(_gathered(logits))
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def _step(named: Named):
  tx = named.make()

  def step(params, state):
    grads = jax.grad(mlp_loss)(params)
    updates, state = tx.update(grads, state, params, **named.closure(mlp_loss))
    return optax.apply_updates(params, updates), state, updates

  return jax.jit(step)


TRANSFORMS = _transforms()
transforms = pytest.mark.parametrize("named", TRANSFORMS, ids=lambda n: n.name)


def test_every_case_is_checked():
  names = {n.name for n in TRANSFORMS}
  assert {c.name for c in CASES} <= names
  assert {"msam", "esam", "sam_on_default_mask", "asam_tree_mask"} <= names


# --------------------------------------------------------------------------
# optax.tree.map_params


@transforms
def test_map_params_finds_the_parameter_trees(named):
  tx = named.make()
  params = mlp_params()
  state = tx.init(params)
  # f sees each parameter-shaped leaf of the state with the parameter it
  # stands for; every other leaf goes to transform_non_params.
  same_shape = optax.tree.map_params(
      tx,
      lambda leaf, param: jnp.shape(leaf) == jnp.shape(param),
      state,
      params,
      transform_non_params=lambda _: None,
  )
  found = jax.tree.leaves(same_shape)
  assert found and all(found)
  n = len(jax.tree.leaves(params))
  assert len(found) % n == 0 and len(found) >= n  # at least the momentum


@transforms
def test_map_params_builds_state_shardings(named):
  """The documented use: shardings of the state from those of the params."""
  tx = named.make()
  mesh = _mesh(AxisType.Explicit)
  params = mlp_params()
  state = tx.init(params)
  shardings = optax.tree.map_params(
      tx,
      lambda _, spec: NamedSharding(mesh, spec),
      state,
      SPECS,
      transform_non_params=lambda _: NamedSharding(mesh, P()),
  )
  placed = jax.device_put(state, shardings)
  assert jax.tree.structure(placed) == jax.tree.structure(state)
  chex.assert_trees_all_equal(placed, state)


# --------------------------------------------------------------------------
# Sharded steps


def _mesh(axis_type: AxisType) -> jax.sharding.Mesh:
  return jax.make_mesh(
      (NUM_DEVICES,), ("x",), axis_types=(axis_type,),
      devices=jax.devices()[:NUM_DEVICES],
  )


@functools.lru_cache(maxsize=None)
def _unsharded(name: str):
  named = {n.name: n for n in TRANSFORMS}[name]
  tx = named.make()
  step = _step(named)
  params = mlp_params()
  p, s, _ = step(params, tx.init(params))
  p, s, u = step(p, s)
  return p, u


def _same_sharding(a: jax.Array, b: jax.Array) -> bool:
  return a.sharding.is_equivalent_to(b.sharding, jnp.ndim(a))


@transforms
@pytest.mark.parametrize(
    "axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"]
)
def test_sharded_steps_match_and_keep_their_shardings(named, axis_type):
  tx = named.make()
  mesh = _mesh(axis_type)
  with jax.set_mesh(mesh):
    params = jax.device_put(
        mlp_params(), jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS)
    )
    state = tx.init(params)
    state = jax.device_put(
        state,
        optax.tree.map_params(
            tx,
            lambda _, spec: NamedSharding(mesh, spec),
            state,
            SPECS,
            transform_non_params=lambda _: NamedSharding(mesh, P()),
        ),
    )
    step = _step(named)
    p1, s1, u1 = step(params, state)
    p2, s2, u2 = step(p1, s1)

  for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(s2), strict=True):
    assert _same_sharding(before, after), (before.sharding, after.sharding)
  for before, after in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
    assert _same_sharding(before, after), (before.sharding, after.sharding)
  for updates in (u1, u2):
    for param, u in zip(jax.tree.leaves(params), jax.tree.leaves(updates), strict=True):
      assert _same_sharding(param, u), (param.sharding, u.sharding)
  for param, p in zip(jax.tree.leaves(params), jax.tree.leaves(p2), strict=True):
    assert _same_sharding(param, p), (param.sharding, p.sharding)

  want_p, want_u = _unsharded(named.name)
  chex.assert_trees_all_close(
      jax.device_get(p2), jax.device_get(want_p), rtol=1e-5, atol=1e-6
  )
  chex.assert_trees_all_close(
      jax.device_get(u2), jax.device_get(want_u), rtol=1e-5, atol=1e-6
  )
  stats = sam_optax.sam_stats(s2)
  assert all(bool(jnp.isfinite(x)) for x in stats)


def test_top_fraction_of_explicitly_sharded_scores_is_the_unsharded_one():
  from sam_optax._core import masking

  # Ties across leaves and shards: the earlier entry in leaf order wins.
  scores = {
      "a": jnp.asarray(np.tile([3.0, 1.0, 2.0, 2.0], (2, 2))),
      "b": jnp.asarray([2.0, 0.0, 3.0, 2.0, 1.0, 2.0, 0.0, 5.0]),
  }
  specs = {"a": P(None, "x"), "b": P("x")}
  want = masking.top_fraction(scores, 0.4)
  mesh = _mesh(AxisType.Explicit)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(
        scores, jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    )
    got = jax.jit(masking.top_fraction)(sharded, 0.4)
  chex.assert_trees_all_equal(jax.device_get(got), jax.device_get(want))
  for x, m in zip(jax.tree.leaves(sharded), jax.tree.leaves(got)):
    assert _same_sharding(x, m)
  assert int(sum(jnp.sum(m) for m in jax.tree.leaves(want))) == 10
