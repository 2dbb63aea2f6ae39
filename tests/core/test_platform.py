"""With the tpu extra installed and no TPU attached, importing safety_align keeps JAX off the TPU
plugin."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

PROBE = "import os, safety_align, jax; print(os.environ['JAX_PLATFORMS'], jax.default_backend())"


def _run(env):
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  return out.stdout.split(), out.stderr


@pytest.mark.skipif(glob.glob("/dev/accel*") or os.path.exists("/dev/nvidiactl"),
                    reason="an accelerator is attached here")
def test_cpu_when_libtpu_is_installed_without_a_tpu():
  assert importlib.util.find_spec("libtpu") is not None, "make test installs the tpu extra"
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  (platforms, backend), stderr = _run(env)
  assert (platforms, backend) == ("cpu", "cpu")
  assert "libtpu" not in stderr.lower() and "tpu" not in stderr.lower(), stderr[-2000:]

