"""Matplotlib pictures of loss landscapes and sharpness (optional dependency).

matplotlib is imported only when a plotting function is called; it comes with
the ``examples`` extra: ``pip install "sam_optax[examples]"``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from sam_optax.sharpness import _common
from sam_optax.sharpness._landscape import LossCurve, LossSurface
from sam_optax.sharpness._noise import NoiseRobustnessResult


def _pyplot(caller: str):
  try:
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise ImportError(
        f"`sam_optax.sharpness.{caller}` draws with matplotlib, which is not"
        ' installed. Install it with `pip install "sam_optax[examples]"` (or'
        " `pip install matplotlib`)."
    ) from err
  return plt


def _axes(caller: str, ax: Any, projection: Optional[str] = None):
  """``ax``, or the axes of a new figure whose layout keeps labels inside it."""
  plt = _pyplot(caller)
  if ax is None:
    fig = plt.figure(
        figsize=(5, 4) if projection is None else (6, 5), layout="constrained"
    )
    ax = fig.add_subplot(projection=projection)
  return plt, ax


def _check_type(caller: str, name: str, value: Any, kind: type) -> None:
  if not isinstance(value, kind):
    raise TypeError(
        f"`{caller}`: `{name}` must be a {kind.__name__} (from"
        f" `sam_optax.sharpness`), got {type(value).__name__}."
    )


_SPACINGS = ("auto", "linear", "quantile")
# "auto" spaces the levels by quantiles when the loss range is more than this
# many times the range of the lowest quarter of the values (a basin inside a
# steep wall), where linear levels would paint the basin in one colour band.
_SKEW = 10.0


def _levels(
    caller: str,
    losses: np.ndarray,
    levels: Union[int, Sequence[float]],
    log: bool,
    spacing: str,
) -> tuple[np.ndarray, bool]:
  """The contour levels, and whether they are quantiles (unevenly spaced)."""
  if not isinstance(levels, (int, np.integer)):
    return np.asarray(levels, dtype=float), False
  n = int(levels)
  if n < 2:
    raise ValueError(
        f"`{caller}`: `levels` must be at least 2 (or a sequence of values);"
        f" got levels={levels!r}."
    )
  finite = losses[np.isfinite(losses)]
  if not finite.size:
    raise ValueError(
        f"`{caller}`: the surface has no finite loss value to draw; check"
        " the loss closure and the extent of the slice."
    )
  lo, hi = float(finite.min()), float(finite.max())
  if log:
    positive = finite[finite > 0]
    lo = float(positive.min()) if positive.size else 1e-12
    return np.geomspace(lo, max(hi, lo * 1.0001), n), False
  skewed = hi - lo > _SKEW * (float(np.quantile(finite, 0.25)) - lo)
  if spacing == "quantile" or (spacing == "auto" and skewed):
    quantiles = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, n)))
    if quantiles.size >= 2:
      return quantiles, True
  return np.linspace(lo, max(hi, lo + 1e-12), n), False


def _sparse_ticks(cbar: Any, levels: np.ndarray) -> None:
  """About six of ``levels`` as colour-bar ticks, labelled to 3 digits."""
  ticks = levels[:: max(1, len(levels) // 6)]
  cbar.set_ticks(ticks)
  cbar.set_ticklabels([f"{t:.3g}" for t in ticks])
  cbar.minorticks_off()


def plot_loss_curve(
    curve: LossCurve,
    *,
    ax: Any = None,
    label: Optional[str] = None,
    log: bool = False,
    xlabel: str = r"$\alpha$",
    ylabel: str = "loss",
    **plot_kwargs: Any,
):
  """Draws a :class:`LossCurve` (an interpolation or a 1-D slice).

  Call it once per curve on the same ``ax`` to compare solutions.

  Args:
    curve: from :func:`linear_interpolation` or :func:`loss_slice_1d`.
    ax: the matplotlib ``Axes`` to draw on; a new figure when ``None``.
    label: legend label; a legend is drawn when given.
    log: logarithmic loss axis.
    xlabel, ylabel: axis labels.
    **plot_kwargs: passed to ``ax.plot``.

  Returns:
    The ``Axes``.

  Examples:
    >>> import io, jax.numpy as jnp, matplotlib
    >>> matplotlib.use("Agg")
    >>> from sam_optax import sharpness
    >>> curve = sharpness.loss_slice_1d(
    ...     lambda w: jnp.sum(w ** 2), jnp.zeros(2), jnp.ones(2))
    >>> ax = sharpness.plot_loss_curve(curve, label="quadratic")
    >>> ax.figure.savefig(io.BytesIO(), format="png")
  """
  caller = "plot_loss_curve"
  _check_type(caller, "curve", curve, LossCurve)
  _, ax = _axes(caller, ax)
  xs, ys = np.asarray(curve.alphas), np.asarray(curve.losses)
  ax.plot(xs, ys, label=label, **plot_kwargs)
  if log:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if label is not None:
    ax.legend()
  return ax


def plot_loss_contour(
    surface: LossSurface,
    *,
    ax: Any = None,
    levels: Union[int, Sequence[float]] = 30,
    log: bool = False,
    spacing: str = "auto",
    filled: bool = True,
    colorbar: bool = True,
    title: Optional[str] = None,
    cmap: str = "viridis",
):
  """Draws a :class:`LossSurface` as a contour map, with the centre marked.

  By default the levels adapt to the surface so that the basin stays
  visible: evenly spaced over the finite loss range, unless the loss spans
  more than a decade of the range of its lowest quarter of values (as with
  a basin inside a steep wall), where evenly spaced levels would leave the
  whole basin in one colour band. Then the levels are quantiles of the loss
  values, so each band covers about the same area of the plane, and the
  colours step evenly from band to band (the colour bar is labelled with
  the level values). A new figure uses matplotlib's constrained layout, so
  the axis labels, the title and the colour bar fit inside it.

  To compare several surfaces side by side on one colour scale, pass the same
  explicit ``levels`` to each call.

  Args:
    surface: from :func:`loss_slice_2d`.
    ax: the matplotlib ``Axes``; a new figure when ``None``.
    levels: the number of contour levels (at least 2), spread over the
      surface's finite values as ``spacing`` says (geometrically when
      ``log``), or their values.
    log: logarithmic colour scale, from the smallest positive loss.
    spacing: how a number of ``levels`` is spread: ``"auto"`` (quantiles on
      a skewed surface, else linear), ``"linear"`` or ``"quantile"``.
      Ignored with ``log`` or explicit levels.
    filled: filled contours (``contourf``) with line contours on top, or
      lines only.
    colorbar: add a colour bar.
    title: the axes title.
    cmap: the colour map.

  Returns:
    The ``Axes``.

  Examples:
    >>> import io, jax.numpy as jnp, matplotlib
    >>> matplotlib.use("Agg")
    >>> from sam_optax import sharpness
    >>> surface = sharpness.loss_slice_2d(
    ...     lambda w: w[0] ** 2 + 3 * w[1] ** 2, jnp.zeros(2),
    ...     (jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])), num_points=11)
    >>> ax = sharpness.plot_loss_contour(surface, title="quadratic")
    >>> ax.figure.savefig(io.BytesIO(), format="png")
  """
  caller = "plot_loss_contour"
  _check_type(caller, "surface", surface, LossSurface)
  _common.check_choice(caller, "spacing", spacing, _SPACINGS)
  xs, ys = np.asarray(surface.xs), np.asarray(surface.ys)
  z = np.asarray(surface.losses, dtype=float)
  lv, uneven = _levels(caller, z, levels, log, spacing)
  plt, ax = _axes(caller, ax)
  from matplotlib import colors  # pylint: disable=import-outside-toplevel

  norm = None
  if log:
    norm = colors.LogNorm(vmin=lv[0], vmax=lv[-1])
    z = np.maximum(z, lv[0])
  elif uneven:  # one colour step per band, however unevenly spaced
    norm = colors.BoundaryNorm(
        lv, plt.get_cmap(cmap).N, extend="max" if filled else "neither"
    )
  if filled:
    mappable = ax.contourf(xs, ys, z, levels=lv, cmap=cmap, norm=norm, extend="max")
    ax.contour(xs, ys, z, levels=lv, colors="k", linewidths=0.3, alpha=0.5)
  else:
    mappable = ax.contour(xs, ys, z, levels=lv, cmap=cmap, norm=norm)
  ax.plot([0.0], [0.0], marker="*", color="w" if filled else "k", markersize=10,
          markeredgecolor="k")
  ax.set_xlabel(r"$x$ (direction 1)")
  ax.set_ylabel(r"$y$ (direction 2)")
  ax.set_aspect("equal", adjustable="box")
  if title is not None:
    ax.set_title(title)
  if colorbar:
    cbar = ax.figure.colorbar(mappable, ax=ax, label="loss", shrink=0.85)
    if log or uneven:
      _sparse_ticks(cbar, lv)
  return ax


def plot_loss_surface(
    surface: LossSurface,
    *,
    ax: Any = None,
    log: bool = False,
    title: Optional[str] = None,
    cmap: str = "viridis",
):
  """Draws a :class:`LossSurface` as a 3-D surface.

  Args:
    surface: from :func:`loss_slice_2d`.
    ax: a matplotlib 3-D ``Axes`` (``fig.add_subplot(projection="3d")``); a
      new figure when ``None``.
    log: plot :math:`\\log_{10}` of the loss.
    title: the axes title.
    cmap: the colour map.

  Returns:
    The 3-D ``Axes``.

  Raises:
    ValueError: if ``ax`` is not a 3-D ``Axes``.

  Examples:
    >>> import io, jax.numpy as jnp, matplotlib
    >>> matplotlib.use("Agg")
    >>> from sam_optax import sharpness
    >>> surface = sharpness.loss_slice_2d(
    ...     lambda w: w[0] ** 2 + 3 * w[1] ** 2, jnp.zeros(2),
    ...     (jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])), num_points=11)
    >>> ax = sharpness.plot_loss_surface(surface)
    >>> ax.figure.savefig(io.BytesIO(), format="png")
  """
  caller = "plot_loss_surface"
  _check_type(caller, "surface", surface, LossSurface)
  _, ax = _axes(caller, ax, projection="3d")
  if getattr(ax, "name", None) != "3d":
    raise ValueError(
        f"`{caller}`: `ax` must be a 3-D Axes, made with"
        ' `fig.add_subplot(projection="3d")`; got a'
        f" {getattr(ax, 'name', type(ax).__name__)!r} Axes."
    )
  gx, gy = np.meshgrid(np.asarray(surface.xs), np.asarray(surface.ys))
  z = np.asarray(surface.losses, dtype=float)
  if log:
    z = np.log10(np.maximum(z, 1e-12))
  ax.plot_surface(gx, gy, z, cmap=cmap, linewidth=0, antialiased=True)
  ax.set_xlabel(r"$x$")
  ax.set_ylabel(r"$y$")
  ax.set_zlabel(r"$\log_{10}$ loss" if log else "loss")
  if title is not None:
    ax.set_title(title)
  return ax


def plot_sharpness_vs_rho(
    rhos: Sequence[float],
    sharpness: Sequence[float],
    *,
    ax: Any = None,
    label: Optional[str] = None,
    lambda_max: Optional[float] = None,
    log: bool = False,
    **plot_kwargs: Any,
):
  r"""Draws worst-case sharpness against the radius :math:`\rho`.

  With ``lambda_max`` it also draws the quadratic prediction
  :math:`\rho^2 \lambda_{\max} / 2` as a dashed line in the same colour, so
  the departure from the local quadratic model is visible.

  Args:
    rhos: the radii, for example those given to :func:`sharpness_vs_rho`.
    sharpness: the sharpness at each radius.
    ax: the matplotlib ``Axes``; a new figure when ``None``.
    label: legend label; a legend is drawn when given.
    lambda_max: the top Hessian eigenvalue, for the quadratic prediction.
    log: logarithmic axes.
    **plot_kwargs: passed to ``ax.plot``.

  Returns:
    The ``Axes``.

  Examples:
    >>> import io, matplotlib
    >>> matplotlib.use("Agg")
    >>> from sam_optax import sharpness
    >>> ax = sharpness.plot_sharpness_vs_rho(
    ...     [0.0, 0.1, 0.2], [0.0, 0.05, 0.2], label="quadratic", lambda_max=10.0)
    >>> ax.figure.savefig(io.BytesIO(), format="png")
  """
  caller = "plot_sharpness_vs_rho"
  rhos = np.asarray(rhos, dtype=float)
  values = np.asarray(sharpness, dtype=float)
  if rhos.ndim != 1 or rhos.shape != values.shape:
    raise ValueError(
        f"`{caller}`: `rhos` and `sharpness` must be 1-D of the same length;"
        f" got shapes {rhos.shape} and {values.shape}."
    )
  _, ax = _axes(caller, ax)
  (line,) = ax.plot(rhos, values, marker="o", label=label, **plot_kwargs)
  if lambda_max is not None:
    grid = np.linspace(rhos.min(), rhos.max(), 100)
    ax.plot(
        grid, 0.5 * float(lambda_max) * grid ** 2, linestyle="--",
        color=line.get_color(),
        label=None if label is None else rf"$\rho^2\lambda_{{\max}}/2$ ({label})",
    )
  if log:
    ax.set_xscale("log")
    ax.set_yscale("log")
  ax.set_xlabel(r"$\rho$")
  ax.set_ylabel(r"$\max_{\|\epsilon\|\leq\rho} L(w+\epsilon) - L(w)$")
  if label is not None:
    ax.legend()
  return ax


def plot_noise_robustness(
    result: NoiseRobustnessResult,
    *,
    ax: Any = None,
    label: Optional[str] = None,
    ylabel: str = "metric",
    band: float = 2.0,
    **plot_kwargs: Any,
):
  r"""Draws a metric against the weight-noise level, with an error band.

  The line is the mean over the draws of :func:`weight_noise_robustness`;
  the shaded band is ``band`` standard errors either side of it.

  Args:
    result: a :class:`NoiseRobustnessResult`.
    ax: the matplotlib ``Axes``; a new figure when ``None``. Draw several
      models on the same ``ax`` to compare them.
    label: legend label; a legend is drawn when given.
    ylabel: the y-axis label, e.g. ``"test accuracy"``.
    band: the half-width of the band in standard errors (0: no band).
    **plot_kwargs: passed to ``ax.plot``.

  Returns:
    The ``Axes``.

  Examples:
    >>> import io, jax, jax.numpy as jnp, matplotlib
    >>> matplotlib.use("Agg")
    >>> from sam_optax import sharpness
    >>> res = sharpness.weight_noise_robustness(
    ...     lambda w: jnp.sum(w ** 2), jnp.ones(3), [0.0, 0.1, 0.2],
    ...     key=jax.random.key(0), num_draws=8)
    >>> ax = sharpness.plot_noise_robustness(res, label="model", ylabel="loss")
    >>> ax.figure.savefig(io.BytesIO(), format="png")
  """
  caller = "plot_noise_robustness"
  _check_type(caller, "result", result, NoiseRobustnessResult)
  levels = np.asarray(result.levels, dtype=float)
  mean = np.asarray(result.mean, dtype=float)
  half = band * np.asarray(result.std_error, dtype=float)
  _, ax = _axes(caller, ax)
  (line,) = ax.plot(levels, mean, marker="o", label=label, **plot_kwargs)
  if band > 0:
    ax.fill_between(levels, mean - half, mean + half, color=line.get_color(),
                    alpha=0.2, linewidth=0)
  names = {"layer_max": r"$\sigma$ (noise std / layer max |w|)",
           "multiplicative": r"$\sigma$ (relative noise std)",
           "absolute": r"$\sigma$ (noise std)"}
  ax.set_xlabel(names.get(result.noise, r"$\sigma$"))
  ax.set_ylabel(ylabel)
  if label is not None:
    ax.legend()
  return ax
