"""DGSAM against a float64 transcription of the authors' loop, over several steps.

The reference below is written from the DomainBed ``DGSAM`` optimizer's loop:
for ``i = 0 .. S`` take the gradient of domain ``π(i mod S)`` at the current
point, add it to the sum and step ``ρ g/‖g‖`` along it; hand on
``S/(S+1) Σ g_i`` (``scale_by_domains=True``) or the mean. The random order
``π`` is read back from the points at which the closure is called (recorded
with a callback), so that the reference shares the draw, not the code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems, reference

S, RHO, LR, EPS = 3, 0.1, 0.2, 1e-12


def _domains(n=12):
  """S domains: the same task, inputs shifted and scaled per domain."""
  xs, ys = [], []
  for d in range(S):
    x, y = problems.mlp_batch(30 + d, n=n)
    xs.append(x * (1.0 + 0.5 * d) + 0.3 * d)
    ys.append(y)
  return jnp.stack(xs), jnp.stack(ys)


XS, YS = _domains()


def _domain_loss(p, d):
  return problems.mlp_loss(p, (XS[d], YS[d]))


def _recording(seen):
  def domain_loss_fn(p, d):
    jax.debug.callback(lambda v: seen.append(int(v)), d, ordered=True)
    return _domain_loss(p, d)

  return domain_loss_fn


def _vector_loss(p):
  return jnp.stack([_domain_loss(p, d) for d in range(S)])


def _reference(w, order, scale):
  """One step of the transcribed loop in float64; ``order`` has S + 1 entries."""
  params = problems.mlp_params(seed=0)
  point, total = w.copy(), np.zeros_like(w)
  for d in order:
    g = reference.grad_at(lambda p, d=d: _domain_loss(p, d), params, point)
    total += g
    point = point + RHO * g / (np.linalg.norm(g) + EPS)
  return total * ((S if scale else 1.0) / (S + 1))


def _train(tx, steps, **closure):
  params = problems.mlp_params(seed=0)

  @jax.jit
  def step(p, s):
    grads = jax.tree.map(jnp.zeros_like, p)  # not used by DGSAM
    u, s = tx.update(grads, s, p, **closure)
    return optax.apply_updates(p, u), s

  state, trajectory = tx.init(params), [params]
  for _ in range(steps):
    params, state = step(params, state)
    trajectory.append(params)
  jax.effects_barrier()
  return trajectory, state


@pytest.mark.parametrize("scale", [False, True])
def test_three_steps_match_the_transcribed_loop(scale):
  seen = []
  tx = optax.chain(sam_optax.dgsam(RHO, num_domains=S, key=3, scale_by_domains=scale),
                   optax.sgd(LR))
  trajectory, state = _train(tx, 3, domain_loss_fn=_recording(seen))
  assert len(seen) == 3 * (S + 1)  # S + 1 single-domain gradients per step
  w = reference.flat(trajectory[0])
  for t in range(3):
    order = seen[t * (S + 1):(t + 1) * (S + 1)]
    assert sorted(order[:S]) == list(range(S)) and order[S] == order[0]
    w = w - LR * _reference(w, order, scale)
    np.testing.assert_allclose(reference.flat(trajectory[t + 1]), w, rtol=2e-5, atol=2e-6)
  stats = sam_optax.sam_stats(state)
  assert float(stats.rho) == pytest.approx(RHO) and float(stats.pass_taken) == 1.0


def test_the_order_is_drawn_afresh_every_step():
  seen = []
  tx = sam_optax.dgsam(RHO, num_domains=S, key=0)
  _train(optax.chain(tx, optax.sgd(LR)), 6, domain_loss_fn=_recording(seen))
  orders = {tuple(seen[t * (S + 1):t * (S + 1) + S]) for t in range(6)}
  assert len(orders) > 1


def test_vector_losses_give_the_same_steps():
  seen = []
  key = 5
  indexed, _ = _train(optax.chain(sam_optax.dgsam(RHO, num_domains=S, key=key),
                                  optax.sgd(LR)), 2, domain_loss_fn=_recording(seen))
  vector, _ = _train(optax.chain(sam_optax.dgsam(RHO, key=key), optax.sgd(LR)), 2,
                     loss_fn=_vector_loss)
  for a, b in zip(indexed, vector):
    np.testing.assert_allclose(reference.flat(a), reference.flat(b), rtol=1e-5, atol=1e-6)


def test_rho_zero_is_the_mean_of_the_domain_gradients_plus_the_first_again():
  seen = []
  params = problems.mlp_params(seed=0)
  tx = sam_optax.dgsam(0.0, num_domains=S, key=1)
  out, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params,
                     domain_loss_fn=_recording(seen))
  jax.effects_barrier()
  grads = [reference.flat(jax.grad(_domain_loss)(params, d)) for d in range(S)]
  want = (np.sum(grads, axis=0) + grads[seen[0]]) / (S + 1)
  np.testing.assert_allclose(reference.flat(out), want, rtol=1e-5, atol=1e-7)


def test_per_device_members_average_their_own_domain_gradients():
  params = problems.mlp_params(seed=0)
  members = 2
  shift = jnp.asarray([0.0, 0.7])

  def member_loss(c):
    return lambda p, d: problems.mlp_loss(p, (XS[d] + c, YS[d]))

  def member(c):
    tx = sam_optax.dgsam(RHO, num_domains=S, key=2, axis_name="i")
    return tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params,
                     domain_loss_fn=member_loss(c))[0]

  got = jax.vmap(member, axis_name="i")(shift)
  single = sam_optax.dgsam(RHO, num_domains=S, key=2)
  each = [single.update(jax.tree.map(jnp.zeros_like, params), single.init(params), params,
                        domain_loss_fn=member_loss(c))[0] for c in shift]
  want = jax.tree.map(lambda *x: jnp.mean(jnp.stack(x), 0), *each)
  for m in range(members):
    np.testing.assert_allclose(reference.flat(jax.tree.map(lambda x: x[m], got)),
                               reference.flat(want), rtol=1e-5, atol=1e-6)


def test_misuse_is_named_with_the_fix():
  params = problems.mlp_params(seed=0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = sam_optax.dgsam(RHO)
  state = tx.init(params)
  pooled = lambda p: jnp.mean(_vector_loss(p))
  with pytest.raises(TypeError, match=r"(?s)vector of per-domain losses.*domain_loss_fn="):
    tx.update(zeros, state, params, loss_fn=pooled)
  with pytest.raises(ValueError, match="num_domains=S"):
    tx.update(zeros, state, params, domain_loss_fn=_domain_loss)
  with pytest.raises(ValueError, match=r"returned 3 domain losses, but `num_domains=4`"):
    sam_optax.dgsam(RHO, num_domains=4).update(zeros, state, params, loss_fn=_vector_loss)
  with pytest.raises(TypeError, match="exactly one of `loss_fn`"):
    tx.update(zeros, state, params)
  with pytest.raises(ValueError, match="`dgsam`: `rho`"):
    sam_optax.dgsam(-1.0)
  with pytest.raises(ValueError, match="`dgsam`: `num_domains` must be an integer >= 1"):
    sam_optax.dgsam(RHO, num_domains=0)
  injected = optax.inject_hyperparams(sam_optax.dgsam)(RHO, num_domains=S)
  with pytest.raises(TypeError, match=r"static_args=\('num_domains',\)"):
    jax.jit(lambda s: injected.update(zeros, s, params, domain_loss_fn=_domain_loss))(
        injected.init(params)
    )
  static = optax.inject_hyperparams(sam_optax.dgsam, static_args=("num_domains",))
  static = static(RHO, num_domains=S)
  jax.jit(lambda s: static.update(zeros, s, params, domain_loss_fn=_domain_loss))(
      static.init(params)
  )
  wrapped = optax.MultiSteps(optax.chain(sam_optax.dgsam(RHO, num_domains=S), optax.sgd(LR)), 2)
  with pytest.raises(ValueError, match="wrapped by `optax.MultiSteps`"):
    wrapped.update(zeros, wrapped.init(params), params, domain_loss_fn=_domain_loss)
