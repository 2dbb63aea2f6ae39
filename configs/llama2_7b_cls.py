"""Llama-2-7B-CLS: the paper's recipe on Llama-2-7B (pretraining phase, then SFT).

Data (``docs/datasets.md``): the pretraining phase reads the labelled wiki dump, the SFT phase
the paper's 29,600-example mixture (LIMA without its safety items + Alpaca, ALERT prompts with
explained refusals), all from the user's local copies under ``data.manual_dir``.

  python -m safety_align.convert import_hf --hf_dir=Llama-2-7b-hf --out=ckpt/llama2_7b
  python -m safety_align.train --config=configs/llama2_7b_cls.py --workdir=runs/llama2_7b_cls \\
      --config.init_from=ckpt/llama2_7b --config.data.tokenizer=ckpt/llama2_7b/tokenizer.json \\
      --config.data.manual_dir=$HOME/safety_data

The paper: AdamW at lr 2e-5, weight decay 0.1, context 2048, effective batch 72, bf16 compute,
λ1 = 0.01 (pretrain), λ2 = 0.1 (SFT). The effective batch is ``batch_size * grad_accum`` =
8 x 9 (one 2048-token row per device per micro-step on 8 devices); on other device counts keep
the product at 72, e.g. ``--config.sft.batch_size=24 --config.sft.grad_accum=3``. Rows are
*packed*: a row holds several short SFT examples, so one step sees more examples than the
paper's 72. The paper gives no step counts: ours (below) are choices, not its values.
"""

import importlib.util
import os

import ml_collections


def _sibling(name):
  """The config module ``configs/<name>.py``, loaded by path (any working directory)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  if arg:
    raise ValueError(f"configs/llama2_7b_cls.py takes no variant, got {arg!r}; override fields "
                     "with --config.<field>=... instead.")
  base = _sibling("llama2_7b").get_config()
  c = ml_collections.ConfigDict()
  c.seed = 0
  # REQUIRED: the `convert import_hf` output of Llama-2-7b-hf (e.g. "ckpt/llama2_7b"); "" would
  # train from random weights.
  c.init_from = ""

  c.model = base.model           # Llama-2-7B, bf16 compute, f32 params, scanned, remat "dots"
  c.mesh = base.mesh             # FSDP over every device

  c.data = ml_collections.ConfigDict(dict(
      source="real",          # the user's local copies of the public datasets
      manual_dir="",          # REQUIRED: folder with alert/, lima/, alpaca/, wiki_labeled/
      data_dir="",            # TFDS data_dir of the prepared datasets ("" = WORKDIR/tfds)
      tokenizer="",           # REQUIRED: <init_from>/tokenizer.json
      chat_template="llama2",
      seq_len=2048,
      overlong="drop",        # SFT examples > seq_len: "drop" | "truncate_response" | "error"
      seed=0,                 # mixture sampling and batch order
      wiki_threshold=0.5,     # unsafe_score >= threshold -> malicious (wiki_labeled.jsonl)
      mixture=ml_collections.ConfigDict(dict(
          n_malicious=14_800,   # ALERT prompts with explained refusals
          n_benign=14_800,      # LIMA (all of it: n_lima=-1), then Alpaca
          n_lima=-1,
          lima_safety_filter=True,
      )),
  ))

  c.phases = "pretrain,sft"
  # Pretraining: ~2000 x 72 x 2048 = 295M tokens of the labelled dump (ours).
  c.pretrain = phase_config(steps=2000, cls_weight=0.01, split="wiki_labeled", warmup_steps=100)
  # SFT: the mixture is ~3M tokens (~100 per example), ~20 packed steps per pass; 3 passes (ours).
  c.sft = phase_config(steps=60, cls_weight=0.1, split="paper_mixture", warmup_steps=5)
  c.sft.window_augmentation = True   # window [CLS] rows over response spans (METHOD.md sec. 4)
  c.sft.window = 10

  # Both count micro-steps (grad_accum per optimiser step): every 50 and every optimiser step.
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=450, keep=2, async_save=True))
  c.log_every_steps = 9
  return c


def phase_config(*, steps, cls_weight, split, warmup_steps):
  """One phase with the paper's optimiser (fields as in configs/tiny.py)."""
  return ml_collections.ConfigDict(dict(
      split=split,
      steps=steps,                 # optimiser steps
      batch_size=8,                # rows per micro-step; x grad_accum = the paper's 72
      grad_accum=9,
      cls_weight=cls_weight,       # λ of L = L_lm + λ·L_cls
      lr=2e-5,
      schedule="step",             # the paper's step decay (x0.1 at 50% and 75%)
      warmup_steps=warmup_steps,
      end_lr_fraction=0.1,
      weight_decay=0.1,
      b1=0.9, b2=0.95,
      grad_clip=1.0,
  ))
