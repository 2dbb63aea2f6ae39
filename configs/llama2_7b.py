"""Llama-2-7B (published architecture: 6.74B parameters), fine-tuned with the [CLS] branch.

Start from a converted checkpoint:

  python -m safety_align.convert import_hf --hf_dir=Llama-2-7b-hf --out=ckpt/llama2_7b
  python -m safety_align.tools.aot --config=configs/llama2_7b.py --devices=8 --hbm_gib=80

Compute in bfloat16 with float32 parameters (AdamW updates at lr 2e-5 are below bfloat16's
resolution of ~1e-2 relative), layers scanned, FSDP over all devices.
"""

import ml_collections


def get_config(arg=None):
  if arg:
    raise ValueError(f"configs/llama2_7b.py takes no variant, got {arg!r}; override fields "
                     "with --config.<field>=... instead.")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""  # the `convert import_hf` output folder

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
      head_dim=0, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, qkv_bias=False,
      dtype="bfloat16", param_dtype="float32", scan_layers=True, remat="dots",
      init_scale=0.02))

  # Parameters, gradients and optimiser state sharded over every device (FSDP).
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.data = ml_collections.ConfigDict(dict(
      source="jsonl",
      data_dir="",            # folder with the phase's jsonl files
      tokenizer="",           # the converted checkpoint's tokenizer.json
      chat_template="llama2",
      seq_len=2048,
      overlong="drop",        # SFT examples > seq_len: "drop" | "truncate_response" | "error"
      seed=0,
  ))

  c.phases = "pretrain,sft"
  c.pretrain = phase_config(steps=2000, batch_size=8, cls_weight=0.1, lr=2e-5, split="pretrain")
  c.sft = phase_config(steps=2000, batch_size=8, cls_weight=0.1, lr=2e-5, split="sft")
  c.sft.window_augmentation = True
  c.sft.window = 10

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=2, async_save=True))
  c.log_every_steps = 10
  return c


def phase_config(*, steps, batch_size, cls_weight, lr, split):
  """One training phase (fields as in configs/tiny.py)."""
  return ml_collections.ConfigDict(dict(
      split=split,
      steps=steps,
      batch_size=batch_size,
      cls_weight=cls_weight,
      lr=lr,
      schedule="cosine",
      warmup_steps=100,
      end_lr_fraction=0.1,
      weight_decay=0.1,
      b1=0.9, b2=0.95,
      grad_clip=1.0,
      grad_accum=9,                # batch_size rows per micro-step; effective batch 8 x 9 = 72
  ))
