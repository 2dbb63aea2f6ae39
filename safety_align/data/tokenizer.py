"""A thin wrapper over a HuggingFace ``tokenizers`` ``tokenizer.json``, and the demo BPE.

The same file format real checkpoints ship (Llama-2, Mistral, Qwen2), so the demo and a
converted checkpoint go through one code path. The ``[CLS]`` id is ``model vocab_size``: it is
outside the tokenizer, never produced by ``encode`` and dropped by ``decode``. ``encode`` reads
special-token strings as text (a user's ``</s>`` is not EOS); only chat-template text is
encoded with ``parse_special=True``.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

BASE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 of the demo BPE
_DEMO_TOKENS = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
_CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
  """Text <-> token ids, with the BOS / EOS / PAD ids looked up by their token strings.

  ``bos_token`` may be ``None`` (Qwen2 has no BOS: ``bos_id`` is then ``None``);
  ``pad_token`` may be ``None`` (Llama-2 has none: ``pad_id`` is then ``eos_id``).
  """

  def __init__(self, hf: tokenizers.Tokenizer, *, bos_token: str | None = "<s>",
               eos_token: str = "</s>", pad_token: str | None = "<pad>"):
    self.hf = hf
    self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._lookup(bos_token, "bos_token")
    self.eos_id = self._lookup(eos_token, "eos_token")
    if self.eos_id is None:
      raise ValueError("A tokenizer needs an end-of-sequence token: pass eos_token=...")
    pad_id = self._lookup(pad_token, "pad_token")
    self.pad_id = self.eos_id if pad_id is None else pad_id

  def _lookup(self, token: str | None, name: str) -> int | None:
    if token is None:
      return None
    idx = self.hf.token_to_id(token)
    if idx is None:
      raise ValueError(f"{name}={token!r} is not in the tokenizer's vocabulary: pass the "
                       f"token string this tokenizer uses, or {name}=None if it has none.")
    return idx

  @classmethod
  def load(cls, path: str, **tokens) -> "Tokenizer":
    """Load ``path`` (a ``tokenizer.json``).

    The special-token strings come from ``tokens`` (``bos_token``, ``eos_token``,
    ``pad_token``), else from a ``tokenizer_config.json`` beside the file (as HF checkpoints
    ship), else the demo's ``<s>``, ``</s>``, ``<pad>``.
    """
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"No tokenizer file at {path}: point config.data.tokenizer at a tokenizer.json "
          "(HF format), or leave it empty to train the demo BPE.")
    return cls(tokenizers.Tokenizer.from_file(path), **{**_config_tokens(path), **tokens})

  def save(self, path: str) -> None:
    """Write ``path`` atomically (hosts that train the same demo BPE may race)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    self.hf.save(tmp)
    os.replace(tmp, path)

  def save_special_tokens(self, path: str) -> None:
    """Write the BOS / EOS / PAD strings as a ``tokenizer_config.json`` that ``load`` reads."""
    name = lambda i: None if i is None else self.hf.id_to_token(i)  # noqa: E731
    pad = None if self.pad_id == self.eos_id else name(self.pad_id)
    with open(path, "w") as f:
      json.dump(dict(bos_token=name(self.bos_id), eos_token=name(self.eos_id), pad_token=pad),
                f, indent=2)

  def encode(self, text: str, *, parse_special: bool = False) -> list[int]:
    """Token ids of ``text``; no BOS / EOS added. Special-token strings in ``text`` (a user's
    ``</s>`` or ``<|im_start|>``) are ordinary text unless ``parse_special`` (template text
    only: special tokens come from the chat template, never from users or data)."""
    hf = self.hf if parse_special else self.text_hf
    return hf.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """``encode`` of many texts at once (parallel in Rust)."""
    return [e.ids for e in self.text_hf.encode_batch(list(texts), add_special_tokens=False)]

  @functools.cached_property
  def text_hf(self) -> tokenizers.Tokenizer:
    """A copy of ``hf`` that reads special-token strings as text (``encode_special_tokens``)."""
    hf = tokenizers.Tokenizer.from_str(self.hf.to_str())
    hf.encode_special_tokens = True
    return hf

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of ``ids``. Ids outside the vocabulary (e.g. ``[CLS]``) are dropped; bytes that
    are not valid UTF-8 (a cut multi-byte character) become U+FFFD."""
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)


def _config_tokens(path: str) -> dict:
  """Special-token strings from ``tokenizer_config.json`` beside ``path``, or the demo's."""
  config_path = os.path.join(os.path.dirname(os.path.abspath(path)), _CONFIG_FILE)
  if not os.path.isfile(config_path):
    return dict(_DEMO_TOKENS)
  with open(config_path) as f:
    config = json.load(f)

  def content(key):
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value

  return dict(bos_token=content("bos_token"), eos_token=content("eos_token"),
              pad_token=content("pad_token"))


def train_bpe(texts: Iterable[str], vocab_size: int, path: str,
              special_tokens: Sequence[str] = ()) -> Tokenizer:
  """Train a byte-level BPE of at most ``vocab_size`` tokens and save it to ``path``.

  Ids 0, 1, 2 are ``<pad>``, ``<s>``, ``</s>``; then ``special_tokens`` (e.g. chat-template
  markers), which are never split. Every byte is in the alphabet, so any text encodes.
  """
  specials = list(BASE_SPECIAL_TOKENS) + [t for t in special_tokens
                                          if t not in BASE_SPECIAL_TOKENS]
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  hf.train_from_iterator(texts, trainer)
  tok = Tokenizer(hf, **_DEMO_TOKENS)
  tok.save(path)
  return tok


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Raise if the tokenizer has ids the model's text vocabulary (embedding rows) lacks."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(
        f"The tokenizer has {tokenizer.vocab_size} tokens but the model's text vocabulary "
        f"has {model_vocab_size} (config.model.vocab_size; [CLS] is id {model_vocab_size}): "
        f"set config.model.vocab_size >= {tokenizer.vocab_size}, or use a tokenizer with at "
        f"most {model_vocab_size} tokens.")
