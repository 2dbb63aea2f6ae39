"""Mistral-7B (published architecture: 7.24B parameters, GQA with 8 KV heads).

``rope_theta`` is 1e6 for v0.2 and later, 1e4 for v0.1 (``--config=configs/mistral_7b.py:v0.1``).
v0.1's 4096-token sliding window is not modelled: with seq_len 2048 attention is identical.
Everything but the architecture and the chat template is ``configs/llama2_7b.py``'s: compute
in bfloat16 with float32 parameters, layers scanned, FSDP over all devices.
"""

from safety_align.config_lib import check_variant, sibling_config

VARIANTS = ("v0.1",)


def get_config(arg=None):
  """``arg``: "v0.1" selects rope_theta 1e4; default (v0.2+) 1e6."""
  check_variant(__file__, arg, VARIANTS)
  c = sibling_config(__file__, "llama2_7b")
  c.model.update(n_kv_heads=8, d_ff=14336, rope_theta=10000.0 if arg == "v0.1" else 1e6)
  c.data.chat_template = "mistral"
  return c
