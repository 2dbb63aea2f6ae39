"""``ModelConfig``: the architecture of the decoder (sizes, RoPE, dtypes, layer scanning and
rematerialisation, the [CLS] attention gate, the training attention implementation), validated
from an ml_collections ``model`` block. ``model.py`` builds the network from it."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections

from safety_align import attention as attention_lib

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
_ATTENTION = ("dense",) + attention_lib.IMPLEMENTATIONS


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the decoder. ``from_config`` validates an ml_collections ``model`` block."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  head_dim: int = 0  # 0: d_model // n_heads
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2-style attention biases
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  init_scale: float = 0.02
  # Text -> [CLS] attention through a learned per-head gate, zero at import (``Attention``):
  # an imported model then generates exactly as its source until training opens the gate.
  cls_attention_gate: bool = False
  # How training forwards compute the [CLS] masks (``attention.py``): "dense" builds the
  # [B, T, T] mask; "blockwise" (pure JAX) and "flash" (fused GPU kernel) never hold [T, T].
  # Decoding always runs dense (its query rows are one or two). Parameters are the same.
  attention: str = "dense"

  def __post_init__(self):
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
      if getattr(self, field) <= 0:
        raise ValueError(f"model.{field} must be positive, got {getattr(self, field)}.")
    if not self.head_dim and self.d_model % self.n_heads:
      raise ValueError(
          f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
          "change one of them or set model.head_dim explicitly.")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}.")
    for field in ("dtype", "param_dtype"):
      if getattr(self, field) not in _DTYPES:
        raise ValueError(f"model.{field}={getattr(self, field)!r}: expected one of {list(_DTYPES)}.")
    if self.remat not in _REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r}: expected one of {_REMAT_POLICIES}.")
    if self.attention not in _ATTENTION:
      raise ValueError(f"model.attention={self.attention!r}: expected one of {_ATTENTION}.")

  def architecture(self) -> dict[str, Any]:
    """The fields that fix the parameter tree (not dtypes, remat, init or attention)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in ("dtype", "param_dtype", "remat", "init_scale", "attention")}

  @property
  def cls_id(self) -> int:
    """Token id of [CLS]: one past the text vocabulary."""
    return self.vocab_size

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict | dict) -> "ModelConfig":
    values = dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"Unknown model config field(s) {unknown}; known fields: {sorted(known)}.")
    return cls(**values)
