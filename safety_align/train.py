"""``python -m safety_align.train --config=configs/tiny.py --workdir=DIR [--config.x.y=v]``.

Trains the phases of ``config.phases`` in order, resuming from the newest intact checkpoint in
DIR. A config, data or checkpoint problem ends with one sentence (exit status 1), SIGTERM and
Ctrl-C save and stop with one line (status 0 and 130).
"""

from __future__ import annotations

import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from safety_align import checkpoint, console, training_loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and data go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host TPU/GPU).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0 (only where it can't be auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's rank.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "Persistent XLA compilation cache directory ('' = off).")
# Errors that are the user's to fix: printed as their sentence, not a traceback.
_USER_ERRORS = (ValueError, OSError, checkpoint.NonFiniteError)
_OVERRIDE = re.compile(r"^--?config\.([^=]+)")


def _parse_flags(argv):
  """absl's flag parsing, with an unknown ``--config.<field>`` or a config file's own error
  (e.g. an unknown variant) as one sentence, not ml_collections' traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    root = e
    while root.__cause__ is not None or root.__context__ is not None:
      root = root.__cause__ or root.__context__
    sys.exit(f"train: {root if 'Error whilst parsing config file' in str(e) else e}")
  except (AttributeError, KeyError):
    spec = next((a.split("=", 1)[1] for a in argv if re.match(r"^--?config=", a)), None)
    if spec is None:
      raise
    config = flags.FLAGS["config"].parser.parse(spec)
    problems = [p for p in (training_loop.unknown_key(config, m.group(1))
                            for m in map(_OVERRIDE.match, argv) if m) if p]
    if not problems:
      raise
    sys.exit(f"train: {problems[0]}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required.")
  console.configure()
  if _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value or None,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  if _COMPILATION_CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
  training_loop.progress(f"JAX devices: {jax.devices()} (process {jax.process_index()} of "
                         f"{jax.process_count()})")
  try:
    training_loop.train(_CONFIG.value, _WORKDIR.value,
                        stated=config_flags.get_override_values(flags.FLAGS["config"]))
  except training_loop.Interrupted as e:
    print(f"train: {e}", file=sys.stderr)
    sys.exit(130)
  except KeyboardInterrupt:  # before the loop: nothing of this run was saved
    print("train: interrupted before training started; rerun the same command to resume "
          "from the newest checkpoint.", file=sys.stderr)
    sys.exit(130)
  except _USER_ERRORS as e:
    logging.vlog(1, "train failed", exc_info=True)  # the traceback, with --verbosity=1
    sys.exit(f"train: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
