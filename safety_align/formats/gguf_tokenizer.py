"""A GGUF file's tokenizer metadata -> a ``tokenizers`` tokenizer (``tokenizer.json``).

``tokenizer.ggml.model == "gpt2"`` is a byte-level BPE of ``tokenizer.ggml.tokens`` +
``.merges``, split first by the regexes llama.cpp uses for ``tokenizer.ggml.pre``; ``"llama"``
is a SentencePiece BPE with byte fallback, merges recovered from ``.scores`` (as transformers
does). Control tokens become special added tokens, user-defined ones plain added tokens;
``add_bos_token`` / ``add_eos_token`` become a post-processor.
"""

from __future__ import annotations

from absl import logging
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

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


def add_special(meta: dict) -> tuple[bool, bool]:
  """(add BOS, add EOS) when encoding, with llama.cpp's defaults for files that omit them."""
  model = meta.get("tokenizer.ggml.model")
  bos_default = model == "llama" or meta.get("tokenizer.ggml.pre") in _IGNORE_MERGES
  return (bool(meta.get("tokenizer.ggml.add_bos_token", bos_default)),
          bool(meta.get("tokenizer.ggml.add_eos_token", False)))


def build(meta: dict, path: str, vocab_size: int, special_ids: dict) -> tokenizers.Tokenizer:
  """The tokenizer GGUF metadata ``meta`` (of the file ``path``) describes; raises if it has
  ids past ``vocab_size`` (the embedding rows). ``special_ids``: {bos_id, eos_ids, pad_id}."""
  tokens = meta.get("tokenizer.ggml.tokens")
  if not tokens:
    raise ValueError(f"{path} has no tokenizer.ggml.tokens: it carries no tokenizer.")
  if len(tokens) > vocab_size:
    raise ValueError(f"{path} has {len(tokens)} tokens but token_embd.weight only "
                     f"{vocab_size} rows: the file is inconsistent.")
  types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
  kind = meta.get("tokenizer.ggml.model")
  if kind == "gpt2":
    tok = _byte_level(meta, path, tokens)
  elif kind == "llama":
    tok = _sentencepiece(meta, path, tokens, types)
  else:
    raise ValueError(f"{path}: tokenizer.ggml.model={kind!r} is not supported; "
                     "supported: 'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE).")
  added = {i: tokenizers.AddedToken(t, special=ty == CONTROL, normalized=False)
           for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, USER_DEFINED)}
  tok.add_special_tokens([t for t in added.values() if t.special])
  tok.add_tokens([t for t in added.values() if not t.special])
  moved = [(t.content, i, tok.token_to_id(t.content)) for i, t in added.items()
           if tok.token_to_id(t.content) != i]
  if moved:
    raise ValueError(f"{path}: added tokens landed on other ids than the file's, e.g. "
                     f"{moved[:3]} (token, file id, id): duplicate token strings?")
  _set_post_processor(tok, meta, tokens, special_ids)
  return tok


def _byte_level(meta: dict, path: str, tokens: list[str]) -> tokenizers.Tokenizer:
  merges = meta.get("tokenizer.ggml.merges")
  if not merges:
    raise ValueError(f"{path}: a 'gpt2' tokenizer needs tokenizer.ggml.merges, which is "
                     "missing.")
  pre = meta.get("tokenizer.ggml.pre") or "default"
  if pre not in PRE_TOKENIZERS:
    raise ValueError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
                     f"{sorted(PRE_TOKENIZERS)}.")
  if pre == "default":
    logging.warning("%s names no pre-tokenizer (tokenizer.ggml.pre): splitting as llama.cpp "
                    "does then, which may not match the model's own tokenizer.", path)
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = tokenizers.Tokenizer(models.BPE(
      vocab, [tuple(m.split(" ", 1)) for m in merges], ignore_merges=pre in _IGNORE_MERGES))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated")
       for r in PRE_TOKENIZERS[pre]]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  return tok


def _sentencepiece(meta: dict, path: str, tokens: list[str], types: list[int],
                   ) -> tokenizers.Tokenizer:
  scores = meta.get("tokenizer.ggml.scores")
  if not scores:
    raise ValueError(f"{path}: a 'llama' (SentencePiece) tokenizer needs "
                     "tokenizer.ggml.scores, which is missing.")
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = meta.get("tokenizer.ggml.merges")
  if merges:
    merges = [tuple(m.split(" ", 1)) for m in merges]
  else:
    merges = _merges_from_scores(tokens, types, scores)
  unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
  tok = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True,
                                        byte_fallback=True))
  prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
  tok.normalizer = None
  tok.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
  steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
  tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
  return tok


def _set_post_processor(tok: tokenizers.Tokenizer, meta: dict, tokens: list[str],
                        ids: dict) -> None:
  add_bos, add_eos = add_special(meta)
  specials, single, pair = [], "$A:0", "$B:1"
  if add_bos and ids["bos_id"] is not None:
    bos = tokens[ids["bos_id"]]
    specials.append((bos, ids["bos_id"]))
    single, pair = f"{bos}:0 {single}", f"{bos}:1 {pair}"
  if add_eos and ids["eos_ids"]:
    eos = tokens[ids["eos_ids"][0]]
    specials.append((eos, ids["eos_ids"][0]))
    single, pair = f"{single} {eos}:0", f"{pair} {eos}:1"
  byte_level = meta.get("tokenizer.ggml.model") == "gpt2"
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
