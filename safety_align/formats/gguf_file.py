"""llama.cpp GGUF files -> HF-named float tensors, an HF ``config.json`` dict and a tokenizer.

``importer.import_gguf`` writes what :class:`GGUFFile` reads through the writer ``import_hf``
uses. Everything is read with llama.cpp's own ``gguf`` package: the metadata and the tensor
headers first (memory-mapped; nothing is dequantized until ``tensors`` is iterated), then each
tensor through ``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the
K-quants and whatever else the installed ``gguf`` can dequantize).

What llama.cpp's ``convert_hf_to_gguf.py`` changed, undone here (``llama`` architecture: Llama,
Mistral, SmolLM, TinyLlama, ...):

* names: ``token_embd``, ``blk.{i}.attn_q``, ..., ``output_norm``, ``output`` -> HF's;
  no ``output.weight`` means tied embeddings;
* shapes: GGUF lists dims fastest first, so ``[ne0=in, ne1=out]`` reads as HF's ``[out, in]``;
* q/k rows: permuted per head from HF's half-split RoPE layout to llama.cpp's adjacent pairs
  (``permute``); :func:`unpermute` is its exact inverse.

The tokenizer is built from the metadata by ``gguf_tokenizer``; the chat template is
``tokenizer.chat_template`` (Jinja text).
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Iterator, Sequence

import gguf
import numpy as np
import tokenizers

from safety_align import console
from safety_align.formats import gguf_tokenizer

ARCHITECTURES = ("llama",)
# GGUF -> HF tensor names; "{i}" is the layer.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")

def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k ``permute``: [n_head * Dh, D] adjacent-pair rows -> HF's
  half-split rows (``n_head`` is the number of KV heads for k)."""
  return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def hf_name(name: str) -> str:
  """HF name of a GGUF tensor name; one without an HF counterpart is returned unchanged (the
  writer then reports it as a tensor the model has no place for)."""
  if name in GLOBAL_NAMES:
    return GLOBAL_NAMES[name]
  m = _LAYER.fullmatch(name)
  if m and m.group(2) in LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
  return name


def dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
  """A GGUF tensor as float32 in HF's shape (dims reversed: [out, in] for a matrix)."""
  try:
    x = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError as e:
    raise ValueError(
        f"Tensor {tensor.name} is {tensor.tensor_type.name}, which the installed gguf package "
        "cannot dequantize: re-quantize the file with llama.cpp's llama-quantize to a type it "
        "can (e.g. Q8_0, Q4_K_M, F16).") from e
  return np.asarray(x, np.float32).reshape([int(d) for d in reversed(tensor.shape)])


class GGUFFile:
  """One GGUF file as a :class:`~safety_align.formats.source.Source`: metadata, HF config,
  tokenizer and tensors, read on demand."""

  files: tuple[str, ...] = ()  # nothing to copy: the tokenizer is built from the metadata
  cls = None                   # a GGUF file carries no [CLS] parameters

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--gguf={path}: no such file.")
    try:
      self.reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError) as e:  # bad magic, truncated, duplicates
      raise ValueError(f"{path} is not a readable GGUF file ({e}): pass a llama.cpp .gguf "
                       "model file.") from e
    self.path = path
    self.meta = {name: field.contents() for name, field in self.reader.fields.items()}
    arch = self.meta.get("general.architecture")
    if arch not in ARCHITECTURES:
      raise ValueError(
          f"{path}: GGUF architecture {arch!r} is not supported; supported: "
          f"{list(ARCHITECTURES)} (Llama-family models that llama.cpp converts as 'llama').")
    self.arch = arch
    self._by_hf = {hf_name(t.name): t for t in self.reader.tensors}

  def _get(self, key: str, default: Any = None, *, required: bool = False) -> Any:
    value = self.meta.get(f"{self.arch}.{key}", default)
    if required and value is None:
      raise ValueError(f"{self.path}: metadata {self.arch}.{key} is missing; the file is "
                       "incomplete or not a model.")
    return value

  @functools.cached_property
  def shapes(self) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> HF shape."""
    return {name: tuple(int(d) for d in reversed(t.shape)) for name, t in self._by_hf.items()}

  @functools.cached_property
  def hf_config(self) -> dict:
    """transformers ``config.json`` of the model (LlamaConfig keys)."""
    if self._get("expert_count"):
      raise ValueError(f"{self.path}: a mixture-of-experts model ({self.arch}.expert_count="
                       f"{self._get('expert_count')}) is not supported.")
    scaling = self._get("rope.scaling.type")
    if scaling not in (None, "none"):
      raise ValueError(f"{self.path}: RoPE scaling {scaling!r} ({self.arch}.rope.scaling.type) "
                       "is not supported: the model implements plain RoPE only.")
    if "rope_freqs.weight" in self.shapes:
      raise ValueError(f"{self.path} has rope_freqs.weight, Llama-3.1-style RoPE scaling, which "
                       "the model does not implement (plain RoPE only).")
    d_model = int(self._get("embedding_length", required=True))
    n_heads = int(self._get("attention.head_count", required=True))
    head_dim = int(self._get("attention.key_length") or d_model // n_heads)
    value_dim = int(self._get("attention.value_length") or head_dim)
    if value_dim != head_dim:
      raise ValueError(f"{self.path}: key_length {head_dim} != value_length {value_dim} is not "
                       "supported.")
    if "model.embed_tokens.weight" not in self.shapes:
      raise ValueError(f"{self.path} has no token_embd.weight: not a complete model.")
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        vocab_size=self.shapes["model.embed_tokens.weight"][0], hidden_size=d_model,
        intermediate_size=int(self._get("feed_forward_length", required=True)),
        num_hidden_layers=int(self._get("block_count", required=True)),
        num_attention_heads=n_heads,
        num_key_value_heads=int(self._get("attention.head_count_kv") or n_heads),
        head_dim=head_dim, hidden_act="silu",
        rms_norm_eps=float(self._get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(self._get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(self._get("context_length", 4096)),
        tie_word_embeddings="lm_head.weight" not in self.shapes,
        attention_bias=False, mlp_bias=False,
        bos_token_id=self.meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=self.meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=self.meta.get("tokenizer.ggml.padding_token_id"))
    rope_dim = int(self._get("rope.dimension_count") or head_dim)
    if rope_dim != head_dim:  # model_config_from_hf rejects it
      cfg["partial_rotary_factor"] = rope_dim / head_dim
    return cfg

  def tensors(self, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 HF-layout array) of each of ``names``, q/k un-permuted."""
    cfg = self.hf_config
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for name in console.progress(names, desc="dequantize", unit="tensor"):
      x = dequantize(self._by_hf[name])
      proj = name.split(".")[-2]
      if proj in heads and name.startswith("model.layers."):
        x = unpermute(x, heads[proj])
      yield name, x

  @property
  def chat_template(self) -> str | None:
    return self.meta.get("tokenizer.chat_template") or None

  @property
  def special_ids(self) -> dict:
    """{bos_id, eos_ids, pad_id}: EOS first, then llama.cpp's other end-of-generation ids."""
    get = lambda k: self.meta.get(f"tokenizer.ggml.{k}_token_id")  # noqa: E731
    eos = []
    for i in (get("eos"), get("eot"), get("eom")):
      if i is not None and i not in eos:
        eos.append(int(i))
    return dict(bos_id=get("bos"), eos_ids=eos, pad_id=get("padding"))

  @property
  def tokenizer_config(self) -> dict:
    """The ``tokenizer_config.json`` entries besides the special-token strings."""
    add_bos, add_eos = gguf_tokenizer.add_special(self.meta)
    out = dict(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos,
               add_eos_token=add_eos, model_max_length=self.hf_config["max_position_embeddings"])
    if self.chat_template:
      out["chat_template"] = self.chat_template
    return out

  def tokenizer(self, vocab_size: int) -> tokenizers.Tokenizer:
    """The ``tokenizers`` tokenizer the metadata describes (``gguf_tokenizer.build``); raises
    if it has ids past ``vocab_size`` (the embedding rows)."""
    return gguf_tokenizer.build(self.meta, self.path, vocab_size, self.special_ids)
