"""Multi-host JAX on one machine: 2 processes joined by jax.distributed over localhost train
with the loss of a single process holding all the devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parents[2]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(devices_per_process, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  return subprocess.Popen([sys.executable, str(WORKER), *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_match_one():
  single = _result(_run(4))
  port = _free_port()
  procs = [_run(2, "--num_processes=2", f"--process_id={i}",
                f"--coordinator=127.0.0.1:{port}") for i in range(2)]
  results = [_result(p) for p in procs]
  assert single["devices"] == 4 and all(r["devices"] == 4 for r in results)
  for r in results:
    np.testing.assert_allclose(r["losses"], single["losses"], rtol=1e-5)
