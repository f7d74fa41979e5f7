"""Sharpness results print as short summaries, not as parameter trees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import sharpness

KEY = jax.random.key(0)
RNG = np.random.RandomState(0)
# A two-layer MLP with 10,150 parameters.
PARAMS = {
    "w1": jnp.asarray(0.1 * RNG.randn(50, 100), jnp.float32),
    "b1": jnp.zeros(100, jnp.float32),
    "w2": jnp.asarray(0.1 * RNG.randn(100, 50), jnp.float32),
    "b2": jnp.zeros(50, jnp.float32),
}
X = jnp.asarray(RNG.randn(16, 50), jnp.float32)
Y = jnp.asarray(RNG.randn(16, 50), jnp.float32)
TREE = "<4 leaves, 10,150 floats>"


def _per_example(p, x, y):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2, axis=-1)


def LOSS(p):  # pylint: disable=invalid-name
  return jnp.mean(_per_example(p, X, Y))


def _fmt(x) -> str:
  return f"{float(x):.4g}"


def _check(result, values, max_len=400):
  text = repr(result)
  assert str(result) == text
  assert len(text) < max_len, text
  assert "Array(" not in text and "[[" not in text and "dtype=" not in text, text
  assert text.startswith(type(result).__name__ + "("), text
  for v in values:
    assert v in text, (v, text)
  return text


def test_worst_case_sharpness_repr():
  res = sharpness.worst_case_sharpness(LOSS, PARAMS, rho=0.05, num_steps=2)
  text = _check(
      res, [_fmt(res.sharpness), _fmt(res.loss), _fmt(res.perturbed_loss), TREE]
  )
  assert f"sharpness={_fmt(res.sharpness)}," in text


def test_average_case_sharpness_repr():
  res = sharpness.average_case_sharpness(
      LOSS, PARAMS, 0.01, key=KEY, num_samples=3
  )
  text = _check(res, [_fmt(res.sharpness), _fmt(res.std_error), _fmt(res.loss)])
  assert "\n" not in text  # three numbers fit on one line


def test_m_sharpness_repr_lists_few_groups_and_summarizes_many():
  loss = lambda p, b: jnp.mean(_per_example(p, *b))
  few = sharpness.m_sharpness(loss, PARAMS, (X, Y), 0.05, group_size=8, num_steps=1)
  _check(few, [_fmt(few.sharpness)] + [_fmt(s) for s in few.group_sharpness])
  many = sharpness.m_sharpness(loss, PARAMS, (X, Y), 0.05, group_size=1, num_steps=1)
  text = _check(many, [_fmt(many.sharpness), "<16 float32: min "])
  assert _fmt(jnp.max(many.group_sharpness)) in text


def test_hessian_results_repr():
  eig = sharpness.hessian_top_eigenvalue(LOSS, PARAMS, key=KEY, num_iters=6, k=2)
  _check(eig, [
      _fmt(eig.eigenvalues[0]), _fmt(eig.eigenvalues[1]),
      f"num_iters={int(eig.num_iters)}", f"converged={bool(eig.converged)}",
      "<2 x (4 leaves, 10,150 floats each)>",
  ])
  tr = sharpness.hessian_trace(LOSS, PARAMS, key=KEY, num_samples=3)
  _check(tr, [_fmt(tr.trace), _fmt(tr.std_error), "samples=<3 float32: min "])


def test_landscape_repr():
  curve = sharpness.loss_slice_1d(
      lambda p: (LOSS(p), {"mse": LOSS(p)}), PARAMS, key=KEY, num_points=7
  )
  _check(curve, [
      "alphas=<7 points in [-1, 1]>", _fmt(jnp.min(curve.losses)),
      _fmt(jnp.max(curve.losses)), "aux=<1 leaf, 7 floats>",
  ])
  surface = sharpness.loss_slice_2d(LOSS, PARAMS, key=KEY, num_points=5)
  _check(surface, [
      "xs=<5 points in [-1, 1]>", "<5x5 float32: min ",
      _fmt(jnp.min(surface.losses)), _fmt(jnp.max(surface.losses)), "aux=None",
  ])


def test_repr_of_traced_and_batched_results():
  # Inside `jit` the fields are tracers: the repr gives shapes, never fails.
  texts = []

  def f(p):
    res = sharpness.SharpnessResult(LOSS(p), LOSS(p), LOSS(p), p)
    texts.append(repr(res))
    return res.sharpness

  jax.jit(f)(PARAMS)
  assert "sharpness=<traced scalar float32>" in texts[0] and TREE in texts[0]
  # A stacked (vmapped) result summarizes its arrays.
  batched = sharpness.AverageSharpnessResult(
      jnp.linspace(0.0, 1.0, 10), jnp.zeros(10), jnp.full(10, jnp.nan)
  )
  text = _check(batched, ["<10 float32: min 0, max 1>", "10 non-finite"])
  assert "nan" not in text.split("loss=")[0]


@pytest.mark.parametrize("value, want", [
    (jnp.float32(0.012345678), "0.01235"), (jnp.int32(12), "12"),
    (jnp.bool_(True), "True"), (jnp.float32(1e-7), "1e-07"),
    (jnp.float32(123456.0), "1.235e+05"),
])
def test_scalars_have_four_significant_digits(value, want):
  res = sharpness.HessianTraceResult(value, value, jnp.zeros(2))
  assert repr(res).startswith(f"HessianTraceResult(trace={want}, std_error={want},")
