"""llama.cpp GGUF files -> HF-named float tensors, an HF ``config.json`` dict and a tokenizer.

``convert.import_gguf`` writes what :class:`GGUFFile` reads through the writer ``import_hf``
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

Tokenizer (``tokenizer.json`` for ``tokenizers``): ``tokenizer.ggml.model == "gpt2"`` is a
byte-level BPE of ``tokenizer.ggml.tokens`` + ``.merges``, split first by the regexes llama.cpp
uses for ``tokenizer.ggml.pre``; ``"llama"`` is a SentencePiece BPE with byte fallback, merges
recovered from ``.scores`` (as transformers does). Control tokens become special added tokens,
user-defined ones plain added tokens; ``add_bos_token`` / ``add_eos_token`` become a
post-processor. The chat template is ``tokenizer.chat_template`` (Jinja text).
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Iterator, Sequence

from absl import logging
import gguf
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

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

# llama.cpp token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes by tokenizer.ggml.pre, applied in order as llama.cpp's
# llama-vocab.cpp does (each splits the pieces of the previous one, keeping all text).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_GROUPS = (
    (("gpt-2", "gpt2", "mpt", "olmo", "jais"), (_GPT2,)),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
     (r"\p{N}", _GPT2)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
     (_LLAMA3,)),
    (("qwen2", "stablelm2", "deepseek-r1-qwen"), (_QWEN2,)),
    # llama.cpp's fallback for a BPE vocabulary that names no pre-tokenizer.
    (("default",), (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
)
PRE_TOKENIZERS = {name: regexes for names, regexes in _PRE_GROUPS for name in names}
# llama.cpp takes a whole pre-token that is in the vocabulary before merging (Llama-3 style).
_IGNORE_MERGES = frozenset(_PRE_GROUPS[2][0])


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
  """One GGUF file: metadata, HF config, tokenizer and tensors, read on demand."""

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
    for k, name in enumerate(names):
      x = dequantize(self._by_hf[name])
      proj = name.split(".")[-2]
      if proj in heads and name.startswith("model.layers."):
        x = unpermute(x, heads[proj])
      if (k + 1) % max(len(names) // 10, 1) == 0 or k + 1 == len(names):
        logging.info("Dequantized %d/%d tensors of %s", k + 1, len(names), self.path)
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

  @functools.cached_property
  def _add_special(self) -> tuple[bool, bool]:
    """(add BOS, add EOS) when encoding, with llama.cpp's defaults for files that omit them."""
    model = self.meta.get("tokenizer.ggml.model")
    bos_default = model == "llama" or self.meta.get("tokenizer.ggml.pre") in _IGNORE_MERGES
    return (bool(self.meta.get("tokenizer.ggml.add_bos_token", bos_default)),
            bool(self.meta.get("tokenizer.ggml.add_eos_token", False)))

  @property
  def tokenizer_config(self) -> dict:
    """The ``tokenizer_config.json`` entries besides the special-token strings."""
    add_bos, add_eos = self._add_special
    out = dict(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos,
               add_eos_token=add_eos, model_max_length=self.hf_config["max_position_embeddings"])
    if self.chat_template:
      out["chat_template"] = self.chat_template
    return out

  def tokenizer(self, vocab_size: int) -> tokenizers.Tokenizer:
    """The ``tokenizers`` tokenizer the metadata describes; raises if it has ids past
    ``vocab_size`` (the embedding rows)."""
    tokens = self.meta.get("tokenizer.ggml.tokens")
    if not tokens:
      raise ValueError(f"{self.path} has no tokenizer.ggml.tokens: it carries no tokenizer.")
    if len(tokens) > vocab_size:
      raise ValueError(f"{self.path} has {len(tokens)} tokens but token_embd.weight only "
                       f"{vocab_size} rows: the file is inconsistent.")
    types = self.meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    kind = self.meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
      tok = self._byte_level(tokens)
    elif kind == "llama":
      tok = self._sentencepiece(tokens, types)
    else:
      raise ValueError(f"{self.path}: tokenizer.ggml.model={kind!r} is not supported; "
                       "supported: 'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE).")
    added = {i: tokenizers.AddedToken(t, special=ty == CONTROL, normalized=False)
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, USER_DEFINED)}
    tok.add_special_tokens([t for t in added.values() if t.special])
    tok.add_tokens([t for t in added.values() if not t.special])
    moved = [(t.content, i, tok.token_to_id(t.content)) for i, t in added.items()
             if tok.token_to_id(t.content) != i]
    if moved:
      raise ValueError(f"{self.path}: added tokens landed on other ids than the file's, e.g. "
                       f"{moved[:3]} (token, file id, id): duplicate token strings?")
    self._set_post_processor(tok, tokens)
    return tok

  def _byte_level(self, tokens: list[str]) -> tokenizers.Tokenizer:
    merges = self.meta.get("tokenizer.ggml.merges")
    if not merges:
      raise ValueError(f"{self.path}: a 'gpt2' tokenizer needs tokenizer.ggml.merges, which is "
                       "missing.")
    pre = self.meta.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
      raise ValueError(f"{self.path}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
                       f"{sorted(PRE_TOKENIZERS)}.")
    if pre == "default":
      logging.warning("%s names no pre-tokenizer (tokenizer.ggml.pre): splitting as llama.cpp "
                      "does then, which may not match the model's own tokenizer.", self.path)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(
        vocab, [tuple(m.split(" ", 1)) for m in merges], ignore_merges=pre in _IGNORE_MERGES))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated")
         for r in PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok

  def _sentencepiece(self, tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    scores = self.meta.get("tokenizer.ggml.scores")
    if not scores:
      raise ValueError(f"{self.path}: a 'llama' (SentencePiece) tokenizer needs "
                       "tokenizer.ggml.scores, which is missing.")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = self.meta.get("tokenizer.ggml.merges")
    if merges:
      merges = [tuple(m.split(" ", 1)) for m in merges]
    else:
      merges = _merges_from_scores(tokens, types, scores)
    unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True,
                                          byte_fallback=True))
    prefix = bool(self.meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok

  def _set_post_processor(self, tok: tokenizers.Tokenizer, tokens: list[str]) -> None:
    add_bos, add_eos = self._add_special
    ids = self.special_ids
    specials, single, pair = [], "$A:0", "$B:1"
    if add_bos and ids["bos_id"] is not None:
      bos = tokens[ids["bos_id"]]
      specials.append((bos, ids["bos_id"]))
      single, pair = f"{bos}:0 {single}", f"{bos}:1 {pair}"
    if add_eos and ids["eos_ids"]:
      eos = tokens[ids["eos_ids"][0]]
      specials.append((eos, ids["eos_ids"][0]))
      single, pair = f"{single} {eos}:0", f"{pair} {eos}:1"
    byte_level = self.meta.get("tokenizer.ggml.model") == "gpt2"
    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    if specials:
      steps.append(processors.TemplateProcessing(single=single, pair=f"{single} {pair}",
                                                 special_tokens=specials))
    if steps:
      tok.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float],
                        ) -> list[tuple[str, str]]:
  """SentencePiece BPE as ranked merges: every split of a normal piece into two normal pieces,
  best merged score first (the piece SentencePiece merges first); ties in transformers' order."""
  normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == NORMAL}
  merges = []
  for piece, i in normal.items():
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in normal and right in normal:
        merges.append((-scores[i], -len(left), -len(right), i, normal[left], normal[right]))
  merges.sort()
  return [(tokens[l], tokens[r]) for *_, l, r in merges]
