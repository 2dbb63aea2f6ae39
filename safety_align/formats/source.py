"""The reader interface every importable format implements (HF directory, GGUF file)."""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import numpy as np
import tokenizers

CLS_FILE = "safety_align_cls.safetensors"  # [CLS] parameters beside an exported checkpoint


class Source(Protocol):
  """A checkpoint to import: HF-named tensors and what describes them. Only headers and
  metadata are read up front; tensors when ``tensors`` is iterated."""

  path: str                                 # the file or directory it comes from
  hf_config: dict                           # transformers config.json keys
  shapes: dict[str, tuple[int, ...]]        # HF tensor name -> HF shape
  special_ids: dict                         # {bos_id, eos_ids (list), pad_id}
  chat_template: str | None                 # the source's own Jinja template
  files: tuple[str, ...]                    # files copied into the output beside tokenizer.json
  tokenizer_config: dict                    # tokenizer_config.json entries, when none is copied
  cls: dict[str, np.ndarray] | None         # CLS_FILE's tensors, restored instead of the init

  def tensors(self, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, HF-layout array) of each of ``names``."""

  def tokenizer(self, vocab_size: int) -> tokenizers.Tokenizer:
    """The source's tokenizer; raises if it has ids past ``vocab_size`` (the embedding rows)."""
