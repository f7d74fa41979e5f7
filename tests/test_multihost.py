"""SAM across two processes joined by ``jax.distributed`` (CPU, gloo).

Two worker processes on 127.0.0.1, each with 4 CPU devices, form one
8-device mesh and run three steps of each configuration of
``tests.multihost_worker``: per-device, synchronized and grouped
(``group_size=2``) SAM, and per-device VaSSO (a stateful variant). Both
processes must hold the parameters (and VaSSO's agreed state) of an
independent float64 loop over the eight shards. The run is bounded in time
and the workers are killed if they hang.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import optax
import pytest

from tests import multihost_worker, problems
from tests.reference import flat, unflatten
from tests.test_distributed import (
    _VaSSO,
    _groups,
    grouped_reference,
    stateful_reference,
)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240
STEPS = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """Runs every configuration once in two processes; returns the output folder."""
  out = tmp_path_factory.mktemp("multihost")
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  port = _free_port()
  procs = [
      subprocess.Popen(
          [sys.executable, "-m", "tests.multihost_worker", str(i), str(port), str(out),
           *multihost_worker.CONFIGS],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      )
      for i in range(2)
  ]
  logs = []
  try:
    for p in procs:
      log, _ = p.communicate(timeout=TIMEOUT_S)
      logs.append(log)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return out


def _batch():
  return problems.mlp_batch(seed=3, n=32)


def _sam_reference(config):
  """Three steps of SAM (per-shard float64 loop) feeding sgd(0.1, momentum=0.9)."""
  params, batch = problems.mlp_params(0), _batch()
  mode = {"per_device": "per_device", "sync": "sync", "group=2": "group=2"}[config]
  base = optax.sgd(0.1, momentum=0.9)
  state = base.init(params)
  for _ in range(STEPS):
    u = grouped_reference(params, batch, multihost_worker.RHO, _groups(mode))
    updates, state = base.update(unflatten(params, u), state, params)
    params = optax.apply_updates(params, updates)
  return flat(params)


@pytest.mark.parametrize("config", [c for c in multihost_worker.CONFIGS if c != "vasso"])
def test_two_processes_match_the_per_shard_reference(config, two_process_run):
  expected = _sam_reference(config)
  for i in range(2):
    got = np.load(two_process_run / f"params_{i}_{config}.npy")
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6, err_msg=f"process {i}")


def test_stateful_variant_across_processes_matches_the_per_shard_reference(two_process_run):
  """VaSSO: the parameters and the agreed state (the mean over the 8 members)."""
  params = problems.mlp_params(0)
  outs, states = stateful_reference(_VaSSO(), params, _batch(), _groups("per_device"), STEPS)
  w = flat(params)
  for u in outs:
    w = w - 0.2 * u
  for i in range(2):
    got = np.load(two_process_run / f"params_{i}_vasso.npy")
    np.testing.assert_allclose(got, w, rtol=2e-4, atol=1e-6, err_msg=f"process {i}")
    d = np.load(two_process_run / f"state_{i}_vasso.npy")
    np.testing.assert_allclose(d, states[-1]["d"], rtol=2e-4, atol=1e-6, err_msg=f"process {i}")
