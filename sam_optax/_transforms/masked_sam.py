"""Sparse SAM: perturb only the entries a mask selects (SSAM, Fisher-mask SAM, SAM-ON)."""

from __future__ import annotations

import re
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._core import masking, validation
from sam_optax._core.builder import ScalarOrSchedule
from sam_optax._core.collectives import AxisName
from sam_optax._parts import perturbations
from sam_optax._parts.compose import sharpness_aware
from sam_optax._parts.perturbations import FisherMaskState

__all__ = ("FisherMaskState", "fisher_masked_sam", "fsam4plm_exempt", "masked_sam")

_NORMALIZE = ("masked", "full")


def _check_mask_leaves(caller: str, mask: Any, params: Any, hint: str) -> None:
  """Validates a resolved mask against ``params``; raises ``ValueError``."""
  with_path = jax.tree_util.tree_flatten_with_path(mask)[0]
  selected_any, known = False, True
  for (path, m), p in zip(with_path, jax.tree.leaves(params)):
    where = jax.tree_util.keystr(path)
    if isinstance(m, bool):
      selected_any = selected_any or m
      continue
    if not hasattr(m, "dtype") or m.dtype != jnp.bool_:
      raise ValueError(
          f"`{caller}`: `mask` leaves must be Python bools or boolean arrays;"
          f" got {m!r} at {where!r}."
      )
    try:
      shape = jnp.broadcast_shapes(jnp.shape(m), jnp.shape(p))
    except ValueError:
      shape = None
    if shape != jnp.shape(p):
      raise ValueError(
          f"`{caller}`: the `mask` leaf at {where!r} has shape {jnp.shape(m)},"
          f" which does not broadcast to the parameter's shape {jnp.shape(p)}."
      )
    if isinstance(m, jax.core.Tracer):
      known = False
    else:
      selected_any = selected_any or bool(np.any(np.asarray(m)))
  if known and not selected_any:
    raise ValueError(
        f"`{caller}`: `mask` selects no parameter, so nothing would be"
        f" perturbed.{hint}"
    )


def _build_masked(
    caller: str,
    rho: ScalarOrSchedule,
    mask: masking.MaskOrFn,
    normalize: str,
    eps: float,
    num_ascent_steps: int,
    renormalize: bool,
    hint: str = "",
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
  """A SAM transform perturbing only the entries ``mask`` selects."""
  validation.check_option(caller, "normalize", normalize, _NORMALIZE)
  if mask is not None and not callable(mask):
    bad = [
        m for m in jax.tree.leaves(mask)
        if not isinstance(m, bool) and getattr(m, "dtype", None) != jnp.bool_
    ]
    if bad:
      raise ValueError(
          f"`{caller}`: `mask` must be a pytree of booleans (or a callable"
          f" returning one); found leaves {bad[:3]!r}."
      )

  masked = perturbations.masked(
      perturbations.l2(eps), mask, mask_gradient=normalize == "masked"
  )

  def init(params: Any) -> Any:
    if not masking.is_placeholder(params):  # see `masking.is_placeholder`
      resolved = masking.resolve(caller, "mask", mask, params)
      _check_mask_leaves(caller, resolved, params, hint)
    return masked.init(params)

  return sharpness_aware(
      rho,
      perturbation=masked._replace(init=init),
      eps=eps,
      num_ascent_steps=num_ascent_steps,
      renormalize=renormalize,
      name=caller,
      **options,
  )


@validation.reported_as("masked_sam")
def masked_sam(
    rho: ScalarOrSchedule = 0.05,
    mask: masking.MaskOrFn = None,
    *,
    normalize: str = "masked",
    eps: float = 1e-12,
    num_ascent_steps: Optional[int] = None,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sparse SAM with a fixed mask: only the selected entries are perturbed.

  With a boolean mask :math:`M` over the parameters,

  .. math::

    \hat\epsilon = \rho \, \frac{M \odot g}{\|M \odot g\|_2 + \mathrm{eps}}
    \quad (\texttt{normalize="masked"}), \qquad
    \hat\epsilon = \rho \, \frac{M \odot g}{\|g\|_2 + \mathrm{eps}}
    \quad (\texttt{normalize="full"}),

  and :math:`u = \nabla L(w + \hat\epsilon)` is returned for *all*
  parameters (the descent step is not masked). With ``"masked"`` the
  perturbation has norm :math:`\rho` inside the selected subspace (SAM
  restricted to it, as in SAM-ON); with ``"full"`` it is SAM's perturbation
  with the unselected entries zeroed, so its norm is at most :math:`\rho`
  (as in the official SSAM and Fisher-mask SAM code). Entries outside the
  mask are never moved: their perturbed value equals the clean one exactly.

  This is the mask mechanism shared by :func:`sam_optax.sam_on` (a mask over
  normalization layers) and :func:`sam_optax.fisher_masked_sam` (a mask
  chosen by a Fisher score and refreshed during training).

  Choosing rho: it depends on ``normalize`` and on how much the mask selects.
  With ``"full"`` the perturbation is SAM's with entries zeroed (length at
  most ρ), so SAM's values apply: SSAM's scripts (Mi et al., 2022) use
  ρ = 0.1 on CIFAR-10 at sparsities 0.5 to 0.99. With ``"masked"`` the whole
  length ρ goes into the selected entries, and the smaller the selection the
  larger the useful ρ: for the normalization layers alone it is about 1, 5
  to 50 times SAM's (Mueller et al., 2023; see :func:`sam_optax.sam_on`).

  Args:
    rho: perturbation radius or schedule.
    mask: which entries are perturbed: ``None`` (all: plain SAM), a pytree
      with the structure of ``params`` whose leaves are Python bools (a whole
      leaf on or off, resolved at trace time) or boolean arrays broadcastable
      to the leaf (element-wise), or a callable ``params -> such a tree``.
      The mask is static: it does not change during training. With
      ``optax.inject_hyperparams``, pass ``static_args=("mask",)`` when
      ``mask`` is a callable (optax treats callables as schedules).
    normalize: ``"masked"`` (norm of :math:`M \odot g`) or ``"full"`` (norm
      of :math:`g`).
    eps: added to the norm.
    num_ascent_steps: see :func:`sam_optax.sam`; every ascent step is masked.
    renormalize: see :func:`sam_optax.sam`.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` takes
    ``loss_fn=`` or ``grad_fn=``).

  Raises:
    ValueError: if ``normalize`` is not one of the two options, or ``mask``
      has non-boolean leaves; at ``init``, if ``mask`` does not match the
      structure or shapes of the parameters or selects nothing.

  Examples:
    Perturb only the weight matrices, not the biases:

    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = {"w": jnp.array([[2.0, -1.0]]), "b": jnp.array([0.5, 0.0])}
    >>> loss_fn = lambda p: jnp.sum((jnp.ones(1) @ p["w"] + p["b"]) ** 2)
    >>> tx = optax.chain(
    ...     sam_optax.masked_sam(rho=0.1, mask={"w": True, "b": False}),
    ...     optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)

  References:
    Mi, Shen, Ren, Zhou, Sun, Ji, Tao, *Make Sharpness-Aware Minimization
    Stronger: A Sparsified Perturbation Approach*, NeurIPS 2022.
    https://arxiv.org/abs/2210.05177

    Mueller, Vlaar, Rolnick, Hein, *Normalization Layers Are All That
    Sharpness-Aware Minimization Needs*, NeurIPS 2023.
    https://arxiv.org/abs/2306.04226
  """
  return _build_masked(
      "masked_sam",
      rho,
      mask,
      normalize,
      eps,
      num_ascent_steps,
      renormalize,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
  )


# Zhong et al.'s `init_mask` (FSAM4PLM, fairseq-FSAM/optim/samsgd.py): a
# parameter whose name contains "bias" or "embed", or that belongs to a
# BatchNorm1d/2d module, is left out of the Fisher mask.
_BATCH_NORM_MODULE = re.compile(
    r"batch_?norm|(?:^|[^a-z])bn\d*(?:[^a-z]|$)", re.IGNORECASE
)
_WRAPPER_ENTRIES = frozenset({"value", "raw_value"})


def _path_names(path: tuple) -> list[str]:
  names = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      names.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      names.append(entry.name)
  while names and names[-1] in _WRAPPER_ENTRIES:
    names.pop()
  return names


def _is_fsam4plm_exempt(path: tuple) -> bool:
  names = _path_names(path)
  if any("bias" in n.lower() or "embed" in n.lower() for n in names):
    return True
  return len(names) >= 2 and _BATCH_NORM_MODULE.search(names[-2]) is not None


def fsam4plm_exempt(params: Any) -> Any:
  """The parameters Zhong et al.'s Fisher-mask SAM leaves out of its mask.

  Their code (FSAM4PLM, ``SAM_Mask.init_mask``) removes from the mask every
  parameter whose dotted name contains ``bias`` or ``embed`` and the
  parameters of ``BatchNorm1d``/``BatchNorm2d`` modules; those parameters are
  not ranked and receive SAM's full perturbation. Here a leaf is exempt
  (``True``) when a name on its path (module or leaf, compared
  case-insensitively) contains ``bias`` or ``embed`` (``bias``, ``Embed_0``,
  ``embedding``, ``pos_embed``, ``layernorm_embedding``), or when the module
  holding it is named like a batch normalization (``BatchNorm_0``,
  ``batch_norm``, ``bn``, ``bn1``; layer normalizations are not exempt, as
  in the authors' code). A trailing ``.value`` path entry (Flax NNX
  variables) is skipped. Check the result before training; other naming
  schemes need an explicit ``exempt=`` tree.

  Args:
    params: a parameter pytree (Flax Linen dicts, an NNX ``State``, or any
      pytree with dict keys or attributes).

  Returns:
    A pytree with the structure of ``params`` and Python-bool leaves.

  Examples:
    >>> import jax.numpy as jnp, sam_optax
    >>> params = {"Embed_0": {"embedding": jnp.ones((5, 2))},
    ...           "BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
    ...           "LayerNorm_0": {"scale": jnp.ones(2)},
    ...           "Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    >>> sam_optax.fsam4plm_exempt(params)  # doctest: +NORMALIZE_WHITESPACE
    {'BatchNorm_0': {'bias': True, 'scale': True},
     'Dense_0': {'bias': True, 'kernel': False},
     'Embed_0': {'embedding': True}, 'LayerNorm_0': {'scale': False}}
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _is_fsam4plm_exempt(path), params
  )


# The options `style` sets: the library's defaults, and Zhong et al.'s.
_STYLES = {
    None: {"score": "accumulated", "eps": 1e-12, "exempt": None, "count": "round"},
    "fsam4plm": {
        "score": "current", "eps": 1e-7, "exempt": fsam4plm_exempt,
        "count": "floor",
    },
}


@validation.reported_as("fisher_masked_sam")
def fisher_masked_sam(
    rho: ScalarOrSchedule = 0.05,
    sparsity: float = 0.9,
    refresh_every: int = 100,
    *,
    style: Optional[str] = None,
    score: Optional[str] = None,
    normalize: str = "full",
    eps: Optional[float] = None,
    exempt: Union[masking.MaskOrFn, bool, str] = None,
    count: Optional[str] = None,
    num_ascent_steps: Optional[int] = None,
    renormalize: bool = False,
    nonfinite: str = "skip",
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    group_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Fisher-mask SAM / SSAM-F: perturb only the entries with the most Fisher information.

  A mask :math:`M` keeps the fraction ``1 - sparsity`` of the parameter
  entries (a global top-k over all ranked leaves together) with the largest
  diagonal empirical Fisher score, and the perturbation is masked as in
  :func:`masked_sam`:

  .. math::

    \hat\epsilon = \rho \, \frac{M \odot g}{\|g\|_2 + \mathrm{eps}}
    \quad (\texttt{normalize="full"}, \text{default}), \qquad
    u = \nabla L(w + \hat\epsilon).

  Parameters named in ``exempt`` are not ranked and have :math:`M = 1`:
  they receive SAM's full perturbation (none are exempt by default; see
  ``style="fsam4plm"``). The mask is recomputed on steps
  :math:`t \equiv 0 \pmod N` with :math:`N` = ``refresh_every`` (steps 0,
  N, 2N, ...; inside ``jax.lax.cond``, so the ranking runs only then),
  *before* that step's perturbation, so step 0 already perturbs with a mask.
  The score is the squared clean mini-batch gradient, the practical proxy of
  the papers' per-sample squares:

  * ``score="accumulated"`` (default without ``style``):
    :math:`\sum_s g_s \odot g_s` over the steps since the previous refresh,
    the current one included (at step 0, :math:`g_0 \odot g_0`), which
    averages the estimate over ``N`` mini-batches (SSAM's Fisher sums
    per-sample squares over 1024 samples);
  * ``score="current"``: :math:`g_t \odot g_t` of the refresh step only, as
    in Zhong et al.'s code (which squares the current batch-mean gradient).

  The number kept is ``round((1 - sparsity) * n)`` for ``n`` ranked entries,
  at least one unless ``sparsity=1`` (``count="round"``), or
  ``floor((1 - sparsity) * n)``, possibly none (``count="floor"``, the
  authors' ``int(n * keep_ratio)``). Ties are broken deterministically (the
  entry earlier in ``jax.tree.leaves`` order wins). Between refreshes the
  mask is frozen in the state (:class:`FisherMaskState`), so it persists
  across ``jit`` calls and checkpoints.

  Zhong et al.'s rule (``style="fsam4plm"``). Their code (WHU-ZQH/FSAM4PLM,
  ``fairseq-FSAM/optim/samsgd.py``, ``SAM_Mask``; commit 77d5b3b) scores
  the square of the clean batch-mean gradient of the refresh step
  (``set_fisher_mask``, called when ``num_updates % mask_iter_e == 0``,
  ``--mask-iter-e 100`` in their scripts), keeps the top
  ``int(n * keep_ratio)`` entries (``keep_ratio=0.1``) of the parameters
  that remain after ``init_mask`` removes those whose name contains
  ``bias`` or ``embed`` and those of BatchNorm layers, gives the removed
  parameters the unmasked perturbation, and perturbs by
  :math:`\rho\, M \odot g / (\|g\| + 10^{-7})` with the norm of the whole
  gradient (``first_step``), ρ = 0.05. ``style="fsam4plm"`` sets
  ``score="current"``, ``exempt="fsam4plm"`` (:func:`fsam4plm_exempt`),
  ``count="floor"`` and ``eps=1e-7``; with ``sparsity=0.9``,
  ``refresh_every=100``, ``rho=0.05`` and ``normalize="full"`` (the
  defaults) it is their perturbation. Options passed explicitly override
  the style's. What is not reproduced: (1) ties, which ``torch.sort``
  orders arbitrarily; (2) on their refresh steps ``set_fisher_mask`` zeroes
  the gradients (``self.model.zero_grad()``) before ``first_step`` reads
  them, so in their runs (PyTorch 1.x) every ``mask_iter_e``-th step,
  step 0 included, is not perturbed at all; here every step is; (3) their
  ``fisher-sam`` path restores the weights from ``old_p``, which
  ``SAM_Mask.first_step`` never stores (their ``fisher-esam`` and
  ``fisher-gsam`` paths, which share the mask and ``first_step`` rule, are
  the ones their run script lists); (4) their perturbed gradient is that
  of the summed, not averaged, batch loss (fed to torch ``Adam``, which
  mostly ignores the scale); chain the base optimizer you want.

  Choosing rho: SAM's values with the default ``normalize="full"``: the
  perturbation is SAM's with the unselected entries zeroed, so its length is
  at most ρ. Zhong et al. (2022) use ρ = 0.05 (their run script), and SSAM's
  scripts (Mi et al., 2022) ρ = 0.1 on CIFAR-10, both in SAM's range. With
  ``normalize="masked"`` the length is ρ itself, longer than with ``"full"``
  by the factor :math:`\|g\| / \|M \odot g\|`.

  Args:
    rho: perturbation radius or schedule.
    sparsity: fraction of the ranked entries *not* perturbed, in [0, 1]
      (SSAM's convention). The default 0.9 keeps 10%, Zhong et al.'s
      ``keep_ratio``; SSAM reports 0.5 (its code's default is 0.2).
    refresh_every: steps between mask refreshes (an int >= 1); Zhong et al.
      refresh every 100 updates, SSAM every 1 to 5 epochs.
    style: ``None`` (the defaults below) or ``"fsam4plm"`` (Zhong et al.'s
      code, see above): the defaults of ``score``, ``eps``, ``exempt`` and
      ``count``.
    score: ``"accumulated"`` or ``"current"``, see above; default
      ``"accumulated"`` (``"current"`` with ``style="fsam4plm"``).
    normalize: ``"full"`` (norm of the whole gradient, both official codes)
      or ``"masked"`` (norm of :math:`M \odot g`, exempt parameters
      included, so the perturbation has norm :math:`\rho`).
    eps: added to the norm; default 1e-12 (1e-7 with ``style="fsam4plm"``).
    exempt: parameters left out of the ranking that receive the full
      perturbation: ``None`` (the style's default: none, or
      :func:`fsam4plm_exempt` with ``style="fsam4plm"``), ``False`` (none),
      ``"fsam4plm"`` (:func:`fsam4plm_exempt`), a pytree of Python bools with
      the structure of the parameters, or a callable ``params -> such a
      tree`` (with ``optax.inject_hyperparams``, pass
      ``static_args=("exempt",)`` for a callable).
    count: ``"round"`` or ``"floor"``, see above; default ``"round"``
      (``"floor"`` with ``style="fsam4plm"``).
    num_ascent_steps: see :func:`sam_optax.sam`; every ascent step uses the
      mask of the current step.
    renormalize: see :func:`sam_optax.sam`.
    nonfinite, axis_name, sync_perturbation, group_size: see
      :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` takes
    ``loss_fn=`` or ``grad_fn=``) whose state is a
    :class:`~sam_optax.SAMState` holding a :class:`FisherMaskState`.

  Raises:
    ValueError: if ``sparsity`` lies outside [0, 1], ``refresh_every`` is not
      an int >= 1, or ``style`` / ``score`` / ``normalize`` / ``count`` is
      not a known option; at ``init``, if ``exempt`` does not match the
      parameters' structure or has leaves other than Python bools; besides
      the checks of :func:`sam_optax.sam`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = {"w": jnp.array([3.0, -1.0, 0.5, 2.0])}
    >>> loss_fn = lambda p: 0.5 * jnp.sum(p["w"] ** 2)
    >>> tx = sam_optax.fisher_masked_sam(rho=0.1, sparsity=0.5, refresh_every=10)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    >>> state.variant.perturbation.mask["w"].tolist()  # the two largest |g| kept
    [True, False, False, True]

    Zhong et al.'s rule, with Adam as in their fine-tuning scripts:

    >>> tx = optax.chain(sam_optax.fisher_masked_sam(style="fsam4plm"),
    ...                  optax.adam(2e-5, b2=0.98, eps=1e-6))

  References:
    Zhong, Ding, Shen, Mi, Liu, Du, Tao, *Improving Sharpness-Aware
    Minimization with Fisher Mask for Better Generalization on Language
    Models*, Findings of EMNLP 2022. https://arxiv.org/abs/2210.05497
    (code: https://github.com/WHU-ZQH/FSAM4PLM).

    Mi, Shen, Ren, Zhou, Sun, Ji, Tao, *Make Sharpness-Aware Minimization
    Stronger: A Sparsified Perturbation Approach*, NeurIPS 2022.
    https://arxiv.org/abs/2210.05177 (code:
    https://github.com/Mi-Peng/Sparse-Sharpness-Aware-Minimization).
  """
  caller = "fisher_masked_sam"
  if style is not None and style not in _STYLES:
    validation.check_option(caller, "style", style, ("fsam4plm",))
  defaults = _STYLES[style]
  score = defaults["score"] if score is None else score
  eps = defaults["eps"] if eps is None else eps
  count = defaults["count"] if count is None else count
  if exempt is None:
    exempt = defaults["exempt"]
  elif exempt is False:
    exempt = None
  elif isinstance(exempt, str):
    validation.check_option(caller, "exempt", exempt, ("fsam4plm",))
    exempt = fsam4plm_exempt
  return sharpness_aware(
      rho,
      perturbation=perturbations.fisher_mask(
          sparsity, refresh_every, score=score, normalize=normalize, eps=eps,
          exempt=exempt, count=count,
      ),
      eps=eps,
      num_ascent_steps=num_ascent_steps,
      renormalize=renormalize,
      nonfinite=nonfinite,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      group_size=group_size,
      name="fisher_masked_sam",
  )
