"""sam_optax: Sharpness-Aware Minimization and its variants for optax.

Every transform here is an ``optax.GradientTransformationExtraArgs`` that
receives the clean gradient, takes a loss closure as the keyword argument
``loss_fn=`` (or ``grad_fn=``), and returns the direction for the optimizer
that follows it in ``optax.chain``::

    tx = optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
"""

from sam_optax._core.builder import SAMState
from sam_optax._core.checks import (
    GradientCheck,
    SetupWarning,
    check_step,
    debug_checks,
)
from sam_optax._core.radius_access import get_rho, set_rho
from sam_optax._core.radius import (
    AutoRho,
    GuardedRho,
    RadiusState,
    auto_rho,
    guarded,
)
from sam_optax._core.stats import SAMStats, sam_stats
from sam_optax._parts import directions, perturbations, policies
from sam_optax._parts.compose import sharpness_aware
from sam_optax._transforms.ae_sam import AESAMState, ae_sam
from sam_optax._transforms.asam import asam
from sam_optax._transforms.bsam import BSAMState, bsam, bsam_sample
from sam_optax._transforms.dgsam import dgsam
from sam_optax._transforms.esam import esam
from sam_optax._transforms.fisher_sam import fisher_sam
from sam_optax._transforms.friendly_sam import FriendlySAMState, friendly_sam
from sam_optax._transforms.gam import gam
from sam_optax._transforms.gcsam import gcsam
from sam_optax._transforms.gsam import gsam, gsam_rho_schedule
from sam_optax._transforms.lookbehind_sam import LookbehindState, lookbehind_sam
from sam_optax._transforms.looksam import LookSAMState, looksam
from sam_optax._transforms.masked_sam import (
    FisherMaskState,
    fisher_masked_sam,
    fsam4plm_exempt,
    masked_sam,
)
from sam_optax._transforms.msam import MSAMState, msam, msam_unperturbed
from sam_optax._transforms.rwp import RandomKeyState, rwp
from sam_optax._transforms.sam import sam
from sam_optax._transforms.sam_on import normalization_mask, sam_on
from sam_optax._transforms.samson import samson
from sam_optax._transforms.sampa import SAMPaState, sampa
from sam_optax._transforms.usam import usam
from sam_optax._transforms.vasso import VaSSOState, vasso
from sam_optax._transforms.wsam import WSAMDecoupledState, wsam, wsam_decoupled
from sam_optax._wrappers import with_sam
from sam_optax import calibration  # noqa: E402  (module namespace)
from sam_optax import sharpness  # noqa: E402  (subpackage namespace)

__version__ = "0.1.0"

__all__ = (
    "AESAMState",
    "AutoRho",
    "BSAMState",
    "FisherMaskState",
    "FriendlySAMState",
    "GradientCheck",
    "GuardedRho",
    "LookSAMState",
    "LookbehindState",
    "MSAMState",
    "RadiusState",
    "RandomKeyState",
    "SAMState",
    "SAMStats",
    "SetupWarning",
    "VaSSOState",
    "WSAMDecoupledState",
    "ae_sam",
    "asam",
    "auto_rho",
    "bsam",
    "bsam_sample",
    "calibration",
    "check_step",
    "debug_checks",
    "dgsam",
    "directions",
    "esam",
    "fisher_masked_sam",
    "fisher_sam",
    "friendly_sam",
    "fsam4plm_exempt",
    "gam",
    "gcsam",
    "gsam",
    "get_rho",
    "gsam_rho_schedule",
    "guarded",
    "lookbehind_sam",
    "looksam",
    "masked_sam",
    "perturbations",
    "policies",
    "msam",
    "msam_unperturbed",
    "normalization_mask",
    "rwp",
    "sam",
    "sam_on",
    "samson",
    "sampa",
    "SAMPaState",
    "sam_stats",
    "set_rho",
    "sharpness",
    "sharpness_aware",
    "usam",
    "vasso",
    "with_sam",
    "wsam",
    "wsam_decoupled",
)


def __getattr__(name: str):
  """Imports ``sam_optax.flax`` on first access, so Flax stays optional.

  ``import sam_optax`` does not import Flax; ``sam_optax.flax`` imports it
  then (and raises ``ImportError`` with the install command without it).
  """
  if name == "flax":
    import importlib  # noqa: PLC0415

    return importlib.import_module("sam_optax.flax")
  raise AttributeError(f"module 'sam_optax' has no attribute {name!r}")


def __dir__():
  """The public names and ``flax``, which is imported on first access."""
  return sorted({*globals(), "flax"})
