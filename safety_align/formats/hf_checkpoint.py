"""A transformers checkpoint directory (``config.json``, ``*.safetensors``, ``tokenizer.json``)
as a :class:`~safety_align.formats.source.Source`: headers are read at construction, each
tensor when ``tensors`` reaches it (file by file)."""

from __future__ import annotations

import functools
import glob
import json
import os
from typing import Iterator, Sequence

from absl import logging
import numpy as np
from safetensors import safe_open
import tokenizers

from safety_align.formats.source import CLS_FILE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def _json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


class HFCheckpoint:
  """``hf_dir``'s config.json, tokenizer files, chat template and safetensors (headers only)."""

  def __init__(self, hf_dir: str):
    config = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config):
      raise FileNotFoundError(f"{config} not found: --hf_dir must be a transformers checkpoint "
                              "directory (config.json + *.safetensors + tokenizer.json).")
    self.path = hf_dir
    self.hf_config = _json(config)
    self.tokenizer_config = {}  # the directory's own tokenizer_config.json is copied instead
    files = sorted(f for f in glob.glob(os.path.join(hf_dir, "*.safetensors"))
                   if os.path.basename(f) != CLS_FILE)
    if not files:
      raise FileNotFoundError(
          f"No *.safetensors in {hf_dir}. Convert a .bin checkpoint first: "
          "`AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(DST)` writes safetensors.")
    self._index = {}  # HF tensor name -> (file, shape)
    for file in files:
      with safe_open(file, framework="numpy") as f:
        for name in f.keys():
          self._index[name] = (file, tuple(f.get_slice(name).get_shape()))
    self.shapes = {n: s for n, (_, s) in self._index.items()}
    self.files = tuple(n for n in TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, n)))
    self.cls = None
    if os.path.exists(os.path.join(hf_dir, CLS_FILE)):
      with safe_open(os.path.join(hf_dir, CLS_FILE), framework="numpy") as f:
        self.cls = {name: f.get_tensor(name) for name in f.keys()}

  def tensors(self, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array as stored) of each of ``names``, grouped by file."""
    by_file: dict[str, list[str]] = {}
    for name in names:
      by_file.setdefault(self._index[name][0], []).append(name)
    for file, group in by_file.items():
      logging.info("Reading %d tensors from %s", len(group), file)
      with safe_open(file, framework="numpy") as f:
        for name in group:
          yield name, f.get_tensor(name)

  @functools.cached_property
  def special_ids(self) -> dict:
    """{bos_id, eos_ids, pad_id}: config.json's, else generation_config.json's."""
    gen_file = os.path.join(self.path, "generation_config.json")
    gen = _json(gen_file) if os.path.exists(gen_file) else {}
    ids = {}
    for k in ("bos", "eos", "pad"):
      key = f"{k}_token_id"
      ids[k] = self.hf_config[key] if self.hf_config.get(key) is not None else gen.get(key)
    eos = ids["eos"]
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    return dict(bos_id=ids["bos"], eos_ids=eos, pad_id=ids["pad"])

  @functools.cached_property
  def chat_template(self) -> str | None:
    """The checkpoint's Jinja chat template: ``chat_template.jinja``, else
    tokenizer_config.json's "chat_template" (a string, or a list of {name, template}: the
    "default" one)."""
    jinja = os.path.join(self.path, "chat_template.jinja")
    if os.path.exists(jinja):
      with open(jinja) as f:
        return f.read()
    config = os.path.join(self.path, "tokenizer_config.json")
    if not os.path.exists(config):
      return None
    template = _json(config).get("chat_template")
    if isinstance(template, list):
      template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template or None

  def tokenizer(self, vocab_size: int) -> tokenizers.Tokenizer:
    """``tokenizer.json``; raises if it has ids past ``vocab_size`` (the embedding rows)."""
    path = os.path.join(self.path, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"{path} not found. Write one with transformers: "
          "`AutoTokenizer.from_pretrained(SRC).save_pretrained(SRC)` (a fast tokenizer).")
    tok = tokenizers.Tokenizer.from_file(path)
    n = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    if n > vocab_size:
      raise ValueError(
          f"{path} has token ids up to {n - 1} but config.json vocab_size={vocab_size}: the "
          "embedding has no rows for them. Use the tokenizer that belongs to this checkpoint.")
    return tok
