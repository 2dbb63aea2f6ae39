"""Mistral-7B-Instruct-CLS: the paper's SFT phase on Mistral-7B-Instruct (no pretraining phase).

The paper reports its utility next to the instruct model's (MT-Bench, GSM8K, MMLU). Data and
optimiser as in ``configs/llama2_7b_cls.py``; the SFT phase starts from the instruct weights and
uses the Mistral chat template.

  python -m safety_align.convert import_hf --hf_dir=Mistral-7B-Instruct-v0.2 \\
      --out=ckpt/mistral_7b_instruct
  python -m safety_align.train --config=configs/mistral_7b_instruct_cls.py \\
      --workdir=runs/mistral_7b_instruct_cls --config.init_from=ckpt/mistral_7b_instruct \\
      --config.data.tokenizer=ckpt/mistral_7b_instruct/tokenizer.json \\
      --config.data.manual_dir=$HOME/safety_data

``arg`` "v0.1" selects Mistral-7B-Instruct-v0.1's rope_theta 1e4 (default: v0.2+, 1e6), as in
``configs/mistral_7b.py``. Add the pretraining phase with ``--config.phases=pretrain,sft``.
"""

from safety_align.config_lib import check_variant, sibling_config


def get_config(arg=None):
  """``arg``: "v0.1" or "" (v0.2 and later)."""
  check_variant(__file__, arg, ("v0.1",))
  c = sibling_config(__file__, "llama2_7b_cls")
  # Mistral-7B, bf16 compute, f32 params, scanned, remat "dots"
  c.model = sibling_config(__file__, "mistral_7b", arg).model
  # REQUIRED: the `convert import_hf` output of Mistral-7B-Instruct (e.g.
  # "ckpt/mistral_7b_instruct"); "" would train from random weights.
  c.init_from = ""
  c.data.chat_template = "mistral"
  c.phases = "sft"
  return c
