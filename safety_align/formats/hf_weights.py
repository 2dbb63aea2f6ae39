"""Declarative maps between Hugging Face checkpoints and our parameters (Llama-2/3, Mistral, Qwen2).

One table per family: each :class:`Rule` names an HF tensor (``{i}`` = layer index), our
parameter path (per-layer paths are relative to ``layer_{i}`` / the scanned ``layers``) and a
:class:`Transform` between the HF layout (``nn.Linear`` weights are [out, in]) and ours
(``DenseGeneral`` kernels are [in, *out]). RoPE needs no permutation: HF Llama applies
``rotate_half`` (half-split) to each head of the [out, in] projection, as ``model.rope`` does to
our [D, H, Dh] kernels, so q/k map by a transpose and a reshape.

``model_config_from_hf`` / ``hf_config_from_model`` translate ``config.json`` and reject what the
model cannot represent (scaled RoPE, biases other than Qwen2's q/k/v, non-SiLU MLPs) before any
tensor is read. ``flatten`` / ``slot`` address our side of an :class:`Entry` (the importer
writes through them, the exporter reads).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from absl import logging
import jax.numpy as jnp
import numpy as np

from safety_align.model import ModelConfig

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
  """HF <-> ours for one tensor: ``hf_shape(our)``, ``to_ours(x, our)``, ``to_hf(x)``."""

  name: str
  hf_shape: Callable[[Shape], Shape]
  to_ours: Callable[[np.ndarray, Shape], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


COPY = Transform("copy", lambda s: tuple(s), lambda x, s: x, lambda x: x)
# [out, in] <-> [in, out] (MLP, lm_head).
TRANSPOSE = Transform("transpose", lambda s: tuple(s[::-1]), lambda x, s: x.T, lambda x: x.T)
# q/k/v: HF [H*Dh, D] <-> ours [D, H, Dh].
HEADS_IN = Transform("heads_in", lambda s: (s[1] * s[2], s[0]),
                     lambda x, s: x.T.reshape(s), lambda x: x.reshape(x.shape[0], -1).T)
# o_proj: HF [D, H*Dh] <-> ours [H, Dh, D].
HEADS_OUT = Transform("heads_out", lambda s: (s[2], s[0] * s[1]),
                      lambda x, s: x.T.reshape(s), lambda x: x.reshape(-1, x.shape[-1]).T)
# q/k/v biases: HF [H*Dh] <-> ours [H, Dh].
HEADS_BIAS = Transform("heads_bias", lambda s: (s[0] * s[1],),
                       lambda x, s: x.reshape(s), lambda x: x.reshape(-1))


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str
  ours: str
  transform: Transform


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  architecture: str  # transformers class written into an exported config.json
  global_rules: tuple[Rule, ...]
  layer_rules: tuple[Rule, ...]
  qkv_bias: bool


_GLOBAL = (
    Rule("model.embed_tokens.weight", "embed", COPY),
    Rule("model.norm.weight", "final_norm/scale", COPY),
    Rule("lm_head.weight", "lm_head", TRANSPOSE),  # absent with tied embeddings
)
_LAYER = (
    Rule("model.layers.{i}.input_layernorm.weight", "attn_norm/scale", COPY),
    Rule("model.layers.{i}.self_attn.q_proj.weight", "attn/q_proj/kernel", HEADS_IN),
    Rule("model.layers.{i}.self_attn.k_proj.weight", "attn/k_proj/kernel", HEADS_IN),
    Rule("model.layers.{i}.self_attn.v_proj.weight", "attn/v_proj/kernel", HEADS_IN),
    Rule("model.layers.{i}.self_attn.o_proj.weight", "attn/o_proj/kernel", HEADS_OUT),
    Rule("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm/scale", COPY),
    Rule("model.layers.{i}.mlp.gate_proj.weight", "mlp/gate_proj/kernel", TRANSPOSE),
    Rule("model.layers.{i}.mlp.up_proj.weight", "mlp/up_proj/kernel", TRANSPOSE),
    Rule("model.layers.{i}.mlp.down_proj.weight", "mlp/down_proj/kernel", TRANSPOSE),
)
_QKV_BIAS = (
    Rule("model.layers.{i}.self_attn.q_proj.bias", "attn/q_proj/bias", HEADS_BIAS),
    Rule("model.layers.{i}.self_attn.k_proj.bias", "attn/k_proj/bias", HEADS_BIAS),
    Rule("model.layers.{i}.self_attn.v_proj.bias", "attn/v_proj/bias", HEADS_BIAS),
)

FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", _GLOBAL, _LAYER, qkv_bias=False),
    "mistral": Family("mistral", "MistralForCausalLM", _GLOBAL, _LAYER, qkv_bias=False),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", _GLOBAL, _LAYER + _QKV_BIAS, qkv_bias=True),
}
# HF tensors that carry no weights of their own (old checkpoints store RoPE tables).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Stored parameter dtypes an import or export may write (``--dtype``).
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16),
             "float16": np.dtype(np.float16)}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor <-> one slice of our params: ``path`` (non-scan layout) and ``layer``."""

  hf: str
  path: str      # e.g. "embed", "layer_3/attn/q_proj/kernel"
  sub: str       # path without the layer prefix
  layer: int | None
  transform: Transform

  def scan_path(self) -> str:
    return self.sub if self.layer is None else f"layers/{self.sub}"


def entries(family: Family, cfg: ModelConfig) -> list[Entry]:
  """Every HF tensor of ``family`` for ``cfg``, in checkpoint order."""
  out = [Entry(r.hf, r.ours, r.ours, None, r.transform) for r in family.global_rules
         if not (cfg.tie_embeddings and r.ours == "lm_head")]
  for i in range(cfg.n_layers):
    out += [Entry(r.hf.format(i=i), f"layer_{i}/{r.ours}", r.ours, i, r.transform)
            for r in family.layer_rules]
  return out


def infer_family(cfg: ModelConfig) -> str:
  """Family of a model trained from scratch (no recorded source): Qwen2 iff q/k/v biases."""
  return "qwen2" if cfg.qkv_bias else "llama"


def _rope(hf: dict) -> tuple[float, dict | None]:
  """(rope_theta, scaling) from a transformers 4.x (rope_theta/rope_scaling) or 5.x config."""
  params = hf.get("rope_parameters")
  if params is not None:
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), params
  return float(hf.get("rope_theta", 10000.0)), hf.get("rope_scaling")


def model_config_from_hf(hf: dict, *, dtype: str = "float32", param_dtype: str = "float32",
                         scan_layers: bool = True) -> tuple[str, ModelConfig]:
  """HF ``config.json`` dict -> (family name, ModelConfig). Raises on anything unsupported."""
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(
        f"Unsupported model_type {model_type!r} in config.json (architectures="
        f"{hf.get('architectures')}); supported: {sorted(FAMILIES)}.")
  family = FAMILIES[model_type]
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ValueError(f"config.json hidden_act={act!r}: only SiLU (SwiGLU) MLPs are supported.")
  if hf.get("mlp_bias"):
    raise ValueError("config.json mlp_bias=true: MLP biases are not supported.")
  if not family.qkv_bias and hf.get("attention_bias"):
    raise ValueError(
        f"config.json attention_bias=true: {model_type} attention biases (including o_proj) are "
        "not supported; only Qwen2-style q/k/v biases are.")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(
        f"config.json partial_rotary_factor={hf['partial_rotary_factor']}: only full-width "
        "RoPE is supported.")
  theta, scaling = _rope(hf)
  rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
  if rope_type != "default":
    raise ValueError(
        f"config.json RoPE scaling {rope_type!r} ({scaling}) is not supported: the model "
        "implements plain RoPE only (e.g. Llama-2, Llama-3-8B, Mistral-7B, Qwen2 without "
        "YaRN); Llama-3.1+ 'llama3' scaling would need model.rope changes.")
  window = hf.get("sliding_window")
  if window and (model_type == "mistral" or hf.get("use_sliding_window")):
    logging.warning(
        "config.json sliding_window=%d: the model attends to the full context, so outputs "
        "match the source model only for sequences of at most %d tokens.", window, window)
  d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = hf.get("head_dim") or d_model // n_heads
  cfg = ModelConfig(
      vocab_size=int(hf["vocab_size"]), d_model=d_model, n_layers=int(hf["num_hidden_layers"]),
      n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      d_ff=int(hf["intermediate_size"]),
      head_dim=0 if head_dim * n_heads == d_model else int(head_dim),
      rope_theta=theta, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=family.qkv_bias,
      dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
  return family.name, cfg


def hf_config_from_model(cfg: ModelConfig, family: str, base: dict | None = None) -> dict:
  """config.json for transformers: ``base`` (the imported source's, if any) with the
  architecture fields set from ``cfg``. Writes both the 4.x and 5.x RoPE keys."""
  fam = FAMILIES[family]
  out = dict(base or {})
  for stale in ("rope_scaling", "transformers_version", "torch_dtype", "_name_or_path"):
    out.pop(stale, None)
  out.update(
      architectures=[fam.architecture], model_type=family, vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.dim_per_head, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      tie_word_embeddings=cfg.tie_embeddings, dtype=cfg.param_dtype)
  out.setdefault("max_position_embeddings", 4096)
  if family != "qwen2":
    out.update(attention_bias=False, mlp_bias=False)
  return out


# --- our side: the flat parameter dict the tables index ------------------------------------------

def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """A nested parameter dict as ``{"a/b/c": leaf}``."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = value
  return out


def unflatten(flat: dict[str, Any]) -> dict:
  """Inverse of :func:`flatten`."""
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def slot(flat: dict[str, np.ndarray], e: Entry, scan_layers: bool) -> np.ndarray:
  """Our array for ``e``: the parameter, or (scanned layout) its layer's slice, as a view."""
  if not scan_layers:
    return flat[e.path]
  return flat[e.scan_path()] if e.layer is None else flat[e.scan_path()][e.layer]


def gate_slot(flat: dict[str, np.ndarray], layer: int, scan_layers: bool) -> np.ndarray:
  """Layer ``layer``'s text -> [CLS] attention gate [H] (a view)."""
  return (flat["layers/attn/cls_gate"][layer] if scan_layers
          else flat[f"layer_{layer}/attn/cls_gate"])
