"""SAM before today's base optimizers: Adafactor, Muon, schedule-free AdamW, Sophia.

``optax.chain(variant, base)`` over three jitted steps must match an
independent reference: the variant's gradient from its float64 oracle
(``tests/oracles.py``, written from its paper's equations on one flat
parameter vector), fed eagerly to the same base optimizer. MSAM wraps the base optimizer instead; its reference
holds the unperturbed weights and the offset separately.

What each base needs from the chain:

* Muon orthogonalizes 2-D leaves and hands the others (biases, the scalar
  temperature of the problem) to Adam; both paths are exercised.
* Schedule-free AdamW evaluates gradients at its iterate ``y`` (the
  parameters the caller holds) and is evaluated at
  ``optax.contrib.schedule_free_eval_params(state, params)``; the reference
  checks those evaluation parameters too (for MSAM, at the unperturbed
  weights ``msam_unperturbed(params, state)``).
* Sophia estimates its Hessian diagonal from ``obj_fn=``, a keyword distinct
  from SAM's ``loss_fn=``; the chain is called with both.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import oracles, problems
from tests.contract import CASES
from tests.reference import flat, grad_at, unflatten

STEPS = 3


# ------------------------------------------------------------------ bases

BASES = {
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=2),
    "muon": lambda: optax.contrib.muon(1e-2),
    "schedule_free_adamw": lambda: optax.contrib.schedule_free_adamw(1e-2),
    # gamma large enough that about half the entries escape Sophia's clipping
    # (which turns the update into a sign), so the gradient fed to it matters.
    "sophia": lambda: optax.contrib.sophia(1e-2, gamma=300.0, update_interval=2),
}
bases = pytest.mark.parametrize("base_name", list(BASES))


def _schedule_free_state(opt_state: Any) -> Any:
  found = [
      x
      for x in jax.tree.leaves(
          opt_state, is_leaf=lambda x: type(x).__name__ == "ScheduleFreeState"
      )
      if type(x).__name__ == "ScheduleFreeState"
  ]
  assert len(found) == 1
  return found[0]


# ------------------------------------------------------------- references


def _unit(v: np.ndarray) -> np.ndarray:
  n = np.linalg.norm(v)
  return v / n if n > 0 else np.zeros_like(v)


def _extra(base_name: str, loss_fn) -> dict[str, Any]:
  return {"obj_fn": loss_fn} if base_name == "sophia" else {}


def _close(got: Any, want: Any) -> None:
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: np.asarray(x, np.float64), got),
      jax.tree.map(lambda x: np.asarray(x, np.float64), want),
      rtol=2e-5, atol=2e-6,
  )


# ------------------------------------------------------------------ tests


def test_muon_routes_non_matrix_leaves_to_adam():
  params, _ = problems.mlp_problem()
  assert {jnp.ndim(x) for x in jax.tree.leaves(params)} == {0, 1, 2}
  state = BASES["muon"]().init(params)
  # optax.partition's state: one inner state per label, both present.
  assert set(state.inner_states) == {"muon", "adam"}


@bases
def test_msam_wrapping_the_base_matches_reference(base_name):
  params, loss_fn = problems.mlp_problem(seed=72)
  rho = 0.5
  extra = _extra(base_name, loss_fn)
  tx = sam_optax.msam(BASES[base_name](), rho=rho)

  @jax.jit
  def step(p, s):  # the gradient at the parameters held: the perturbed ones
    u, s = tx.update(jax.grad(loss_fn)(p), s, p, **extra)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  for _ in range(STEPS):
    p, s = step(p, s)

  # Becker et al.: the gradient at w + offset drives the base at w; the new
  # offset is ρ u/‖u‖ along the base's update u.
  base = BASES[base_name]()
  w, base_state = params, base.init(params)
  offset = np.zeros_like(flat(params))
  for _ in range(STEPS):
    w_tilde = unflatten(params, flat(w) + offset)
    w_tilde = jax.tree.map(lambda x, like: jnp.asarray(x, like.dtype), w_tilde, params)
    updates, base_state = base.update(jax.grad(loss_fn)(w_tilde), base_state, w, **extra)
    w = optax.apply_updates(w, updates)
    u = flat(updates)
    offset = rho * _unit(u) if np.linalg.norm(u) > 0 else rho * _unit(offset)
  _close(p, unflatten(params, flat(w) + offset))
  _close(sam_optax.msam_unperturbed(p, s), w)
  if base_name == "schedule_free_adamw":
    _close(
        optax.contrib.schedule_free_eval_params(
            _schedule_free_state(s), sam_optax.msam_unperturbed(p, s)
        ),
        optax.contrib.schedule_free_eval_params(base_state, w),
    )


def test_sophia_keyword_does_not_reach_sam_and_loss_fn_does_not_reach_sophia():
  """``obj_fn`` (Sophia's) and ``loss_fn`` (SAM's) are separate: each is
  required by its own transform only."""
  params, loss_fn = problems.mlp_problem(seed=73)
  tx = optax.chain(sam_optax.sam(0.1), BASES["sophia"]())
  g = jax.grad(loss_fn)(params)
  with pytest.raises(TypeError, match=r"loss_fn=loss_fn"):
    tx.update(g, tx.init(params), params, obj_fn=loss_fn)
  with pytest.raises(ValueError, match=r"obj_fn"):
    tx.update(g, tx.init(params), params, loss_fn=loss_fn)


# Every contract case before every base, against its float64 oracle
# (tests/oracles.py) fed to the same base. The random cases' draw (esam, rwp,
# the random mask) is read off the points the closure saw.


@bases
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_case_before_every_base_matches_its_oracle(case, base_name):
  params, loss_fn = problems.mlp_problem(seed=72)
  extra = _extra(base_name, loss_fn)
  tx = optax.chain(case.make(), BASES[base_name]())

  seen = []

  @jax.jit
  def step(p, s, t):
    g = jax.grad(loss_fn)(p)
    u, s = tx.update(g, s, p, **case.closure(oracles.recording(loss_fn, seen, t)),
                     **extra)
    return optax.apply_updates(p, u), s

  p, s, ws = params, tx.init(params), []
  for t in range(STEPS):
    ws.append(flat(p))
    p, s = step(p, s, jnp.asarray(t, jnp.int32))
  jax.effects_barrier()
  points = [[q for tag, q in seen if tag == t] for t in range(STEPS)]

  oracle = oracles.ORACLES[case.name](params)
  grad = lambda v: grad_at(loss_fn, params, v)  # noqa: E731
  base = BASES[base_name]()
  q, base_state = params, base.init(params)
  for t in range(STEPS):
    w = flat(q)
    _, u = oracle(t, w, grad(w), grad, case.kwargs["rho"], (ws[t], points[t]))
    u = jax.tree.map(
        lambda x, like: jnp.asarray(x, like.dtype), unflatten(params, u), params
    )
    updates, base_state = base.update(u, base_state, q, **extra)
    q = optax.apply_updates(q, updates)
  _close(p, q)
  if base_name == "schedule_free_adamw":
    _close(
        optax.contrib.schedule_free_eval_params(_schedule_free_state(s), p),
        optax.contrib.schedule_free_eval_params(base_state, q),
    )
