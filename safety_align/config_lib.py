"""Helpers the ``configs/*.py`` files share (they are loaded by path, so they import this).

``phase_config`` builds one training phase; ``sibling_config`` loads another config file of
the same folder; ``check_variant`` rejects a ``get_config(arg)`` variant a file lacks;
``names``, ``floats`` and ``ints`` read the comma-separated list fields of the configs.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Sequence

import ml_collections


def phase_config(*, split: str, steps: int, batch_size: int, cls_weight: float, lr: float,
                 warmup_steps: int = 20, schedule: str = "cosine", grad_accum: int = 1,
                 window_cls_weight: float | None = None, **extra) -> ml_collections.ConfigDict:
  """One training phase (``config.pretrain`` / ``config.sft``) with AdamW (weight decay 0.1,
  b1 0.9, b2 0.95, gradient clip 1.0: the paper's) and a schedule ending at 10% of ``lr``.

  Args:
    split: the phase's dataset (the demo: the phase name; jsonl: ``<data_dir>/<split>.jsonl``;
      real: a dataset or mixture name of ``data/mixtures.py``).
    steps: optimiser steps.
    batch_size: packed rows of ``data.seq_len`` tokens per micro-step (global).
    cls_weight: λ of ``L = L_lm + λ·L_cls`` (METHOD.md: λ1 = 0.01 pretraining, λ2 = 0.1 SFT),
      on the mean over the segments' main [CLS] rows.
    window_cls_weight: λ_w on the mean over the window [CLS] rows (SFT window augmentation),
      a separate mean so λ keeps its meaning; default ``cls_weight``.
    lr: peak learning rate.
    warmup_steps: linear warmup steps (default: the demo's).
    schedule: "cosine" (warmup + cosine) | "step" (the paper's x0.1 at 50% and 75%) |
      "constant".
    grad_accum: micro-batches per optimiser step (each loss term a token mean over all of them).
    **extra: phase-specific fields, e.g. SFT's ``window_augmentation``, ``window``,
      ``replay``, ``recovery`` (``data/pipeline.py``), ``trainable``, ``cls_lr_scale``.
  """
  return ml_collections.ConfigDict(dict(
      split=split, steps=steps, batch_size=batch_size, cls_weight=cls_weight,
      window_cls_weight=cls_weight if window_cls_weight is None else window_cls_weight, lr=lr,
      schedule=schedule, warmup_steps=warmup_steps, end_lr_fraction=0.1, weight_decay=0.1,
      b1=0.9, b2=0.95, grad_clip=1.0, grad_accum=grad_accum, **extra))


def check_variant(config_file: str, arg: str | None, variants: Sequence[str] = ()) -> None:
  """Raise unless ``arg`` is empty or one of ``variants`` of ``config_file`` (its ``__file__``)."""
  if not arg or arg in variants:
    return
  name = f"configs/{os.path.basename(config_file)}"
  if not variants:
    raise ValueError(f"{name} takes no variant, got {arg!r}; override fields with "
                     "--config.<field>=... instead.")
  expected = " or ".join(repr(v) for v in ("", *variants))
  raise ValueError(f"{name}: unknown variant {arg!r}; expected {expected}.")


def sibling_config(config_file: str, name: str, arg: str | None = None
                   ) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of ``configs/<name>.py`` beside ``config_file`` (its ``__file__``),
  loaded by path so that it works from any working directory."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: the config file {config_file} builds on it.")
  spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def names(s: str) -> list[str]:
  """The items of a comma-separated list field, stripped, empty ones dropped."""
  return [x.strip() for x in str(s).split(",") if x.strip()]


def floats(s: str) -> list[float]:
  """``"0.1,0.5"`` or ``"start:stop:step"`` (stop included)."""
  s = str(s).strip()
  if ":" in s:
    start, stop, step = (float(x) for x in s.split(":"))
    n = int(math.floor((stop - start) / step + 1e-6)) + 1
    return [round(start + i * step, 6) for i in range(n)]
  return [float(x) for x in names(s)]


def ints(s: str) -> list[int]:
  return [int(x) for x in names(s)]
