"""One process of the two-process SAM run in ``tests/test_multihost.py``.

``python -m tests.multihost_worker PROCESS_ID PORT OUT_DIR CONFIG...`` joins a
two-process JAX runtime on 127.0.0.1 (CPU collectives through gloo, 4 CPU
devices per process), runs three steps of each configuration (see
:data:`CONFIGS`) on the global 8-device mesh and writes the final parameters
to ``OUT_DIR/params_<PROCESS_ID>_<CONFIG>.npy`` (and, for a stateful
variant, its flat float state to ``OUT_DIR/state_<PROCESS_ID>_<CONFIG>.npy``).
"""

from __future__ import annotations

import sys

import jax

DEVICES_PER_PROCESS = 4


RHO = 0.3
CONFIGS = ("per_device", "sync", "group=2", "vasso")
"""``sam(0.3)`` per device, synchronized, in groups of two (each chained with
``sgd(0.1, momentum=0.9)``), and per-device ``vasso(0.3, theta=0.9)`` chained
with ``sgd(0.2)``."""


def transform(config: str):
  import optax

  import sam_optax

  if config == "vasso":
    return optax.chain(
        sam_optax.vasso(RHO, theta=0.9, axis_name="batch"), optax.sgd(0.2)
    )
  options = {
      "per_device": {},
      "sync": {"sync_perturbation": True},
      "group=2": {"group_size": 2},
  }[config]
  return optax.chain(
      sam_optax.sam(RHO, axis_name="batch", **options),
      optax.sgd(0.1, momentum=0.9),
  )


def run_steps(config: str, steps: int = 3):
  """Three steps of ``transform(config)`` on the global mesh: (params, state)."""
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from tests import problems

  mesh = jax.make_mesh(
      (jax.device_count(),), ("batch",),
      axis_types=(jax.sharding.AxisType.Auto,),
  )
  params = problems.mlp_params(0)
  x, y = (np.asarray(a) for a in problems.mlp_batch(seed=3, n=32))
  sharded = NamedSharding(mesh, P("batch"))
  xs = jax.make_array_from_callback(x.shape, sharded, lambda i: x[i])
  ys = jax.make_array_from_callback(y.shape, sharded, lambda i: y[i])
  tx = transform(config)

  def local(params, state, x, y):
    loss_fn = lambda p: problems.mlp_loss(p, (x, y))  # noqa: E731
    grads = jax.grad(loss_fn)(jax.lax.pcast(params, "batch", to="varying"))
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  step = jax.jit(
      jax.shard_map(
          local,
          mesh=mesh,
          in_specs=(P(), P(), P("batch"), P("batch")),
          out_specs=(P(), P()),
      )
  )
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  state = jax.device_put(tx.init(params), replicated)
  for _ in range(steps):
    params, state = step(params, state, xs, ys)
  local = lambda a: np.asarray(a.addressable_data(0))  # noqa: E731
  return jax.tree.map(local, params), jax.tree.map(local, state)


def main(argv: list[str]) -> None:
  process_id, port, out_dir = int(argv[0]), int(argv[1]), argv[2]
  configs = argv[3:]
  jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}",
      num_processes=2,
      process_id=process_id,
      initialization_timeout=60,
  )
  assert jax.process_count() == 2, jax.process_count()
  assert jax.device_count() == 2 * DEVICES_PER_PROCESS, jax.device_count()
  import numpy as np
  from jax.flatten_util import ravel_pytree

  for config in configs:
    params, state = run_steps(config)
    np.save(
        f"{out_dir}/params_{process_id}_{config}.npy",
        np.asarray(ravel_pytree(params)[0]),
    )
    if config == "vasso":
      d = state[0].variant.perturbation.d
      np.save(
          f"{out_dir}/state_{process_id}_{config}.npy",
          np.asarray(ravel_pytree(d)[0]),
      )
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1:])
