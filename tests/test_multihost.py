"""SAM across two processes joined by ``jax.distributed`` (CPU, gloo).

Two worker processes on 127.0.0.1, each with 4 CPU devices, form one
8-device mesh; their result must equal the same computation in this process
on its 8 local devices. The run is bounded in time and the workers are killed
if they hang.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from tests import multihost_worker

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["per_device", "sync"])
def test_two_processes_match_single_process(mode, tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  port = _free_port()
  procs = [
      subprocess.Popen(
          [sys.executable, "-m", "tests.multihost_worker", str(i), str(port), str(tmp_path), mode],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      )
      for i in range(2)
  ]
  logs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=TIMEOUT_S)
      logs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]

  expected = np.asarray(ravel_pytree(multihost_worker.run_steps(mode))[0])
  for i in range(2):
    got = np.load(tmp_path / f"params_{i}.npy")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
