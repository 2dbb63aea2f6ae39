"""safety_align: explicit safety signals ([CLS] token + safety-gated decoding) in JAX/Flax.

The public API (../shared/API.md): ``load``, ``SafetyModel``, ``Generation``.
"""

import glob as _glob
import importlib.util as _importlib_util
import os as _os


def _keep_jax_off_an_absent_tpu() -> None:
  """With libtpu installed (the ``tpu`` extra: ``tools.aot --target=tpu:...`` compiles for a TPU
  slice on any machine) but no TPU attached, JAX would load the TPU plugin in every process,
  print its errors and hold its lock file. Then JAX gets the CPU (and a GPU where one is
  attached); an explicit ``JAX_PLATFORMS`` always wins."""
  if "JAX_PLATFORMS" in _os.environ or _importlib_util.find_spec("libtpu") is None:
    return
  if _glob.glob("/dev/accel*") or _glob.glob("/dev/vfio/[0-9]*"):  # a TPU VM's chips
    return
  _os.environ["JAX_PLATFORMS"] = "cuda,cpu" if _os.path.exists("/dev/nvidiactl") else "cpu"


_keep_jax_off_an_absent_tpu()
# TensorFlow (TFDS's backend) logs INFO lines from C++ at import, before any flag is read;
# its warnings and errors still show (console.py quiets the Python-side libraries).
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# TFDS only reads records with TensorFlow: its oneDNN notice (printed from C++ past the level
# above) is noise, and oneDNN's op rewrites buy nothing here.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from safety_align.api import Generation, SafetyModel, load  # noqa: E402  (after the platform)

__all__ = ["Generation", "SafetyModel", "load"]
