"""weight_noise_robustness: the metric under weight noise, against closed forms.

For a metric quadratic in the weights, ``m(w) = (a·w − b)²``, every noise
model has a closed-form mean: ``m(w) + σ² Σ_i (a_i s_i)²`` with ``s_i`` the
noise's per-weight scale (the leaf's max |w|, |w_i|, or 1). The Monte-Carlo
means must agree within four standard errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import sharpness

PARAMS = {"u": jnp.asarray([0.5, -2.0, 0.25]), "v": jnp.asarray([[1.0, 0.1], [-0.3, 0.0]])}
A = {"u": np.asarray([1.0, 0.5, -2.0]), "v": np.asarray([[0.3, -1.0], [2.0, 1.5]])}


def _metric(p):
  dot = jnp.sum(p["u"] * A["u"]) + jnp.sum(p["v"] * A["v"])
  return (dot - 0.7) ** 2


def _closed_form_mean(sigma, noise):
  clean = float(_metric(PARAMS))
  var = 0.0
  for k in PARAMS:
    w = np.asarray(PARAMS[k], np.float64)
    scale = {"layer_max": np.full_like(w, np.max(np.abs(w))),
             "multiplicative": w, "absolute": np.ones_like(w)}[noise]
    var += np.sum((A[k] * scale) ** 2)
  return clean + sigma**2 * var


@pytest.mark.parametrize("noise", ["layer_max", "multiplicative", "absolute"])
def test_means_match_the_closed_form(noise):
  levels = [0.0, 0.05, 0.2]
  res = sharpness.weight_noise_robustness(
      _metric, PARAMS, levels, key=jax.random.key(1), noise=noise, num_draws=3000
  )
  assert res.values.shape == (3, 3000) and res.noise == noise
  np.testing.assert_allclose(float(res.clean), _closed_form_mean(0.0, noise), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(res.values[0]), float(res.clean), rtol=1e-6)
  for i, s in enumerate(levels[1:], start=1):
    want = _closed_form_mean(s, noise)
    assert abs(float(res.mean[i]) - want) < 4 * float(res.std_error[i]), (s, want)
  np.testing.assert_allclose(
      np.asarray(res.std), np.std(np.asarray(res.values, np.float64), axis=1, ddof=1),
      rtol=1e-4, atol=1e-5
  )


def test_each_draw_uses_the_same_sample_at_every_level():
  # A linear metric: a draw's change is proportional to the level.
  linear = lambda p: jnp.sum(p["u"] * A["u"]) + jnp.sum(p["v"] * A["v"])
  levels = np.asarray([0.0, 0.1, 0.3])
  res = sharpness.weight_noise_robustness(
      linear, PARAMS, levels, key=jax.random.key(2), num_draws=16, batch_size=5
  )
  change = np.asarray(res.values) - float(res.clean)
  np.testing.assert_allclose(change[2], 3.0 * change[1], rtol=1e-4, atol=1e-6)
  assert np.std(change[1]) > 0
  # The same key gives the same draws, whatever the batching.
  again = sharpness.weight_noise_robustness(
      linear, PARAMS, levels, key=jax.random.key(2), num_draws=16, batch_size=None
  )
  np.testing.assert_allclose(np.asarray(again.values), np.asarray(res.values), rtol=1e-6)


def test_masked_leaves_stay_clean():
  only_v = lambda p: jnp.sum(p["v"] ** 2)
  res = sharpness.weight_noise_robustness(
      only_v, PARAMS, [0.5], key=jax.random.key(3), num_draws=8,
      mask={"u": True, "v": False},
  )
  np.testing.assert_allclose(np.asarray(res.values), float(res.clean), rtol=1e-6)


def test_bad_arguments_name_the_fix():
  call = lambda **kw: sharpness.weight_noise_robustness(
      _metric, PARAMS, kw.pop("levels", [0.1]), key=jax.random.key(0), **kw
  )
  with pytest.raises(ValueError, match=r"`noise` must be one of 'layer_max'"):
    call(noise="gaussian")
  with pytest.raises(ValueError, match="finite and >= 0"):
    call(levels=[0.1, -0.1])
  with pytest.raises(ValueError, match="non-empty 1-D"):
    call(levels=[])
  with pytest.raises(ValueError, match="`num_draws` must lie in"):
    call(num_draws=0)


def test_result_prints_short_and_plots_with_a_band():
  import matplotlib

  matplotlib.use("Agg")
  res = sharpness.weight_noise_robustness(
      _metric, PARAMS, [0.0, 0.1, 0.2], key=jax.random.key(0), num_draws=64
  )
  text = repr(res)
  assert len(text) < 400 and "Array(" not in text and "layer_max" in text
  ax = sharpness.plot_noise_robustness(res, label="m", ylabel="loss")
  ax.figure.canvas.draw()
  assert len(ax.lines) == 1 and len(ax.collections) == 1  # the line and its band
  fig_box = ax.figure.bbox
  for text_artist in (ax.xaxis.label, ax.yaxis.label):
    box = text_artist.get_window_extent()
    assert box.x0 >= fig_box.x0 and box.y0 >= fig_box.y0
  with pytest.raises(TypeError, match="NoiseRobustnessResult"):
    sharpness.plot_noise_robustness(np.zeros(3))
