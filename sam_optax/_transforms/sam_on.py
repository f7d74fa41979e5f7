"""SAM-ON: SAM that perturbs only the normalization layers' affine parameters."""

from __future__ import annotations

import re
from typing import Any, Optional

import jax
import optax

from sam_optax._core import masking, validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._transforms.masked_sam import _build_masked

__all__ = ("normalization_mask", "sam_on")

# A module name that denotes a normalization layer: it contains "norm" (BatchNorm_0,
# LayerNorm_3, GroupNorm, RMSNorm, norm1, final_norm, normalization; not "normal"),
# or the token bn / ln / gn (bn, bn1, ln_f, encoder_ln).
_NORM_MODULE = re.compile(
    r"norm(?!al(?:[^i]|$))|(?:^|[^a-z])(?:bn|ln|gn)(?:[^a-z]|$)",
    re.IGNORECASE,
)
_AFFINE_LEAVES = frozenset({"scale", "bias", "offset"})
_WRAPPER_ENTRIES = frozenset({"value", "raw_value"})


def _names(path: tuple) -> list[str]:
  names = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      names.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      names.append(entry.name)
  while names and names[-1] in _WRAPPER_ENTRIES:
    names.pop()
  return names


def _is_norm_affine(path: tuple) -> bool:
  names = _names(path)
  return (
      len(names) >= 2
      and names[-1] in _AFFINE_LEAVES
      and _NORM_MODULE.search(names[-2]) is not None
  )


def normalization_mask(params: Any) -> Any:
  """Selects the affine parameters of normalization layers by Flax naming.

  A leaf is selected (``True``) when its name is ``scale`` or ``bias`` (or
  Haiku's ``offset``) and the module holding it is named like a
  normalization layer: the name contains ``norm`` (Flax's ``BatchNorm_0``,
  ``LayerNorm_3``, ``GroupNorm_0``, ``RMSNorm_0``; user names such as
  ``norm``, ``norm1``, ``final_norm``; but not ``normal``), or has the token
  ``bn``, ``ln`` or ``gn`` (``bn``, ``bn1``, ``ln_f``, ``encoder_ln``),
  case-insensitively. Only the immediate parent module counts, so a ``Dense``
  inside a block named ``prenorm_block`` is not selected. A trailing
  ``.value`` path entry (Flax NNX variables) is skipped.

  Every other naming scheme needs an explicit mask: a pytree of booleans
  with the structure of the parameters, or a callable returning one. Check
  the result (for example with ``jax.tree.map``) before training.

  Args:
    params: a parameter pytree (nested dicts as produced by Flax Linen's
      ``init``, an NNX ``State``, or any pytree with dict keys or attributes).

  Returns:
    A pytree with the structure of ``params`` and Python-bool leaves.

  Examples:
    >>> import jax.numpy as jnp, sam_optax
    >>> params = {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 4))},
    ...           "BatchNorm_0": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
    ...           "Dense_0": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
    >>> sam_optax.normalization_mask(params)  # doctest: +NORMALIZE_WHITESPACE
    {'BatchNorm_0': {'bias': True, 'scale': True}, 'Conv_0': {'kernel': False},
     'Dense_0': {'bias': False, 'kernel': False}}
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _is_norm_affine(path), params
  )


_HINT = (
    " `sam_on` perturbs normalization parameters only, and"
    " `normalization_mask` found none (it looks for leaves named `scale` or"
    " `bias` inside modules named like `BatchNorm_0`, `LayerNorm_3`, `norm`,"
    " `bn1` or `ln_f`). Pass `mask=` explicitly for other naming schemes."
)


@validation.reported_as("sam_on")
def sam_on(
    rho: ScalarOrSchedule = 0.5,
    mask: masking.MaskOrFn = None,
    *,
    normalize: str = "masked",
    eps: float = 1e-12,
    num_ascent_steps: int = 1,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SAM-ON: perturb only the normalization layers (SAM-OnlyNorm).

  The ascent step perturbs only the affine parameters of the normalization
  layers (BatchNorm / LayerNorm scale and bias, often under 0.1% of the
  weights); the gradient at the perturbed point is still returned for all
  parameters. With :math:`M` the normalization mask,

  .. math::

    \hat\epsilon = \rho \, \frac{M \odot g}{\|M \odot g\|_2 + \mathrm{eps}},
    \qquad u = \nabla L(w + \hat\epsilon),

  the norm being over the masked gradient, as in the official code (which
  collects the gradient norms of the normalization parameters only). Since
  the perturbation lives in a much smaller subspace, the useful ρ is much
  larger than full SAM's.

  This is :func:`sam_optax.masked_sam` with the mask defaulting to
  :func:`sam_optax.normalization_mask`.

  Choosing rho: much larger than SAM's, since only the normalization
  parameters (often under 0.1% of the weights) are perturbed: useful values
  are about 1, 5 to 50 times SAM's (Mueller et al., 2023). The official
  training script defaults to 0.5, and its README trains the adaptive
  variant, ASAM-ON, with ρ = 10. Tune on a wide, logarithmic grid.

  Args:
    rho: perturbation radius or schedule; far above SAM's, see "Choosing
      rho" above.
    mask: ``None`` (select by Flax naming with
      :func:`sam_optax.normalization_mask`), or an explicit mask as in
      :func:`sam_optax.masked_sam` (preferred for other naming schemes).
    normalize: ``"masked"`` (default, as in SAM-ON) or ``"full"``; see
      :func:`sam_optax.masked_sam`.
    eps: added to the norm.
    num_ascent_steps: see :func:`sam_optax.sam`.
    renormalize: see :func:`sam_optax.sam`.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` takes
    ``loss_fn=`` or ``grad_fn=``).

  Raises:
    ValueError: as :func:`sam_optax.masked_sam`; in particular at ``init``
      when the mask selects no parameter.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
    ...           "LayerNorm_0": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}}
    >>> def loss_fn(p):
    ...   h = jnp.ones(3) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    ...   h = (h - h.mean()) * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"]
    ...   return jnp.sum((h - jnp.array([1.0, -1.0])) ** 2)
    >>> tx = optax.chain(sam_optax.sam_on(rho=0.5), optax.sgd(0.1, momentum=0.9))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)

  References:
    Mueller, Vlaar, Rolnick, Hein, *Normalization Layers Are All That
    Sharpness-Aware Minimization Needs*, NeurIPS 2023.
    https://arxiv.org/abs/2306.04226 (code:
    https://github.com/mueller-mp/SAM-ON, ``sam_on.py``).
  """
  return _build_masked(
      "sam_on",
      rho,
      normalization_mask if mask is None else mask,
      normalize,
      eps,
      num_ascent_steps,
      renormalize,
      hint=_HINT,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
  )
