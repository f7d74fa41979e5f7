"""The contract every sharpness-aware transform of this package satisfies.

Each transform is registered as a :class:`Case`; ``tests/test_contract.py``
runs every check over every case. A new variant joins the suite by adding one
line to ``CASES``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

import sam_optax


@dataclasses.dataclass(frozen=True)
class Case:
  """A transform factory and the keyword arguments that configure it.

  ``factory(**kwargs)`` builds the transform; ``kwargs`` must contain
  ``rho`` (the perturbation size), and ``rho=0`` must reduce the transform to
  the identity on the clean gradient.

  ``radius`` is the name the factory's own error messages give ``rho``.
  ``zero_gradient_is_stationary=False`` marks a transform whose perturbation
  does not vanish with the gradient (a random one), so that a zero gradient
  need not give a zero update; it must still give a finite one.

  ``closure`` turns the suite's scalar loss into the keyword arguments the
  transform's ``update`` takes (``{"loss_fn": loss_fn}`` for most; a
  per-domain closure for DGSAM), and ``closure_name`` is the keyword its
  errors name. ``grad_fn=False`` marks a transform without the ``grad_fn=``
  alternative. ``rho_zero_rtol`` is how far ``rho=0`` may be from the base
  optimizer: 0 (bit for bit) unless the transform averages several
  gradients, which float32 rounds. ``uses_clean_gradient=False`` marks a
  transform that takes every gradient from its closure and ignores the one
  handed to ``update`` (the non-finite clean-gradient checks do not apply);
  ``controlled_rho=False`` one that rejects ``rho="auto"`` and the radius
  controllers. ``rho_zero_kwargs`` are keyword arguments added to ``rho=0``
  in the rho=0 tests where ``rho=0`` alone is not the base optimizer (SAMPa
  mixes in a gradient at another point unless ``lam=0``).
  ``first_step_at_params=True`` marks a transform whose first step evaluates
  its closure at ``params`` itself (SAMPa: no stored ascent gradient yet), so
  the non-finite checks that poison points away from ``params`` start after
  one healthy step.
  """

  name: str
  factory: Callable[..., optax.GradientTransformationExtraArgs]
  kwargs: dict[str, Any]
  radius: str = "rho"
  zero_gradient_is_stationary: bool = True
  closure: Callable[[Callable[..., Any]], dict[str, Any]] = lambda f: {"loss_fn": f}
  closure_name: str = "loss_fn"
  grad_fn: bool = True
  rho_zero_rtol: float = 0.0
  uses_clean_gradient: bool = True
  controlled_rho: bool = True
  rho_zero_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  first_step_at_params: bool = False

  def make(self, **overrides: Any) -> optax.GradientTransformationExtraArgs:
    return self.factory(**{**self.kwargs, **overrides})

  def with_rho_schedule(
      self, rho: float, **overrides: Any
  ) -> optax.GradientTransformationExtraArgs:
    """The same transform with ``rho`` given as a (constant) schedule."""
    return self.make(rho=lambda count: rho + 0.0 * count, **overrides)


def _rwp_with_rho(rho=0.01, alpha=0.5, key=0):
  """RWP with ``gamma`` under the name ``rho``."""
  return sam_optax.rwp(gamma=rho, alpha=alpha, key=key)


DOMAINS = 3


def _dgsam(rho=0.1, key=0):
  """DGSAM over ``DOMAINS`` domains (a static count, hidden from inject_hyperparams)."""
  return sam_optax.dgsam(rho, num_domains=DOMAINS, key=key)


def _same_domains(loss_fn):
  """Every domain's loss is the suite's loss: the domain order cannot change
  the result, so the shared oracles need not read it back (``test_dgsam.py``
  checks the order against distinct domains)."""
  return {"domain_loss_fn": lambda p, d: loss_fn(p)}


CASES = (
    Case("sam", sam_optax.sam, {"rho": 0.05}),
    Case("sam_eps", sam_optax.sam, {"rho": 0.1, "eps": 1e-6}),
    Case("sam_2steps", sam_optax.sam, {"rho": 0.05, "num_ascent_steps": 2}),
    Case("sam_renorm", sam_optax.sam, {"rho": 0.05, "renormalize": True}),
    Case("asam", sam_optax.asam, {"rho": 0.5, "eta": 0.01}),
    Case("samson", sam_optax.samson, {"rho": 0.2, "eta": 0.01}),
    Case("samson_p2", sam_optax.samson, {"rho": 0.2, "eta": 0.05, "norm": "l2"}),
    Case(
        "composed",
        sam_optax.sharpness_aware,
        {
            "rho": 0.3,
            "perturbation": sam_optax.perturbations.adaptive(0.01),
            "direction": sam_optax.directions.gsam(0.2),
            "policy": sam_optax.policies.every(3),
        },
    ),
    Case(  # a random part with another direction and a policy
        "composed_random_mask",
        sam_optax.sharpness_aware,
        {
            "rho": 0.3,
            "perturbation": sam_optax.perturbations.random_mask(0.5, key=1),
            "direction": sam_optax.directions.gsam(0.2),
            "policy": sam_optax.policies.every(2),
        },
    ),
    Case("gcsam", sam_optax.gcsam, {"rho": 0.05}),
    Case(  # PyTorch layout (the transcribed code's), the centralized norm
        "gcsam_first",
        sam_optax.gcsam,
        {"rho": 0.1, "filter_axis": "first", "norm": "centralized"},
    ),
    Case("wsam", sam_optax.wsam, {"rho": 0.05, "gamma": 0.88}),
    Case("wsam_low", sam_optax.wsam, {"rho": 0.1, "gamma": 0.3}),
    Case("usam", sam_optax.usam, {"rho": 0.01}),
    Case("gsam", sam_optax.gsam, {"rho": 0.05, "alpha": 0.2}),
    Case("looksam", sam_optax.looksam, {"rho": 0.05, "k": 2, "alpha": 0.7}),
    Case("esam", sam_optax.esam, {"rho": 0.05, "beta": 0.5, "gamma": 0.5, "key": 0}),
    Case(  # the noise does not depend on the gradient
        "rwp",
        _rwp_with_rho,
        {"rho": 0.01, "alpha": 0.5, "key": 0},
        radius="gamma",
        zero_gradient_is_stationary=False,
    ),
    Case("ae_sam", sam_optax.ae_sam, {"rho": 0.05, "total_steps": 4}),
    Case("friendly_sam", sam_optax.friendly_sam, {"rho": 0.05, "sigma": 1.0, "lam": 0.6}),
    Case("vasso", sam_optax.vasso, {"rho": 0.05, "theta": 0.9}),
    Case("fisher_sam", sam_optax.fisher_sam, {"rho": 0.1, "eta": 1.0}),
    Case(  # element-wise mask, full-gradient norm; a callable mask is no hyperparameter
        "masked_sam",
        lambda rho: sam_optax.masked_sam(
            rho,
            lambda p: jax.tree.map(
                lambda x: jax.numpy.arange(x.size).reshape(x.shape) % 2 == 0, p
            ),
            normalize="full",
        ),
        {"rho": 0.05},
    ),
    Case(  # whole-leaf mask, masked-gradient norm
        "sam_on",
        lambda rho: sam_optax.sam_on(rho, lambda p: jax.tree.map(lambda x: x.ndim < 2, p)),
        {"rho": 0.5},
    ),
    Case(
        "fisher_masked_sam",
        sam_optax.fisher_masked_sam,
        {"rho": 0.05, "sparsity": 0.5, "refresh_every": 2},
    ),
    Case(  # every gradient through the closure, DOMAINS + 1 of them averaged
        "dgsam",
        _dgsam,
        {"rho": 0.1, "key": 0},
        closure=_same_domains,
        closure_name="domain_loss_fn",
        grad_fn=False,
        rho_zero_rtol=1e-6,
        uses_clean_gradient=False,
        controlled_rho=False,
    ),
    Case(  # three points after the clean gradient; u averages two gradients
        "gam",
        sam_optax.gam,
        {"rho": 0.2, "rho_prime_ratio": 0.25, "beta0": 0.3, "beta1": 0.7, "gamma": 0.3},
        rho_zero_rtol=1e-6,
        controlled_rho=False,
    ),
    Case(  # the pass on the current batch (no previous_loss_fn); rho=0, lam=0
           # is the base; the clean gradient is not read
        "sampa",
        sam_optax.sampa,
        {"learning_rate": 0.05, "rho": 0.1, "lam": 0.2},
        controlled_rho=False,
        rho_zero_kwargs={"lam": 0.0},
        first_step_at_params=True,
        uses_clean_gradient=False,
    ),
)
