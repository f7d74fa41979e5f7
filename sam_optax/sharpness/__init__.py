"""Sharpness diagnostics and loss-landscape pictures, in JAX.

Every function takes a loss closure ``loss_fn(params) -> loss`` (or
``-> (loss, aux)``) and a parameter pytree, and is ``jax.jit``-compiled. Models
with BatchNorm or dropout are measured by closing over fixed statistics and a
fixed key, so the loss is a deterministic function of the parameters::

    from sam_optax import sharpness

    loss_fn = lambda p: loss_on(p, x_train, y_train)   # full or fixed batch
    top = sharpness.hessian_top_eigenvalue(loss_fn, params, key=key)
    tr = sharpness.hessian_trace(loss_fn, params, key=key)
    worst = sharpness.worst_case_sharpness(loss_fn, params, rho=0.05)
    surface = sharpness.loss_slice_2d(loss_fn, params, key=key)
    sharpness.plot_loss_contour(surface)

* Curvature: :func:`hvp`, :func:`hessian_top_eigenvalue` (Lanczos or power
  iteration, top-k), :func:`hessian_trace` (Hutchinson).
* Loss increase: :func:`worst_case_sharpness` (SAM or ASAM ball),
  :func:`sharpness_vs_rho`, :func:`average_case_sharpness`,
  :func:`m_sharpness`.
* Robustness: :func:`weight_noise_robustness`, a metric under random noise
  on the weights at inference (per-layer, multiplicative or absolute).
* Landscapes: :func:`random_direction`, :func:`filter_normalize`,
  :func:`linear_interpolation`, :func:`loss_slice_1d`, :func:`loss_slice_2d`.
* Pictures (need matplotlib, the ``examples`` extra):
  :func:`plot_loss_curve`, :func:`plot_loss_contour`,
  :func:`plot_loss_surface`, :func:`plot_sharpness_vs_rho`,
  :func:`plot_noise_robustness`.

The results are NamedTuples that print as short summaries (scalars to 4
significant digits, parameter trees as their leaf and value counts, long
arrays as their shape and range), so ``print(result)`` stays readable for
any model; the fields hold the full arrays.
"""

from sam_optax.sharpness._hessian import (
    HessianEigenResult,
    HessianTraceResult,
    hessian_top_eigenvalue,
    hessian_trace,
    hvp,
)
from sam_optax.sharpness._landscape import (
    LossCurve,
    LossSurface,
    filter_normalize,
    linear_interpolation,
    loss_slice_1d,
    loss_slice_2d,
    random_direction,
)
from sam_optax.sharpness._noise import (
    NoiseRobustnessResult,
    weight_noise_robustness,
)
from sam_optax.sharpness._plot import (
    plot_loss_contour,
    plot_loss_curve,
    plot_loss_surface,
    plot_noise_robustness,
    plot_sharpness_vs_rho,
)
from sam_optax.sharpness._worst_case import (
    AverageSharpnessResult,
    MSharpnessResult,
    SharpnessResult,
    average_case_sharpness,
    m_sharpness,
    sharpness_vs_rho,
    worst_case_sharpness,
)

__all__ = (
    "AverageSharpnessResult",
    "HessianEigenResult",
    "HessianTraceResult",
    "LossCurve",
    "LossSurface",
    "MSharpnessResult",
    "NoiseRobustnessResult",
    "SharpnessResult",
    "average_case_sharpness",
    "filter_normalize",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hvp",
    "linear_interpolation",
    "loss_slice_1d",
    "loss_slice_2d",
    "m_sharpness",
    "plot_loss_contour",
    "plot_loss_curve",
    "plot_loss_surface",
    "plot_noise_robustness",
    "plot_sharpness_vs_rho",
    "random_direction",
    "sharpness_vs_rho",
    "weight_noise_robustness",
    "worst_case_sharpness",
)
