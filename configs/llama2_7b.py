"""Llama-2-7B (published architecture: 6.74B parameters), fine-tuned with the [CLS] branch.

The base of the 7B configs (``llama2_7b_cls.py``, ``mistral_7b.py`` build on it): the
architecture, FSDP over all devices, and the paper's optimiser (AdamW at lr 2e-5, effective
batch 8 x 9 = 72, λ1 = 0.01 pretraining, λ2 = 0.1 SFT). Data: the user's JSONL files.

  python -m safety_align.convert import_hf --hf_dir=Llama-2-7b-hf --out=ckpt/llama2_7b
  python -m safety_align.tools.aot --config=configs/llama2_7b.py --devices=8 --hbm_gib=80

Compute in bfloat16 with float32 parameters (AdamW updates at lr 2e-5 are below bfloat16's
resolution of ~1e-2 relative), layers scanned.
"""

import ml_collections

from safety_align.config_lib import check_variant, phase_config


def get_config(arg=None):
  check_variant(__file__, arg)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""  # the `convert import_hf` output folder

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
      head_dim=0, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, qkv_bias=False,
      dtype="bfloat16", param_dtype="float32", scan_layers=True, remat="dots",
      init_scale=0.02,
      attention="blockwise"))  # never holds [T, T] scores; "flash" on GPU (attention.py)

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
  # 8 rows per micro-step x 9 micro-steps: the paper's effective batch of 72.
  paper = dict(batch_size=8, grad_accum=9, lr=2e-5, warmup_steps=100)
  c.pretrain = phase_config(split="pretrain", steps=2000, cls_weight=0.01, **paper)
  c.sft = phase_config(split="sft", steps=2000, cls_weight=0.1, **paper,
                       window_augmentation=True,  # window [CLS] rows (METHOD.md sec. 4)
                       window=10)                 # r2: tokens per window row

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=2, async_save=True))
  c.log_every_steps = 10
  return c
