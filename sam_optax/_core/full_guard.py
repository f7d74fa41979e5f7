"""The ``nonfinite`` policy of the optimizers that wrap or replace the base.

:func:`sam_optax.lookbehind_sam` and :func:`sam_optax.bsam` return the
parameter update themselves, so the pipeline's guard (which acts on the
direction handed to a base optimizer) does not reach them. This is its
counterpart on a whole optimizer step: where the step is not finite, the
update is zero and the state keeps its last finite value, except the fields
that must move on every call (the step count, a random key); the step is
counted. Selects only: no conditional is compiled.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from sam_optax._core import tree, validation

PyTree = Any
POLICIES = ("skip", "propagate")


def check(caller: str, nonfinite: Any) -> None:
  """Rejects a policy other than ``"skip"`` and ``"propagate"``, naming the fix."""
  if nonfinite == "fallback":
    raise ValueError(
        f"`{caller}`: nonfinite='fallback' is not available: this optimizer"
        " has no clean-gradient step to fall back on. Use 'skip' (a zero"
        " update, the state kept) or 'propagate'."
    )
  validation.check_option(caller, "nonfinite", nonfinite, POLICIES)


def finite(*trees: PyTree) -> jax.Array:
  """Whether every leaf of ``trees`` is finite (a boolean scalar)."""
  return jnp.all(jnp.stack([jnp.isfinite(tree.global_norm(t)) for t in trees]))


def apply(
    nonfinite: str,
    ok: jax.Array,
    out: PyTree,
    new_state: Any,
    old_state: Any,
    moving: Sequence[str] = ("count",),
) -> tuple[PyTree, Any]:
  """The policy on one step: ``(out, state)`` with ``nonfinite_count`` updated.

  ``new_state`` and ``old_state`` are NamedTuples with a ``nonfinite_count``
  field; the fields named in ``moving`` always take ``new_state``'s value.
  """
  bad = jnp.logical_not(ok).astype(jnp.int32)
  count = old_state.nonfinite_count + bad
  if nonfinite == "propagate":
    return out, new_state._replace(nonfinite_count=count)
  out = jax.tree.map(lambda o: jnp.where(ok, o, jnp.zeros_like(o)), out)
  kept = tree.select(ok, new_state, old_state)
  kept = kept._replace(**{f: getattr(new_state, f) for f in moving})
  return out, kept._replace(nonfinite_count=count)
