"""The plotting helpers render to PNG under the Agg backend."""

from __future__ import annotations

import io
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import sharpness

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
plt = pytest.importorskip("matplotlib.pyplot")



def LOSS(w):  # pylint: disable=invalid-name
  return w[0] ** 2 + 3.0 * w[1] ** 2 + 0.1 * w[0] ** 4

W0 = jnp.zeros(2)
DIRS = (jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=40)
  plt.close(fig)
  data = buf.getvalue()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
  return data


@pytest.fixture(scope="module")
def surface():
  return sharpness.loss_slice_2d(LOSS, W0, DIRS, num_points=9)


def test_curves_render_on_shared_axes():
  fig, ax = plt.subplots()
  a = sharpness.loss_slice_1d(LOSS, W0, DIRS[0], num_points=9)
  b = sharpness.linear_interpolation(LOSS, W0, jnp.ones(2), num_points=9)
  assert sharpness.plot_loss_curve(a, ax=ax, label="slice") is ax
  sharpness.plot_loss_curve(b, ax=ax, label="interpolation", log=True)
  assert len(ax.get_lines()) == 2 and ax.get_yscale() == "log"
  _png(fig)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"log": True}, {"filled": False, "colorbar": False},
     {"levels": np.linspace(0.0, 5.0, 6)}],
)
def test_contour_maps_render(surface, kwargs):
  ax = sharpness.plot_loss_contour(surface, title="t", **kwargs)
  assert ax.get_title() == "t"
  _png(ax.figure)


def test_side_by_side_contours_and_surface(surface):
  fig = plt.figure(figsize=(8, 3))
  for i in (1, 2):
    sharpness.plot_loss_contour(
        surface, ax=fig.add_subplot(1, 3, i), levels=[0.5, 1, 2, 4]
    )
  ax3 = sharpness.plot_loss_surface(
      surface, ax=fig.add_subplot(1, 3, 3, projection="3d"), log=True
  )
  assert ax3.name == "3d"
  _png(fig)
  with pytest.raises(ValueError, match=r"`ax` must be a 3-D Axes"):
    sharpness.plot_loss_surface(surface, ax=plt.figure().add_subplot())
  plt.close("all")


def test_sharpness_vs_rho_renders_with_the_quadratic_prediction():
  rhos = np.array([0.0, 0.05, 0.1, 0.2])
  values = sharpness.sharpness_vs_rho(LOSS, W0, rhos)
  ax = sharpness.plot_sharpness_vs_rho(rhos, values, label="f", lambda_max=6.0)
  assert len(ax.get_lines()) == 2
  prediction = ax.get_lines()[1].get_ydata()[-1]
  np.testing.assert_allclose(prediction, 3.0 * 0.2 ** 2, rtol=1e-6)
  _png(ax.figure)
  match = r"`rhos` and `sharpness` must be 1-D of the same length"
  with pytest.raises(ValueError, match=match):
    sharpness.plot_sharpness_vs_rho(rhos, values[:2])


def test_wrong_inputs_and_missing_matplotlib_are_explained(surface, monkeypatch):
  with pytest.raises(TypeError, match=r"`surface` must be a LossSurface"):
    sharpness.plot_loss_contour(jnp.zeros((3, 3)))
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
  with pytest.raises(ImportError, match=r"sam_optax\[examples\]"):
    sharpness.plot_loss_contour(surface)
  assert jax.tree.leaves(surface)  # the data side needs no matplotlib


# ------------------------------------------------- readable contour defaults


def _wall_surface():
  """A quadratic bowl of radius 0.6 inside a steep wall: losses over 5 decades."""

  def loss(w):
    r2 = w[0] ** 2 + w[1] ** 2
    return r2 + 1e4 * jnp.maximum(r2 - 0.36, 0.0)

  return sharpness.loss_slice_2d(loss, W0, DIRS, num_points=41)


def _contour_sets(ax):
  from matplotlib.contour import ContourSet  # pylint: disable=import-outside-toplevel

  return [c for c in ax.collections if isinstance(c, ContourSet)]


def test_default_levels_resolve_a_basin_inside_a_steep_wall():
  surface = _wall_surface()
  z = np.asarray(surface.losses)
  low = np.quantile(z, 0.25)
  assert z.max() > 1e4 * low  # the wall dwarfs the basin
  ax = sharpness.plot_loss_contour(surface)
  filled, lines = _contour_sets(ax)
  for cs in (filled, lines):
    assert np.sum(cs.levels < low) >= 3, cs.levels
  # Each band has its own colour: the basin is not one colour band.
  below = filled.levels[filled.levels < low]
  colours = filled.cmap(filled.norm(0.5 * (below[:-1] + below[1:])))
  assert len({tuple(np.round(c, 6)) for c in colours}) == len(below) - 1
  plt.close(ax.figure)
  # Evenly spaced levels, the old default, leave the basin in one band.
  ax = sharpness.plot_loss_contour(surface, spacing="linear")
  assert np.sum(_contour_sets(ax)[0].levels < low) <= 1
  plt.close(ax.figure)


def test_a_plain_bowl_keeps_evenly_spaced_levels(surface):
  ax = sharpness.plot_loss_contour(surface, levels=12)
  levels = _contour_sets(ax)[0].levels
  assert len(levels) == 12
  np.testing.assert_allclose(np.diff(levels), np.diff(levels)[0], rtol=1e-6)
  plt.close(ax.figure)
  ax = sharpness.plot_loss_contour(surface, levels=12, spacing="quantile")
  z = np.asarray(surface.losses)
  np.testing.assert_allclose(
      _contour_sets(ax)[0].levels, np.unique(np.quantile(z, np.linspace(0, 1, 12)))
  )
  plt.close(ax.figure)


@pytest.mark.parametrize("kwargs", [{}, {"title": "a loss surface"}, {"log": True}])
def test_default_figure_keeps_labels_and_colorbar_inside(kwargs):
  ax = sharpness.plot_loss_contour(_wall_surface(), **kwargs)
  fig = ax.figure
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  cbar_ax = [a for a in fig.axes if a is not ax]
  assert len(cbar_ax) == 1
  box = fig.bbox

  def inside(artist):
    ext = artist.get_window_extent(renderer)
    return (
        ext.x0 >= box.x0 - 0.5 and ext.y0 >= box.y0 - 0.5
        and ext.x1 <= box.x1 + 0.5 and ext.y1 <= box.y1 + 0.5
    )

  labels = [ax.xaxis.label, ax.yaxis.label, cbar_ax[0].yaxis.label]
  assert cbar_ax[0].yaxis.label.get_text() == "loss"
  if "title" in kwargs:
    labels.append(ax.title)
  for label in labels:
    assert label.get_text() and inside(label), label
  for a in fig.axes:  # tick labels included
    ext = a.get_tightbbox(renderer)
    assert ext.x0 >= -0.5 and ext.y0 >= -0.5, (a, ext)
    assert ext.x1 <= box.x1 + 0.5 and ext.y1 <= box.y1 + 0.5, (a, ext)
  plt.close(fig)


def test_log_levels_start_at_the_smallest_positive_loss(surface):
  z = np.asarray(surface.losses)
  assert z.min() == 0.0  # the centre
  ax = sharpness.plot_loss_contour(surface, log=True, levels=8)
  levels = _contour_sets(ax)[0].levels
  np.testing.assert_allclose(levels[0], z[z > 0].min(), rtol=1e-6)
  plt.close(ax.figure)


def test_bad_contour_options_are_explained(surface):
  with pytest.raises(ValueError, match=r"`spacing` must be one of 'auto'"):
    sharpness.plot_loss_contour(surface, spacing="log")
  with pytest.raises(ValueError, match=r"`levels` must be at least 2"):
    sharpness.plot_loss_contour(surface, levels=1)
  plt.close("all")
