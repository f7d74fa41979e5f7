"""Property-based tests of `sam` over random pytrees, shapes, dtypes and values.

The loss is separable, ``L(w) = Σ a·w² + b·w³`` with random coefficients per
entry, so the float64 reference is written out by hand:
``g = 2a·w + 3b·w²``, ``ε = ρ g/(‖g‖ + eps)`` (``eps = 1e-12``, the
default of `sam`; it shows in float64) and
``u = 2a·(w+ε) + 3b·(w+ε)²``. The transform runs eagerly (no compilation
per example). Tolerances are bounds on the rounding the transform must do:
the point ``w + ε`` and the returned gradient are rounded to the params'
dtype, ``|Δu| ≲ ulp·(|∂u/∂w|·|w+ε| + |u|)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sam_optax

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Unit round-off of each dtype; float32 is the width the transform computes in.
ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float64": 2.0**-53}
EPS = 1e-12


class _Leaf:
  """A placeholder leaf of a generated tree structure (a shape)."""

  def __init__(self, shape):
    self.shape = shape

  def __repr__(self):
    return f"Leaf{self.shape}"


SHAPES = [(), (1,), (3,), (2, 3), (0,), (0, 2), (2, 1, 2)]
leaf_shapes = st.sampled_from(SHAPES).map(_Leaf)
structures = st.recursive(
    leaf_shapes,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from("abcde"), children, max_size=3),
    ),
    max_leaves=6,
)


class Problem:
  """Params of ``dtype`` on ``structure``, and the separable loss's parts."""

  def __init__(self, structure, dtype, seed, zero_fraction=0.0):
    rng = np.random.RandomState(seed)
    self.dtype = dtype

    def leaf(shape):
      w = rng.uniform(-2.0, 2.0, shape.shape)
      w[rng.uniform(size=shape.shape) < zero_fraction] = 0.0
      return jnp.asarray(w, dtype)

    is_leaf = lambda x: isinstance(x, _Leaf)
    self.params = jax.tree.map(leaf, structure, is_leaf=is_leaf)
    # float32-exact coefficients: the JAX loss and the reference agree on them
    def coef(x):
      return np.float32(rng.uniform(-1.0, 1.0, x.shape)).astype(np.float64)

    self.a = jax.tree.map(coef, self.params)
    self.b = jax.tree.map(coef, self.params)

  def grad_fn(self, params):
    """``2a·w + 3b·w²`` computed in at least float32, in the params' dtype."""

    def leaf(w, a, b):
      wide = jnp.promote_types(w.dtype, jnp.float32)
      x = w.astype(wide)
      return (2 * a.astype(wide) * x + 3 * b.astype(wide) * x * x).astype(w.dtype)

    return jax.tree.map(leaf, params, self.a, self.b)

  def flat(self, tree):
    leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0)

  def reference(self, grads, rho):
    """SAM in float64 from the clean gradient ``grads`` the transform receives.

    Returns ``(u, eps, tol)``: the SAM gradient, the perturbation and the
    per-entry tolerance of the comparison.
    """
    w, a, b = self.flat(self.params), self.flat(self.a), self.flat(self.b)
    g = self.flat(grads)
    eps = rho * g / (np.sqrt(np.sum(g * g)) + EPS)  # 0 when g = 0
    x = w + eps
    u = 2 * a * x + 3 * b * x * x
    hess = np.abs(2 * a + 6 * b * x)
    unit = ROUNDOFF[jnp.dtype(self.dtype).name]
    tol = 16 * unit * (hess * (np.abs(x) + np.abs(eps)) + np.abs(u)) + 1e-6 * unit
    return u, eps, tol


dtypes = st.sampled_from(["float32", "bfloat16", "float64"])
rhos = st.floats(0.05, 1.0)
seeds = st.integers(0, 2**31 - 1)


def _with_dtype(dtype, fn):
  """Runs ``fn()``, with 64-bit types enabled for float64."""
  if dtype == "float64":
    with jax.enable_x64(True):
      return fn()
  return fn()


def _recording(grad_fn, calls):
  def recorded(point):
    jax.debug.callback(
        lambda *xs: calls.append([np.asarray(x, np.float64) for x in xs]),
        *jax.tree.leaves(point),
    )
    return grad_fn(point)

  return recorded


@SETTINGS
@given(structure=structures, dtype=dtypes, rho=rhos, seed=seeds)
def test_sam_gradient_matches_float64_reference(structure, dtype, rho, seed):
  def run():
    problem = Problem(structure, getattr(jnp, dtype), seed)
    grads = problem.grad_fn(problem.params)
    tx = sam_optax.sam(rho)
    out, state = tx.update(grads, tx.init(problem.params), problem.params,
                           grad_fn=problem.grad_fn)
    assert jax.tree.structure(out) == jax.tree.structure(problem.params)
    for o, p in zip(jax.tree.leaves(out), jax.tree.leaves(problem.params)):
      assert o.shape == p.shape and o.dtype == p.dtype
    want, _, tol = problem.reference(grads, rho)
    got = problem.flat(out)
    assert np.all(np.abs(got - want) <= tol), np.max(np.abs(got - want) - tol)
    assert bool(jnp.isfinite(state.stats.grad_norm))

  _with_dtype(dtype, run)


@SETTINGS
@given(structure=structures, dtype=dtypes, rho=rhos, seed=seeds,
       zero_fraction=st.sampled_from([0.0, 0.5, 1.0]))
def test_perturbation_has_norm_rho(structure, dtype, rho, seed, zero_fraction):
  def run():
    problem = Problem(structure, getattr(jnp, dtype), seed, zero_fraction)
    grads = problem.grad_fn(problem.params)
    calls = []
    tx = sam_optax.sam(rho)
    out, _ = tx.update(grads, tx.init(problem.params), problem.params,
                       grad_fn=_recording(problem.grad_fn, calls))
    jax.effects_barrier()
    assert len(calls) == 1
    w = problem.flat(problem.params)
    point = problem.flat(calls[0])
    eps = point - w
    g = problem.flat(grads)
    if not np.any(g):  # zero gradient: no perturbation, no NaN
      assert np.all(eps == 0)
      assert np.all(np.isfinite(problem.flat(out)))
      return
    unit = ROUNDOFF[dtype]
    # each entry of w + ε is rounded to the dtype: at most unit·|w + ε| off
    bound = unit * np.sqrt(np.sum((np.abs(w) + rho) ** 2)) + 64 * 2.0**-24 * rho
    assert abs(np.sqrt(np.sum(eps * eps)) - rho) <= bound

  _with_dtype(dtype, run)


@SETTINGS
@given(structure=structures, dtype=dtypes, seed=seeds,
       form=st.sampled_from(["number", "schedule"]))
def test_rho_zero_is_the_base_optimizer_exactly(structure, dtype, seed, form):
  def run():
    problem = Problem(structure, getattr(jnp, dtype), seed)
    rho = 0.0 if form == "number" else (lambda count: 0.0 * count)
    calls = []
    tx = optax.chain(sam_optax.sam(rho), optax.sgd(0.1, momentum=0.9))
    base = optax.sgd(0.1, momentum=0.9)
    p, s = problem.params, tx.init(problem.params)
    q, t = problem.params, base.init(problem.params)
    befores = []
    for _ in range(2):
      befores.append(problem.flat(p))
      u, s = tx.update(problem.grad_fn(p), s, p,
                       grad_fn=_recording(problem.grad_fn, calls))
      p = optax.apply_updates(p, u)
      v, t = base.update(problem.grad_fn(q), t, q)
      q = optax.apply_updates(q, v)
    jax.effects_barrier()
    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
      assert x.dtype == y.dtype
      np.testing.assert_array_equal(
          np.asarray(x, np.float64), np.asarray(y, np.float64)
      )
    if form == "number":
      assert calls == []  # no perturbed pass is compiled
    else:  # the pass runs, at w itself
      assert len(calls) == 2
      for point, w in zip(calls, befores):
        np.testing.assert_array_equal(problem.flat(point), w)
    assert float(sam_optax.sam_stats(s).pass_taken) == 0.0

  _with_dtype(dtype, run)


@SETTINGS
@given(structure=structures, dtype=dtypes, rho=rhos, seed=seeds, data=st.data())
def test_permuting_leaves_permutes_the_result(structure, dtype, rho, seed, data):
  def run():
    problem = Problem(structure, getattr(jnp, dtype), seed)
    leaves = jax.tree.leaves(problem.params)
    a, b = jax.tree.leaves(problem.a), jax.tree.leaves(problem.b)
    order = data.draw(st.permutations(range(len(leaves))))
    tx = sam_optax.sam(rho)

    def sam_on_list(perm):
      sub = Problem.__new__(Problem)
      sub.dtype = problem.dtype
      sub.params = [leaves[i] for i in perm]
      sub.a, sub.b = [a[i] for i in perm], [b[i] for i in perm]
      grads = sub.grad_fn(sub.params)
      out, _ = tx.update(grads, tx.init(sub.params), sub.params, grad_fn=sub.grad_fn)
      return sub, grads, out

    base, base_grads, base_out = sam_on_list(list(range(len(leaves))))
    _, _, perm_out = sam_on_list(order)
    # Summation order inside the global norm may change: compare within the
    # rounding bound of the reference, entry by entry.
    _, _, tol = base.reference(base_grads, rho)
    got = problem.flat([perm_out[order.index(i)] for i in range(len(leaves))])
    want = problem.flat(base_out)
    assert np.all(np.abs(got - want) <= 2 * tol)

  _with_dtype(dtype, run)


def test_generated_structures_cover_the_edge_cases():
  # The strategy reaches empty trees, scalars and size-0 leaves.
  seen = {"empty": False, "scalar": False, "size0": False, "nested": False}

  @settings(max_examples=200, deadline=None, derandomize=True, database=None)
  @given(structure=structures)
  def collect(structure):
    params = Problem(structure, jnp.float32, 0).params
    leaves = jax.tree.leaves(params)
    seen["empty"] |= not leaves
    seen["scalar"] |= any(x.shape == () for x in leaves)
    seen["size0"] |= any(x.size == 0 for x in leaves)
    seen["nested"] |= jax.tree.structure(params).num_nodes > len(leaves) + 1

  collect()
  assert all(seen.values()), seen
