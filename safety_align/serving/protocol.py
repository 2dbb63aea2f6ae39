"""The server's request and response bodies (pydantic models only), as OpenAI's API names them,
with the ``safety`` extensions of API.md ("Server safety fields") and ``/v1/safety/*``.

Requests ignore fields they do not know (OpenAI clients send many); responses are what the
handler builds and ``/openapi.json`` documents.
"""

from __future__ import annotations

from typing import Literal

import pydantic

from safety_align.api import SCHEDULES


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
  1; ``top_k`` (0: off), ``gate`` and ``ignore_eos`` (vLLM's: decode past end-of-turn to the
  token budget, for benchmarks) are extensions."""

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
  ignore_eos: bool = False


class ClassifyRequest(_Body):
  input: str | list[str]
  model: str | None = None


class ModerateRequest(_Body):
  """A response written by any model, checked by the gate. ``messages``: the conversation it
  answers (as in a chat request; omitted when continuing a stream). ``response``: its text,
  or the next piece of it with ``stream_id``. ``stream``: keep the state for more pieces (the
  reply's ``stream_id``); ``done``: the last piece (the state is dropped)."""

  messages: list[Message] | None = None
  response: str
  stream_id: str | None = None
  stream: bool = False
  done: bool = False
  gate: Literal[SCHEDULES] | None = None
  model: str | None = None


# Responses.

class TokenSafety(pydantic.BaseModel):
  """Of one streamed token: P(malicious) if its step re-evaluated ``[CLS]``, and whether the
  refusal prefix has started."""

  p_malicious: float | None
  refused: bool


class SafetyRecord(pydantic.BaseModel):
  """Of a whole reply: the gate's trace (``sa.Generation``'s fields; steps count response
  tokens, a prefill's included)."""

  refused: bool
  refusal_step: int | None
  cls_probs: list[float]
  cls_steps: list[int]
  gate: str
  prefill_tokens: int


class Usage(pydantic.BaseModel):
  prompt_tokens: int
  completion_tokens: int
  total_tokens: int


class ChatMessage(pydantic.BaseModel):
  role: Literal["assistant"] = "assistant"
  content: str


class Choice(pydantic.BaseModel):
  index: int = 0
  message: ChatMessage
  finish_reason: Literal["stop", "length"]
  logprobs: None = None
  safety: SafetyRecord


class ChatCompletion(pydantic.BaseModel):
  id: str
  object: Literal["chat.completion"] = "chat.completion"
  created: int
  model: str
  choices: list[Choice]
  usage: Usage


class Delta(pydantic.BaseModel):
  role: Literal["assistant"] | None = None
  content: str | None = None


class ChunkChoice(pydantic.BaseModel):
  index: int = 0
  delta: Delta
  finish_reason: Literal["stop", "length"] | None = None
  logprobs: None = None
  safety: TokenSafety | SafetyRecord


class ChatCompletionChunk(pydantic.BaseModel):
  id: str
  object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
  created: int
  model: str
  choices: list[ChunkChoice]
  usage: Usage | None = None


class Classification(pydantic.BaseModel):
  index: int
  p_malicious: float
  malicious: bool


class ClassifyResponse(pydantic.BaseModel):
  object: Literal["list"] = "list"
  model: str
  data: list[Classification]


class Window(pydantic.BaseModel):
  """One evaluation: ``step`` (response tokens it could read; 0 is the query's
  classification) and its P(malicious)."""

  step: int
  p_malicious: float


class ModerateResponse(pydantic.BaseModel):
  """The gate over the response so far: every evaluated window, and whether and where it
  would have fired (``fire_step``: the response token its refusal would have replaced;
  ``fire_char``: where that token starts in the response text)."""

  object: Literal["safety.moderation"] = "safety.moderation"
  model: str
  stream_id: str | None
  gate: str
  threshold: float
  response_tokens: int
  windows: list[Window]
  fired: bool
  fire_step: int | None
  fire_char: int | None


class ModelCard(pydantic.BaseModel):
  id: str
  object: Literal["model"] = "model"
  created: int
  owned_by: str = "safety_align"
  max_model_len: int | None


class ModelList(pydantic.BaseModel):
  object: Literal["list"] = "list"
  data: list[ModelCard]


class ErrorDetail(pydantic.BaseModel):
  message: str
  type: str
  param: str | None = None
  code: str | None = None


class ErrorResponse(pydantic.BaseModel):
  error: ErrorDetail
