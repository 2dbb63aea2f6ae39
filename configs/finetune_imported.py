"""The paper's SFT phase on any `convert import_hf` output: ``--config=configs/finetune_imported.py:DIR``.

The model block, tokenizer and chat template come from DIR (so a tiny random HF model and
Mistral-7B-Instruct use the same file); the optimiser is the paper's (AdamW, lr 2e-5, weight
decay 0.1, λ2 = 0.1) with the window augmentation on. Data: the user's JSONL chat records
``{"prompt", "response", "label"}`` in ``--config.data.data_dir`` (file ``sft.jsonl``), or
``--config.data.source=real --config.sft.split=paper_mixture --config.data.manual_dir=...``.

  python -m safety_align.convert import_hf --hf_dir=Mistral-7B-Instruct-v0.2 --out=ckpt/m7b
  python -m safety_align.train --config=configs/finetune_imported.py:ckpt/m7b \\
      --workdir=runs/m7b_cls --config.data.data_dir=my_data
"""

import json
import os

import ml_collections

from safety_align.config_lib import phase_config


def get_config(arg=None):
  """``arg``: the import directory (required)."""
  if not arg:
    raise ValueError("configs/finetune_imported.py needs the import directory: "
                     "--config=configs/finetune_imported.py:DIR (a `convert import_hf` output).")
  path = os.path.join(arg, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run `python -m safety_align.convert import_hf "
                            f"--hf_dir=... --out={arg}` first.")
  with open(path) as f:
    imported = json.load(f)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = arg
  c.init_phase = "import"
  # "": [CLS] starts as the import's embedding (the importer's content-free mean); a token
  # (e.g. the template's end of turn) starts it as that token's embedding row.
  c.init_cls_embed = ""
  c.use_cls = True
  # The context the source supports (RoPE; its max_position_embeddings): what sa.load serves,
  # however short the training rows (data.seq_len). 0: unknown (seq_len is served).
  c.context_length = int(imported.get("hf_config", {}).get("max_position_embeddings") or 0)
  c.model = ml_collections.ConfigDict(imported["model"])
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.data = ml_collections.ConfigDict(dict(
      source="jsonl", data_dir="", manual_dir="", tokenizer=os.path.join(arg, "tokenizer.json"),
      chat_template=imported.get("chat_template", "llama2"), seq_len=2048, seed=0,
      overlong="drop",  # SFT examples > seq_len: "drop" | "truncate_response" | "error"
      # Long rows (data/pipeline.long_rows): SFT examples longer than seq_len, up to
      # long_seq_len, train in rows of that length on a long_share of the steps (0: off).
      long_seq_len=0, long_share=0.0,
      wiki_threshold=0.5,
      mixture=ml_collections.ConfigDict(dict(n_malicious=14800, n_benign=14800, n_lima=-1,
                                             lima_safety_filter=True))))
  c.phases = "sft"
  c.sft = phase_config(
      split="sft", steps=1000, batch_size=8, grad_accum=9, cls_weight=0.1, lr=2e-5,
      warmup_steps=50, window_augmentation=True, window=10,
      trainable="",        # regex over parameter paths to train ("" = all); the rest frozen
      cls_lr_scale=1.0)    # learning-rate multiplier of the new [CLS] parameters
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, keep=2, async_save=True))
  c.log_every_steps = 10
  return c
