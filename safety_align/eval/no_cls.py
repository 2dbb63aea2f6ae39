"""The implicit-alignment baseline: the main run's SFT without [CLS] (``use_cls=False``), from
the main run's pretraining checkpoint, same tokenizer and data; trained on demand into
``WORKDIR/baseline_no_cls``."""

from __future__ import annotations

import os

import ml_collections

from safety_align import checkpoint
from safety_align import workdir as workdir_lib
from safety_align.eval.store import newest_step, require_checkpoint

BASELINE_DIR = "baseline_no_cls"


def baseline_config(workdir: str, steps: int = 0) -> ml_collections.ConfigDict:
  """The main run's config turned into the baseline (module doc); ``steps``: its SFT steps
  (0: as the main run's)."""
  c = ml_collections.ConfigDict(workdir_lib.read_config(workdir))
  wd = os.path.abspath(workdir)
  c.use_cls = False
  c.phases = "sft"
  c.init_from = wd
  c.init_phase = "pretrain"
  c.data.tokenizer = os.path.join(wd, workdir_lib.TOKENIZER_FILE)
  if c.data.source == "demo" and not c.data.data_dir:
    c.data.data_dir = os.path.join(wd, "tfds")
  if steps:
    c.sft.steps = steps
  return c


def baseline_done(baseline_dir: str, steps: int) -> bool:
  done = newest_step(baseline_dir, "sft")
  return done is not None and done >= steps


def check_baseline_trainable(workdir: str, cfg) -> None:
  """Fail early if the baseline would have to be trained and cannot be."""
  if cfg.baseline_workdir or not cfg.train_baseline:
    return
  if newest_step(workdir, "pretrain") is None and not baseline_done(
      os.path.join(workdir, BASELINE_DIR), 1):
    raise FileNotFoundError(
        f"train_baseline=True needs {workdir}'s pretraining checkpoint "
        f"({checkpoint.phase_dir(workdir, 'pretrain')}), which is missing: give "
        "baseline_workdir=<a model trained with use_cls=False> or set train_baseline=False.")


def resolve_baseline(workdir: str, cfg, log) -> str | None:
  """The baseline's workdir, training it if asked; None without a baseline."""
  if cfg.baseline_workdir:
    require_checkpoint(cfg.baseline_workdir, "baseline_workdir")
    return cfg.baseline_workdir
  if not cfg.train_baseline:
    return None
  out = os.path.join(workdir, BASELINE_DIR)
  config = baseline_config(workdir, cfg.baseline_steps)
  if not baseline_done(out, config.sft.steps):
    from safety_align import training_loop  # pylint: disable=g-import-not-at-top
    log(f"training the no-[CLS] baseline into {out} ({config.sft.steps} SFT steps from "
        f"{workdir}'s pretraining checkpoint)")
    training_loop.train(config, out)
  return out
