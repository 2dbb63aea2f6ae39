"""Any :class:`~safety_align.formats.source.Source` -> a directory ``sa.load`` and ``train``
read.

The writer checks the source against ``hf_weights``' tables (every name and shape before any
tensor is read), streams the tensors in and writes ``out``, which must be new or empty and
never the source or inside it:

  config.json     {"format", "family", "model" (ModelConfig), "chat_template",
                   "special_tokens", "hf_config" (the source's, for export)}
  tokenizer.json  (+ tokenizer_config.json, which holds the BOS/EOS/PAD strings; from an HF
                  checkpoint also special_tokens_map.json, generation_config.json, and
                  chat_template.jinja, copied)
  checkpoints/import/0/   the (unboxed) parameters, through ``checkpoint.py`` -- the same
                  layout as a training workdir, so ``sa.load`` and ``train`` read both

``"chat_template"`` is the source's own Jinja template text, else -- with a warning -- the
family's built-in template name (llama2/llama3/mistral/chatml); ``chat_template=`` overrides.

The new ``[CLS]`` parameters: ``cls_embed`` is the mean of the text embedding rows rescaled to
their mean L2 norm -- a content-free input of typical magnitude, unlike BOS, whose embedding
is an attention sink in Llama-family models and would pull text attention onto ``[CLS]``;
``cls_head`` has a zero bias and an N(0, (0.1/sqrt(D))^2) kernel, so initial logits are
~0.1 x the hidden RMS and P(malicious) starts near 0.5. Imports use the text -> [CLS] attention
gate (``model.cls_attention_gate``), zero-initialised, so the imported model generates exactly
as its source until training opens it. A source carrying ``cls`` tensors (an ``export_hf``
output) has those values restored instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import numpy as np
import tokenizers

from safety_align import checkpoint
from safety_align import model as model_lib
from safety_align import workdir
from safety_align.formats import hf_weights
from safety_align.formats.gguf_file import GGUFFile
from safety_align.formats.hf_checkpoint import HFCheckpoint
from safety_align.formats.source import Source
from safety_align.model import ModelConfig

FORMAT = "safety_align.convert/1"


def abstract_params(cfg: ModelConfig) -> Any:
  """Unboxed ShapeDtypeStruct tree of ``cfg``'s parameters (nothing allocated)."""
  return nn.meta.unbox(jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0))))


def _check_out(out: str, source: str) -> None:
  """Refuse an ``out`` that is ``source`` or inside it, or that holds anything already."""
  real_out, real_src = os.path.realpath(out), os.path.realpath(source)
  if real_out == real_src or real_out.startswith(real_src.rstrip(os.sep) + os.sep):
    raise ValueError(f"--out={out} is the source {source} or inside it; imports never write "
                     "into their input: pass a new directory.")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"--out={out} exists and is not an empty directory; pass a new "
                          "directory.")


def _chat_template_name(family: str, tok: tokenizers.Tokenizer) -> str:
  if family == "qwen2":
    return "chatml"
  if family == "mistral":
    return "mistral"
  return "llama3" if tok.token_to_id("<|start_header_id|>") is not None else "llama2"


def _special_tokens(ids: dict, tok: tokenizers.Tokenizer, cls_id: int) -> dict:
  """{bos_id, eos_ids, pad_id, bos_token, eos_tokens, pad_token, cls_id}."""
  def name(i):
    return None if i is None else tok.id_to_token(i)

  return dict(bos_id=ids["bos_id"], eos_ids=list(ids["eos_ids"]), pad_id=ids["pad_id"],
              bos_token=name(ids["bos_id"]), eos_tokens=[name(i) for i in ids["eos_ids"]],
              pad_token=name(ids["pad_id"]), cls_id=cls_id)


def _init_cls(embed: np.ndarray, n_text: int, dtype: np.dtype, seed: int,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(cls_embed [D], cls_head kernel [D, 2], bias [2]) by the rule in the module docstring."""
  rows = embed[:n_text].astype(np.float32)
  mean = rows.mean(axis=0)
  scale = np.linalg.norm(rows, axis=-1).mean() / max(np.linalg.norm(mean), 1e-12)
  d_model = embed.shape[1]
  kernel = np.random.default_rng(seed).normal(0.0, 0.1 / math.sqrt(d_model), (d_model, 2))
  return (mean * scale).astype(dtype), kernel.astype(dtype), np.zeros(2, dtype)


def _check_tensors(source: Source, family: str, table: list[hf_weights.Entry],
                   flat: dict[str, np.ndarray], cfg: ModelConfig) -> None:
  """Raise naming the first problem with ``source``'s tensor names and shapes (none read)."""
  missing = [e.hf for e in table if e.hf not in source.shapes]
  if missing:
    raise ValueError(
        f"{len(missing)} tensor(s) missing from {source.path}, e.g. {missing[:5]}: is every "
        "shard of the checkpoint present, and does its config match it?")
  known = {e.hf for e in table} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
  unexpected = [n for n in source.shapes if n not in known
                and not n.endswith(hf_weights.IGNORED_SUFFIXES)]
  if unexpected:
    raise ValueError(
        f"{len(unexpected)} tensor(s) in {source.path} that a {family} model with this config "
        f"has no place for, e.g. {unexpected[:5]}: unsupported architecture variant.")
  for e in table:
    our = hf_weights.slot(flat, e, cfg.scan_layers).shape
    want, got = e.transform.hf_shape(our), source.shapes[e.hf]
    if tuple(got) != tuple(want):
      raise ValueError(f"Tensor {e.hf} has shape {tuple(got)}, but config.json implies "
                       f"{tuple(want)} (our {e.path} is {tuple(our)}).")


def _write_tokenizer(source: Source, out: str, tok: tokenizers.Tokenizer,
                     special: dict) -> None:
  """tokenizer.json and tokenizer_config.json: the source's files, else written."""
  for name in source.files:
    shutil.copy(os.path.join(source.path, name), os.path.join(out, name))
  if "tokenizer.json" not in source.files:
    tok.save(os.path.join(out, "tokenizer.json"))
  if "tokenizer_config.json" not in source.files:
    # Tokenizer.load reads the special-token strings from here, as from an HF checkpoint.
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
      json.dump(dict(source.tokenizer_config, bos_token=special["bos_token"],
                     eos_token=(special["eos_tokens"] or [None])[0],
                     pad_token=special["pad_token"]), f, indent=2)


def write(source: Source, out: str, *, scan_layers: bool, dtype: str, compute_dtype: str,
          chat_template: str, seed: int) -> ModelConfig:
  """Check ``source`` against the model it describes, then write the directory ``out``."""
  if dtype not in hf_weights.NP_DTYPES:
    raise ValueError(f"--dtype={dtype!r}: expected one of {list(hf_weights.NP_DTYPES)}.")
  family, cfg = hf_weights.model_config_from_hf(
      source.hf_config, dtype=compute_dtype or dtype, param_dtype=dtype, scan_layers=scan_layers)
  cfg = dataclasses.replace(cfg, cls_attention_gate=True)
  tok = source.tokenizer(cfg.vocab_size)

  # Check every name and shape before reading any tensor (np.empty touches no memory).
  np_dtype = hf_weights.NP_DTYPES[dtype]
  flat = {path: np.empty(s.shape, np_dtype)
          for path, s in hf_weights.flatten(abstract_params(cfg)).items()}
  table = hf_weights.entries(hf_weights.FAMILIES[family], cfg)
  _check_tensors(source, family, table, flat, cfg)

  # Stream tensors into the preallocated output.
  by_name = {e.hf: e for e in table}
  for name, x in source.tensors([e.hf for e in table]):
    e = by_name[name]
    target = hf_weights.slot(flat, e, scan_layers)
    target[...] = e.transform.to_ours(x, target.shape).astype(np_dtype)
  if source.cls is not None:
    flat["cls_embed"][...] = source.cls["cls_embed"]
    flat["cls_head/kernel"][...] = source.cls["cls_head.kernel"]
    flat["cls_head/bias"][...] = source.cls["cls_head.bias"]
  else:
    n_text = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    flat["cls_embed"], flat["cls_head/kernel"], flat["cls_head/bias"] = _init_cls(
        flat["embed"], n_text, np_dtype, seed)
  gates = (source.cls or {}).get("cls_gate")  # [L, H]; older exports have none: closed
  for i in range(cfg.n_layers):
    hf_weights.gate_slot(flat, i, scan_layers)[...] = 0.0 if gates is None else gates[i]

  template = chat_template or source.chat_template
  if not template:
    template = _chat_template_name(family, tok)
    logging.warning("%s has no chat template of its own; using the built-in %r (pass "
                    "--chat_template to choose another).", source.path, template)
  special = _special_tokens(source.special_ids, tok, cfg.cls_id)
  os.makedirs(out, exist_ok=True)
  _write_tokenizer(source, out, tok, special)
  meta = dict(format=FORMAT, family=family, model=dataclasses.asdict(cfg),
              chat_template=template, special_tokens=special,
              hf_config=source.hf_config, source=os.path.abspath(source.path))
  checkpoint.save_params(out, "import", hf_weights.unflatten(flat),
                         dict(step=0, phase="import", model=meta["model"]))
  with open(os.path.join(out, workdir.CONFIG_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  logging.vlog(1, "Wrote %s (%s, %d layers, %s params)", out, family, cfg.n_layers, dtype)
  return cfg


def import_hf(hf_dir: str, out: str, *, scan_layers: bool = True, dtype: str = "float32",
              compute_dtype: str = "", chat_template: str = "", seed: int = 0) -> ModelConfig:
  """Convert the HF checkpoint in ``hf_dir`` into a safety_align directory ``out``.

  ``dtype`` is the stored parameter dtype, ``compute_dtype`` the model's compute dtype
  ("" = ``dtype``); ``chat_template`` "" keeps the checkpoint's own Jinja template, or picks
  the family's built-in one (llama2/llama3/mistral/chatml) when it has none.
  """
  _check_out(out, hf_dir)
  return write(HFCheckpoint(hf_dir), out, scan_layers=scan_layers, dtype=dtype,
               compute_dtype=compute_dtype, chat_template=chat_template, seed=seed)


def import_gguf(gguf_file: str, out: str, *, scan_layers: bool = True, dtype: str = "float32",
                compute_dtype: str = "", chat_template: str = "", seed: int = 0) -> ModelConfig:
  """Convert the llama.cpp GGUF file ``gguf_file`` (dequantized) into a directory ``out`` like
  ``import_hf``'s; the arguments are ``import_hf``'s."""
  _check_out(out, gguf_file)
  return write(GGUFFile(gguf_file), out, scan_layers=scan_layers, dtype=dtype,
               compute_dtype=compute_dtype, chat_template=chat_template, seed=seed)
