"""Llama-2-7B-CLS: the paper's recipe on Llama-2-7B (pretraining phase, then SFT).

``configs/llama2_7b.py`` (architecture, mesh, the paper's optimiser) with the paper's data and
its step-decay schedule. Data (``docs/datasets.md``): the pretraining phase reads the labelled
wiki dump, the SFT phase the paper's 29,600-example mixture (LIMA without its safety items +
Alpaca, ALERT prompts with explained refusals), all from the user's local copies under
``data.manual_dir``.

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

import ml_collections

from safety_align.config_lib import check_variant, sibling_config


def get_config(arg=None):
  check_variant(__file__, arg)
  c = sibling_config(__file__, "llama2_7b")
  # REQUIRED: the `convert import_hf` output of Llama-2-7b-hf (e.g. "ckpt/llama2_7b"); "" would
  # train from random weights.
  c.init_from = ""

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

  # Pretraining: ~2000 x 72 x 2048 = 295M tokens of the labelled dump (ours).
  c.pretrain.update(split="wiki_labeled", schedule="step")
  # SFT: the mixture is ~3M tokens (~100 per example), ~20 packed steps per pass; 3 passes (ours).
  c.sft.update(split="paper_mixture", steps=60, warmup_steps=5, schedule="step")

  # Both count optimiser steps (each of grad_accum micro-batches).
  c.checkpoint.every_steps = 50
  c.log_every_steps = 1
  return c
