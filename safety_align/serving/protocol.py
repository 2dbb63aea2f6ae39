"""The OpenAI chat-completions schema with the safety extension: requests in, jobs and bodies
out.

A chat is single-turn: an optional ``system`` (or ``developer``) message, one ``user``
message, and optionally a final ``assistant`` message, which is continued (a prefill, as
vLLM's ``continue_final_message``): the reply's content is the continuation only, while
``cls_steps`` and ``refusal_step`` count response tokens from the start of the prefill, as
``SafetyModel.generate`` does (``prefill_tokens`` says how many it has).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Sequence

import pydantic

from safety_align.api import Generation, SafetyModel
from safety_align.decode import SCHEDULES
from safety_align.serving.batcher import ClassifyKey, Job, decode_key, truncate

MAX_STOP = 4  # stop sequences per request (OpenAI's limit)


class ApiError(Exception):
  """An error reply: HTTP ``status`` and OpenAI's ``{"error": {...}}`` body."""

  def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status = status
    self.body = {"error": dict(message=message, type=kind, param=param, code=code)}


class _Body(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")


class TextPart(_Body):
  type: Literal["text"]
  text: str


class Message(_Body):
  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[TextPart] | None = None

  @property
  def text(self) -> str:
    if isinstance(self.content, list):
      return "".join(p.text for p in self.content)
    return self.content or ""


class StreamOptions(_Body):
  include_usage: bool = False


class ChatRequest(_Body):
  """The fields this server reads; others are ignored. ``temperature`` defaults to OpenAI's
  1; ``top_k`` (0: off) and ``gate`` are extensions."""

  messages: list[Message] = pydantic.Field(min_length=1)
  model: str | None = None
  max_tokens: int | None = None
  max_completion_tokens: int | None = None
  temperature: float | None = pydantic.Field(None, ge=0.0, le=2.0)
  top_p: float | None = pydantic.Field(None, gt=0.0, le=1.0)
  top_k: int | None = pydantic.Field(None, ge=0)
  seed: int | None = pydantic.Field(None, ge=-2**31, lt=2**31)
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  n: int | None = None
  gate: Literal[SCHEDULES] | None = None


class ClassifyRequest(_Body):
  input: str | list[str]
  model: str | None = None


def parse(cls: type[pydantic.BaseModel], body: bytes) -> pydantic.BaseModel:
  """``body`` (JSON) as ``cls``; a ``400 ApiError`` naming the first bad field."""
  try:
    return cls.model_validate_json(body)
  except pydantic.ValidationError as e:
    err = e.errors()[0]
    if err["type"] == "json_invalid":
      raise ApiError(400, f"The request body is not valid JSON: {err['msg']}.") from None
    if not err["loc"]:
      raise ApiError(400, "The request body must be a JSON object.") from None
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]
                    if not _is_union_branch(p)).lstrip(".")
    raise ApiError(400, f"{param}: {err['msg']}.", param=param) from None


def _is_union_branch(p) -> bool:
  """pydantic names the branch of a union it tried (e.g. ``str``, ``list[...]``)."""
  return isinstance(p, str) and (p in ("str", "int", "float") or "[" in p)


@dataclasses.dataclass(frozen=True)
class Chat:
  """A validated chat request: its ``job`` and how to reply."""

  job: Job
  gate: str
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool


def chat_job(model: SafetyModel, req: ChatRequest, *, gate: str, max_tokens: int,
             server_seed: int) -> Chat:
  """The job of a chat request; ``gate`` and ``max_tokens``: the defaults (``max_tokens`` is
  lowered to the room left in the context)."""
  if (req.n or 1) != 1:
    raise ApiError(400, f"n={req.n}: this server returns one choice per request (n=1).",
                   param="n")
  gate = req.gate or gate
  if gate != "off" and not model.has_cls_head:
    raise ApiError(400, f"gate={gate!r} needs the [CLS] head, which this model lacks; use "
                   "gate='off'.", param="gate")
  system, user, prefill = _single_turn(req.messages)
  tok = model.tokenizer
  try:
    pieces = model.template.prompt_pieces(tok, user, system=system)
  except ValueError as e:
    raise ApiError(400, str(e), param="messages") from None
  forced = tok.encode(prefill) if prefill else []
  used = sum(len(ids) for ids, _ in pieces) + len(forced)
  limit = model.decoder.max_length
  room = None if limit is None else limit - used
  if room is not None and room < 1:
    raise ApiError(400, f"The prompt is {used} tokens (with the template and the prefill), "
                   f"which fills the model's context of {limit} tokens; shorten it.",
                   param="messages")
  param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
  n = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
  if n is None:
    n = max_tokens if room is None else min(max_tokens, room)
  elif n < 1:
    raise ApiError(400, f"{param} must be >= 1, got {n}.", param=param)
  elif room is not None and n > room:
    raise ApiError(400, f"{param}={n} does not fit: the prompt is {used} tokens of the model's "
                   f"context of {limit}, which leaves room for {room}.", param=param)
  stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
  if len(stop) > MAX_STOP or not all(stop):
    raise ApiError(400, f"stop: give at most {MAX_STOP} non-empty strings.", param="stop")
  temperature = 1.0 if req.temperature is None else req.temperature
  key, row_id = decode_key(gate=gate, temperature=temperature, top_k=req.top_k or 0,
                           top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
                           max_tokens=n, server_seed=server_seed)
  job = Job(key=key, pieces=pieces, forced=forced, max_new_tokens=n, row_id=row_id)
  return Chat(job=job, gate=gate, stop=stop, stream=req.stream,
              include_usage=bool(req.stream_options and req.stream_options.include_usage))


def _single_turn(messages: Sequence[Message]) -> tuple[str | None, str, str]:
  """(system, user, prefill) of [system], user, [assistant]."""
  roles = [m.role for m in messages]
  rest = list(messages)
  system = rest.pop(0).text if roles[0] in ("system", "developer") else None
  prefill = rest.pop().text if len(rest) > 1 and rest[-1].role == "assistant" else ""
  if len(rest) != 1 or rest[0].role != "user":
    raise ApiError(400, f"Only single-turn chats are supported: an optional system message, "
                   f"one user message and optionally a final assistant message (continued as "
                   f"a prefill); got roles {roles}.", param="messages")
  if not rest[0].text:
    raise ApiError(400, "The user message is empty.", param="messages")
  return system, rest[0].text, prefill


def classify_job(model: SafetyModel, req: ClassifyRequest) -> Job:
  if not model.has_cls_head:
    raise ApiError(400, "This model has no [CLS] head to classify with.", param="input")
  texts = [req.input] if isinstance(req.input, str) else req.input
  if not texts:
    raise ApiError(400, "input: give at least one string.", param="input")
  limit = model.decoder.max_length
  for i, text in enumerate(texts):
    if not text:
      raise ApiError(400, f"input[{i}] is empty.", param="input")
    n = sum(len(ids) for ids, _ in model.template.prompt_pieces(model.tokenizer, text))
    if limit is not None and n > limit:
      raise ApiError(400, f"input[{i}] is {n} tokens with the template, over the model's "
                     f"context of {limit}.", param="input")
  return Job(key=ClassifyKey(), texts=texts)


def token_texts(tok, tokens: Sequence[int]) -> list[str]:
  """The text each token adds; they concatenate to ``tok.decode(tokens)``. A token ending
  inside a multi-byte character adds "", the one completing it the character. Each step
  decodes a window from the last emitted piece on, not the whole prefix (as vLLM does)."""
  pieces, start, read = [], 0, 0
  for i in range(len(tokens)):
    prefix = tok.decode(tokens[start:read])
    text = tok.decode(tokens[start:i + 1])
    if len(text) > len(prefix) and not text.endswith("\ufffd"):
      pieces.append(text[len(prefix):])
      start, read = read, i + 1
    else:
      pieces.append("")
  if read < len(tokens):  # ends inside a character: its replacement character comes last
    pieces[-1] = tok.decode(tokens[start:])[len(tok.decode(tokens[start:read])):]
  return pieces


@dataclasses.dataclass(frozen=True)
class Reply:
  """A finished chat: ``pieces``, the text of each generated (not forced) token; ``gen``, the
  generation cut at a stop sequence."""

  chat: Chat
  gen: Generation
  pieces: list[str]
  finish_reason: str

  @property
  def n_forced(self) -> int:
    return len(self.chat.job.forced)

  def safety(self) -> dict:
    g = self.gen
    return dict(refused=g.refused, refusal_step=g.refusal_step, cls_probs=g.cls_probs,
                cls_steps=g.cls_steps, gate=self.chat.gate, prefill_tokens=self.n_forced)

  @functools.cached_property
  def _step_probs(self) -> dict[int, float]:
    return dict(zip(self.gen.cls_steps, self.gen.cls_probs))

  def token_safety(self, j: int) -> dict:
    """Of generated token ``j``: P(malicious) if its step re-evaluated [CLS], and whether the
    refusal has started."""
    step = self.n_forced + j
    return dict(p_malicious=self._step_probs.get(step),
                refused=self.gen.refused and step >= self.gen.refusal_step)

  def usage(self) -> dict:
    prompt = self.chat.job.n_prompt + self.n_forced
    return dict(prompt_tokens=prompt, completion_tokens=len(self.pieces),
                total_tokens=prompt + len(self.pieces))


def reply(tok, chat: Chat, gen: Generation) -> Reply:
  """The reply to ``chat`` from its generation: cut at the first stop sequence (in the
  generated text), with its finish reason."""
  n_forced = len(chat.job.forced)
  every = token_texts(tok, gen.tokens)
  pieces = every[n_forced:]
  text = "".join(pieces)
  ended = len(gen.tokens) < n_forced + chat.job.max_new_tokens
  cuts = [text.find(s) for s in chat.stop if s in text]
  if cuts:
    cut, kept, pos = min(cuts), [], 0
    for piece in pieces:
      if pos >= cut:
        break
      kept.append(piece[:cut - pos])
      pos += len(piece)
    pieces, ended = kept, True
    gen = truncate(tok, gen, n_forced + len(kept), text="".join(every[:n_forced] + kept))
  return Reply(chat=chat, gen=gen, pieces=pieces, finish_reason="stop" if ended else "length")


def completion(r: Reply, *, ident: str, created: int, model: str) -> dict:
  """The ``chat.completion`` body."""
  return dict(id=ident, object="chat.completion", created=created, model=model,
              choices=[dict(index=0, message=dict(role="assistant", content="".join(r.pieces)),
                            finish_reason=r.finish_reason, logprobs=None, safety=r.safety())],
              usage=r.usage())


def chunks(r: Reply, *, ident: str, created: int, model: str) -> list[dict]:
  """The ``chat.completion.chunk`` bodies: one per generated token, then the final one
  (finish reason and the whole safety record), then usage if asked for."""
  def chunk(choices, **extra):
    return dict(id=ident, object="chat.completion.chunk", created=created, model=model,
                choices=choices, **extra)

  out = []
  for j, piece in enumerate(r.pieces):
    delta = dict(role="assistant", content=piece) if j == 0 else dict(content=piece)
    out.append(chunk([dict(index=0, delta=delta, finish_reason=None, logprobs=None,
                           safety=r.token_safety(j))]))
  final = dict(role="assistant", content="") if not r.pieces else {}
  out.append(chunk([dict(index=0, delta=final, finish_reason=r.finish_reason, logprobs=None,
                         safety=r.safety())]))
  if r.chat.include_usage:
    out.append(chunk([], usage=r.usage()))
  return out
