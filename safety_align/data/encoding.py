"""Records to :class:`~packing.Segment` s with their [CLS] rows (METHOD.md sec. 4).

``encode_pretrain``: a labelled document under the pretraining mask; ``encode_sft``: a chat
example, single- or multi-turn (a record's ``turns``; main [CLS] = the record's label) and,
with window augmentation, window [CLS] rows over consecutive r2-token spans of its response,
plus a window-only segment over the harmful continuation (never an LM target) whose rows are
labelled per span (``marked_tokens``, ``past_opener``). ``pipeline.py`` batches and packs what
these return.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from safety_align.data.chat_templates import Template
from safety_align.data.packing import Segment, build_segment
from safety_align.data.tokenizer import Tokenizer
from safety_align.masks import Role

MAX_WINDOWS = 8  # window [CLS] rows per segment at most


def _pretrain_segment(ids: Sequence[int], label: int, tok: Tokenizer, cls_id: int) -> Segment:
  pieces = [([tok.bos_id], Role.BOS)] if tok.bos_id is not None else []
  pieces.append((list(ids) + [tok.eos_id], Role.RESPONSE))
  return build_segment(cls_id, pieces, label)


def encode_pretrain(record: dict, tok: Tokenizer, cls_id: int) -> Segment:
  """``[CLS] <s> document </s>``: the document (and EOS) as RESPONSE tokens, all LM targets;
  the main [CLS] (which reads the whole document under the pretrain mask) has the record's
  label."""
  return _pretrain_segment(tok.encode(record["text"]), record["label"], tok, cls_id)


def response_windows(n: int, window: int, max_windows: int = MAX_WINDOWS) -> list[tuple[int, int]]:
  """Inclusive ``(lo, hi)`` spans of ``window`` consecutive tokens (stride ``window``, the
  last may be shorter) over ``n`` response tokens, at most ``max_windows`` of them."""
  if window < 1:
    raise ValueError(f"The window length r2 must be >= 1, got {window} (config.sft.window).")
  return [(lo, min(lo + window, n) - 1) for lo in range(0, n, window)][:max_windows]


def _response_ids(pieces: Sequence[tuple[Sequence[int], Role]]) -> list[int]:
  return [int(t) for ids, role in pieces if role == Role.RESPONSE for t in ids]


def _token_spans(ids: Sequence[int], tok: Tokenizer) -> tuple[np.ndarray, np.ndarray, str]:
  """(starts [n], ends [n], text): the decoded text of ``ids`` and the characters each token
  spans in it (token ``k``: those the decoded prefix gains with it)."""
  prefixes = tok.hf.decode_batch([list(ids[:k]) for k in range(1, len(ids) + 1)])
  ends = np.array([len(p) for p in prefixes], np.int64)
  return np.concatenate([[0], ends[:-1]]), ends, prefixes[-1] if prefixes else ""


def marked_tokens(ids: Sequence[int], tok: Tokenizer, markers: Sequence[str]) -> np.ndarray:
  """[n] bool: whether each token of ``ids`` overlaps one of ``markers`` in their decoded
  text."""
  starts, ends, text = _token_spans(ids, tok)
  marked = np.zeros(len(ids), bool)
  for m in markers:
    for hit in re.finditer(re.escape(m), text):
      marked |= (starts < hit.end()) & (ends > hit.start())
  return marked


_SENTENCE_END = re.compile(r"[.!?:](?=\s)|\n")


def past_opener(ids: Sequence[int], tok: Tokenizer, opener: str) -> np.ndarray:
  """[n] bool: the tokens of a harmful response ``ids`` that reach past its compliant opening
  sentence. The opening sentence is the decoded text up to its first ``.``, ``!``, ``?`` or
  ``:`` before a space, or its first line break, when the text starts with ``opener`` ("Sure,
  here is") and goes on after it; otherwise every token is past it."""
  starts, ends, text = _token_spans(ids, tok)
  end = _SENTENCE_END.search(text) if text.lstrip().startswith(opener) else None
  rest = text[end.end():] if end else ""
  if not rest.strip():
    return np.ones(len(ids), bool)
  return ends > len(text) - len(rest.lstrip())


def _window_rows(pieces, text: str, harmful: bool, window: int, tok: Tokenizer,
                 markers: Sequence[str], opener: str = "") -> list[tuple[int, int, int]]:
  """``(lo, hi, label)`` window rows over the response of ``pieces`` (``text``) before its
  end-of-turn token, labelled as ``encode_sft`` says."""
  ids = _response_ids(pieces)[:-1]
  if not markers and harmful and opener:
    marked = past_opener(ids, tok, opener)
  elif not markers:
    marked = np.full(len(ids), harmful)
  elif any(m in text for m in markers):
    marked = marked_tokens(ids, tok, markers)
  else:
    marked = np.zeros(len(ids), bool)
  return [(lo, hi, int(marked[lo:hi + 1].any())) for lo, hi in response_windows(len(ids), window)]


def example_pieces(record: dict, response: str, tok: Tokenizer, template: Template):
  """The pieces of ``record``'s chat answered by ``response``: ``template.example_pieces`` of
  its ``prompt``, or, when the record has earlier ``turns``, the conversation's
  ``template.chat_pieces`` (``turns`` then the ``prompt`` as the last user message: every user
  turn QUERY, system text and earlier assistant turns TEMPLATE, METHOD.md sec. 3) followed by
  the RESPONSE tokens the single-turn example gives ``response`` (its text and end of turn)."""
  single = template.example_pieces(tok, record["prompt"], response)
  if not record.get("turns"):
    return single
  messages = [*record["turns"], dict(role="user", content=record["prompt"])]
  return template.chat_pieces(tok, messages) + [p for p in single if p[1] == Role.RESPONSE]


def encode_sft(record: dict, tok: Tokenizer, template: Template, cls_id: int,
               window: int = 10, augment: bool = False,
               harm_markers: Sequence[str] = (), harmful_opener: str = "",
               untrained_prefix: str = "") -> list[Segment]:
  """The segments of one chat record (``example_pieces`` of its texts).

  A record is ``{"prompt", "response", "label"}``, optionally with ``"harmful_response"`` and
  ``"turns"``: the earlier messages of a multi-turn chat before the final user ``prompt``
  (``[{"role", "content"}, ...]``: an optional system message, then user and assistant in
  turn, ending with an assistant message). The main [CLS] reads every user turn, not the
  earlier answers or the system text; only the final response is RESPONSE (LM targets, window
  rows); a record without ``turns`` is the single-turn example.

  * The example ``[CLS] [window CLS...] <s> opening query closing response </s>``: main [CLS]
    label = the record's label. With ``augment``, window [CLS] rows over consecutive
    ``window``-token (r2) spans of the response (before its end-of-turn token).
  * With ``augment`` and a non-empty ``harmful_response``, a window-only segment: the same
    prompt with the harmful response as RESPONSE tokens that are *never* LM targets (the SFT
    model must not learn to write them), main label 1, and window rows over it.

  Window labels are per span (METHOD.md sec. 4): with ``harm_markers`` (the demo corpus'
  ``corpus.HARM_MARKERS``, which mark exactly its harmful text), 1 iff the span overlaps a
  marker, so a compliant opener ("Sure, here is how to ...") is 0 and a redacted step is 1.
  Without markers (real data, whose harmful text is unmarked), the record's response (an
  answer or a refusal) is 0 throughout and its harmful response 1 throughout, or, with
  ``harmful_opener`` (config.sft.harmful_opener, e.g. "Sure, here is"), 0 over its compliant
  opening sentence and 1 from the first span that reaches past it (``past_opener``).

  With ``untrained_prefix`` (config.sft.untrained_refusal_prefix: the gate's refusal prefix),
  a malicious record's response that opens with its tokens is no LM target over them: the
  model learns the reason that follows the prefix the gate inserts, not to write the prefix
  on its own (which it then wrote on benign prompts too); the reason stays an LM target.

  At most ``MAX_WINDOWS`` window rows per segment.
  """
  main = example_pieces(record, record["response"], tok, template)
  windows = (_window_rows(main, record["response"], False, window, tok, harm_markers)
             if augment else [])
  untrained = []
  if untrained_prefix and record["label"] == 1:
    prefix = tok.encode(untrained_prefix)
    if _response_ids(main)[:len(prefix)] == prefix:
      untrained = [(0, len(prefix) - 1)]
  out = [build_segment(cls_id, main, record["label"], windows=windows, untrained=untrained)]
  harmful = record.get("harmful_response", "")
  if augment and harmful:
    pieces = example_pieces(record, harmful, tok, template)
    n_resp = len(_response_ids(pieces))  # with the end of turn
    out.append(build_segment(
        cls_id, pieces, 1,
        windows=_window_rows(pieces, harmful, True, window, tok, harm_markers, harmful_opener),
        untrained=[(0, n_resp - 1)]))
  return out


def encode_records(records: Sequence[dict], kind: str, tok: Tokenizer, cls_id: int,
                   template: Template | None = None, window: int = 10,
                   augment: bool = False, harm_markers: Sequence[str] = (),
                   harmful_opener: str = "", untrained_prefix: str = "") -> list[Segment]:
  """``encode_pretrain`` (kind "pretrain", the texts tokenised in one ``encode_batch``) or
  ``encode_sft`` ("sft") of many records."""
  if kind == "pretrain":
    ids = tok.encode_batch([r["text"] for r in records])
    return [_pretrain_segment(x, r["label"], tok, cls_id) for x, r in zip(ids, records)]
  return [seg for r in records
          for seg in encode_sft(r, tok, template, cls_id, window, augment, harm_markers,
                                harmful_opener, untrained_prefix)]
