"""A chat reply built from the engine's events as they come: the text each token adds
(``Detokenizer``), ``stop`` strings (text that could start one held back until it cannot),
the per-token safety events and the whole safety record, cut where the reply was cut.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from safety_align.serving import protocol


class Detokenizer:
  """The text each token adds, token by token; the pieces concatenate to
  ``tok.decode(tokens)``. A token ending inside a multi-byte character adds "" until the
  character is complete; ``flush`` gives what an unfinished character decodes to. Each step
  decodes a window from the last emitted piece on, not the whole prefix (as vLLM does)."""

  def __init__(self, tok):
    self.tok, self.tokens, self._start, self._read = tok, [], 0, 0

  def add(self, token: int) -> str:
    self.tokens.append(token)
    prefix = self.tok.decode(self.tokens[self._start:self._read])
    text = self.tok.decode(self.tokens[self._start:])
    if len(text) > len(prefix) and not text.endswith("\ufffd"):
      self._start, self._read = self._read, len(self.tokens)
      return text[len(prefix):]
    return ""

  def flush(self) -> str:
    if self._read == len(self.tokens):
      return ""
    rest = self.tok.decode(self.tokens[self._start:])
    prefix = self.tok.decode(self.tokens[self._start:self._read])
    self._start = self._read = len(self.tokens)
    return rest[len(prefix):]


def token_texts(tok, tokens: Sequence[int]) -> list[str]:
  """The text each token adds (``Detokenizer``), an unfinished character on the last one."""
  d = Detokenizer(tok)
  pieces = [d.add(t) for t in tokens]
  if pieces:
    pieces[-1] += d.flush()
  return pieces


@dataclasses.dataclass(frozen=True)
class ChatJob:
  """A validated chat request: the engine's ``SlotRequest`` and how to reply."""

  slot_request: Any
  gate: str
  n_prompt: int
  n_forced: int
  max_new_tokens: int
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool
  prompt_text: str


class Reply:
  """A chat reply built from its ``SlotEvents`` as they come. ``add`` returns the generated
  tokens ready to send, each ``(text, TokenSafety)``; text that could be the start of a stop
  string is held back until the next tokens tell. ``finish_reason`` is set once the reply is
  over (a stop string found, or the slot done)."""

  def __init__(self, tok, job: ChatJob):
    self.job = job
    self.detok = Detokenizer(tok)
    self.sent: list[str] = []  # text of each generated token sent
    self._held: list[tuple[str, protocol.TokenSafety]] = []
    self.steps: list[int] = []
    self.probs: list[float] = []
    self.refusal_step: int | None = None
    self.finish_reason: str | None = None

  @property
  def text(self) -> str:
    return "".join(self.sent)

  def add(self, events) -> list[tuple[str, protocol.TokenSafety]]:
    for step, p in events.cls:
      self.steps.append(step)
      self.probs.append(p)
    if events.refused and self.refusal_step is None:
      self.refusal_step = events.refusal_step
    by_step = dict(zip(self.steps, self.probs))
    for token in events.tokens:
      j = len(self.detok.tokens)
      piece = self.detok.add(token)
      if j < self.job.n_forced:
        continue
      refused = self.refusal_step is not None and j >= self.refusal_step
      self._held.append((piece, protocol.TokenSafety(p_malicious=by_step.get(j),
                                                     refused=refused)))
    if events.done:
      if self._held:
        last, safety = self._held[-1]
        self._held[-1] = (last + self.detok.flush(), safety)
      n = len(self.detok.tokens)
      self.finish_reason = ("length" if n >= self.job.n_forced + self.job.max_new_tokens
                            else "stop")
    return self._release()

  def _release(self) -> list[tuple[str, protocol.TokenSafety]]:
    """The held tokens that no stop string can claim (all of them once over), cut at the first
    stop string found."""
    text = self.text
    held = "".join(p for p, _ in self._held)
    whole = text + held
    cuts = [whole.find(s, max(0, len(text) - len(s) + 1)) for s in self.job.stop]
    cuts = [c for c in cuts if c >= 0]
    if cuts:
      safe, self.finish_reason = min(cuts), "stop"
    elif self.finish_reason is not None:
      safe = len(whole)
    else:  # hold back the longest tail that starts a stop string
      tail = max((k for s in self.job.stop for k in range(1, len(s))
                  if whole.endswith(s[:k])), default=0)
      safe = len(whole) - tail
    out, pos = [], len(text)
    while self._held and (pos + len(self._held[0][0]) <= safe or (
        self.finish_reason is not None and pos < safe)):
      piece, safety = self._held.pop(0)
      piece = piece[:safe - pos]
      out.append((piece, safety))
      pos += len(piece)
    while self._held and self._held[0][0] == "" and self.finish_reason is None:
      out.append(self._held.pop(0))  # a token inside a character: nothing to hold back
    if self.finish_reason is not None:
      self._held.clear()
    self.sent += [p for p, _ in out]
    return out

  def safety(self) -> protocol.SafetyRecord:
    """The whole trace, cut where the reply was cut (evaluations after the last token sent
    and a refusal that had not started are dropped)."""
    n = self.job.n_forced + len(self.sent)
    keep = [i for i, s in enumerate(self.steps) if s < max(n, 1)]
    refused = self.refusal_step is not None and self.refusal_step < n
    return protocol.SafetyRecord(
        refused=refused, refusal_step=self.refusal_step if refused else None,
        cls_probs=[self.probs[i] for i in keep], cls_steps=[self.steps[i] for i in keep],
        gate=self.job.gate, prefill_tokens=self.job.n_forced)

  def usage(self) -> protocol.Usage:
    prompt = self.job.n_prompt + self.job.n_forced
    return protocol.Usage(prompt_tokens=prompt, completion_tokens=len(self.sent),
                          total_tokens=prompt + len(self.sent))
