"""Requests into engine jobs, engine events into replies (the shape of vLLM's serving_chat).

A chat request becomes a ``Request`` for the engine (``SlotRequest`` of the model object);
its ``SlotEvents`` come back chunk by chunk through an ``asyncio.Queue`` and become, as they
come (``reply.Reply``), the server-sent events of a stream (one ``chat.completion.chunk`` per
token, a chunk's tokens in one write) or, at the end, one ``chat.completion``. A ``stop``
string found in the reply ends the request's slot early. Classification and moderation run as engine ``Work`` in bounded pieces.
A client gone cancels its request (its slot is freed at the next chunk boundary) or work.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import pydantic

from safety_align.api import SafetyModel
from safety_align.serving import protocol
from safety_align.serving.engine import Engine, Request, ServerClosing, Work
from safety_align.serving.metrics import Metrics
from safety_align.serving.reply import ChatJob, Reply
from safety_align.serving.streams import ModerationStreams, Stream, StreamError

MAX_STOP = 4  # stop sequences per request (OpenAI's limit)


class ApiError(Exception):
  """An error reply: HTTP ``status`` and OpenAI's ``{"error": {...}}`` body."""

  def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status = status
    self.body = protocol.ErrorResponse(error=protocol.ErrorDetail(
        message=message, type=kind, param=param, code=code)).model_dump()


def parse(cls: type[pydantic.BaseModel], body: bytes) -> Any:
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


class Handler:
  """Turns requests into engine jobs and their results into replies.

  Args:
    model, engine, metrics: the served model, its engine and the server's metrics.
    name: the model id replies carry.
    gate, max_tokens: defaults of requests that set none (``max_tokens`` lowered to the room
      left in the context).
    max_classify_inputs: most inputs of one ``/v1/safety/classify`` request.
    classify_batch: inputs classified per engine step (between decode chunks).
    streams: the open ``/v1/safety/moderate`` streams.
    log_prompts: put the prompt text in gate-firing log lines.
  """

  def __init__(self, model: SafetyModel, engine: Engine, metrics: Metrics, *, name: str,
               gate: str = "annealing", max_tokens: int = 256, max_classify_inputs: int = 256,
               classify_batch: int = 16, streams: ModerationStreams | None = None,
               log_prompts: bool = False):
    self.model, self.engine, self.metrics, self.name = model, engine, metrics, name
    self.gate, self.max_tokens, self.log_prompts = gate, max_tokens, log_prompts
    self.max_classify_inputs, self.classify_batch = max_classify_inputs, classify_batch
    self.streams = streams or ModerationStreams(metrics=metrics)

  # Chat.

  def chat_job(self, req: protocol.ChatRequest) -> ChatJob:
    """The job of a chat request (400 ``ApiError`` for a bad one)."""
    m = self.model
    if (req.n or 1) != 1:
      raise ApiError(400, f"n={req.n}: this server returns one choice per request (n=1).",
                     param="n")
    gate = req.gate or self.gate
    if gate != "off" and not m.has_cls_head:
      raise ApiError(400, f"gate={gate!r} needs the [CLS] head, which this model lacks; use "
                     "gate='off'.", param="gate")
    prompt = self._render(req.messages, prefill=True)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    n = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if n is not None and n < 1:
      raise ApiError(400, f"{param} must be >= 1, got {n}.", param=param)
    context = self.engine.slots.max_len  # the slots' context (--max_model_len)
    room = context - len(prompt.ids) - len(prompt.prefill_ids)
    if n is None:
      n = max(1, min(self.max_tokens, room))
    try:
      m.check_length(len(prompt.ids), len(prompt.prefill_ids) + n, limit=context)
    except ValueError as e:
      raise ApiError(400, str(e), param=param if room > 0 else "messages") from None
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP or not all(stop):
      raise ApiError(400, f"stop: give at most {MAX_STOP} non-empty strings.", param="stop")
    temperature = 1.0 if req.temperature is None else req.temperature
    seed = req.seed if req.seed is not None else random.randrange(2**31)
    slot_request = m.slot_request(
        prompt, max_new_tokens=n, temperature=temperature, top_k=req.top_k or 0,
        top_p=1.0 if req.top_p is None else req.top_p, seed=seed if temperature > 0 else 0,
        gate=gate, eos=not req.ignore_eos)
    return ChatJob(slot_request=slot_request, gate=gate, n_prompt=len(prompt.ids),
                   n_forced=len(prompt.prefill_ids), max_new_tokens=n, stop=stop,
                   stream=req.stream,
                   include_usage=bool(req.stream_options and req.stream_options.include_usage),
                   prompt_text=" | ".join(msg.text for msg in req.messages))

  def _render(self, messages: Sequence[protocol.Message], *, prefill: bool):
    """The model's rendering of a conversation (multi-turn: every user turn QUERY; system and
    earlier assistant turns context), a final assistant message as the prefill."""
    try:
      return self.model.render([dict(role=msg.role, content=msg.text) for msg in messages],
                               prefill=prefill)
    except ValueError as e:
      raise ApiError(400, str(e), param="messages") from None

  def submit(self, job: ChatJob, loop: asyncio.AbstractEventLoop) -> tuple[Request,
                                                                            asyncio.Queue]:
    """Queue ``job`` in the engine: (its ``Request``, the queue its events arrive in)."""
    events: asyncio.Queue = asyncio.Queue()
    ident = f"chatcmpl-{uuid.uuid4().hex}"
    fields = dict(prompt=job.prompt_text) if self.log_prompts else {}

    def sink(item):  # in the engine thread
      if not loop.is_closed():  # else the server is gone, and nobody listens
        loop.call_soon_threadsafe(events.put_nowait, item)

    req = Request(job.slot_request, sink, ident=ident, log_fields=fields)
    try:
      self.engine.submit(req)
    except ServerClosing as e:
      raise ApiError(503, str(e), kind="server_error") from None
    self.metrics.prompt_tokens.inc(job.n_prompt + job.n_forced)
    return req, events

  async def stream(self, job: ChatJob, req: Request, events: asyncio.Queue,
                   t0: float) -> AsyncIterator[str]:
    """The server-sent events of a chat: each chunk's tokens as soon as the engine hands them
    over, then the final event (finish reason, the whole safety record), usage if asked for,
    and ``[DONE]``. Leaving early (the client went away) cancels the request."""
    reply, meta = Reply(self.model.tokenizer, job), self._meta(req.ident)
    first, last = True, None
    try:
      while reply.finish_reason is None:
        item = await events.get()
        if isinstance(item, Exception):
          yield _sse(_error_body(item))
          self._count("chat", "error")
          return
        if item is None:
          break
        out = reply.add(item)
        if reply.finish_reason == "stop":
          req.cancel("stop")
          self.engine.wake()
        if not out:
          continue
        now = time.monotonic()
        last = self._latency(out, now, t0 if first else last, first)
        bodies = []
        for piece, safety in out:
          delta = protocol.Delta(role="assistant", content=piece) if first else protocol.Delta(
              content=piece)
          first = False
          bodies.append(protocol.ChatCompletionChunk(**meta, choices=[protocol.ChunkChoice(
              delta=delta, safety=safety)]))
        yield "".join(_sse(b.model_dump()) for b in bodies)
      final = protocol.Delta(role="assistant", content="") if first else protocol.Delta()
      tail = [protocol.ChatCompletionChunk(**meta, choices=[protocol.ChunkChoice(
          delta=final, finish_reason=reply.finish_reason or "stop", safety=reply.safety())])]
      if job.include_usage:
        tail.append(protocol.ChatCompletionChunk(**meta, choices=[], usage=reply.usage()))
      self._count("chat", "ok")
      yield "".join(_sse(b.model_dump()) for b in tail) + "data: [DONE]\n\n"
    finally:
      if reply.finish_reason is None:
        req.cancel("disconnect")
        self.engine.wake()
        self._count("chat", "cancelled")

  async def complete(self, job: ChatJob, req: Request, events: asyncio.Queue,
                     disconnected: Callable[[], Awaitable[None]], t0: float) -> dict | None:
    """The ``chat.completion`` body, or None if the client went away first."""
    reply = Reply(self.model.tokenizer, job)

    async def collect():
      while reply.finish_reason is None:
        item = await events.get()
        if isinstance(item, Exception):
          raise _api_error(item)
        if item is None:
          return
        reply.add(item)
        if reply.finish_reason == "stop":
          req.cancel("stop")
          self.engine.wake()

    if not await self._race(collect(), disconnected):
      req.cancel("disconnect")
      self.engine.wake()
      self._count("chat", "cancelled")
      return None
    self.metrics.generation_tokens.inc(len(reply.sent))
    self.metrics.ttft.observe(time.monotonic() - t0)  # its first token comes with the last
    self._count("chat", "ok")
    return protocol.ChatCompletion(**self._meta(req.ident), choices=[protocol.Choice(
        message=protocol.ChatMessage(content=reply.text),
        finish_reason=reply.finish_reason or "stop", safety=reply.safety())],
        usage=reply.usage()).model_dump()

  def _meta(self, ident: str) -> dict:
    return dict(id=ident, created=int(time.time()), model=self.name)

  def _latency(self, out: list, now: float, since: float, first: bool) -> float:
    """Record the tokens sent at ``now``: time to first token, the gap since ``since``
    shared by the tokens; returns ``now``."""
    n = len(out)
    self.metrics.generation_tokens.inc(n)
    if first:
      self.metrics.ttft.observe(now - since)
      n -= 1
    if n > 0:
      self.metrics.itl.observe((now - since) / (n + first), count=n)
    return now

  def _count(self, endpoint: str, outcome: str) -> None:
    self.metrics.requests.inc(endpoint=endpoint, outcome=outcome)

  async def _race(self, work: Awaitable, disconnected: Callable[[], Awaitable[None]]) -> bool:
    """Await ``work`` unless the client disconnects first (then False)."""
    done = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected())
    try:
      await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the shutdown's grace period is over
      done.cancel()
      raise ApiError(503, "The server shut down before this request finished; retry it.",
                     kind="server_error") from None
    finally:
      gone.cancel()
    if not done.done():
      done.cancel()
      return False
    done.result()  # raises the work's ApiError
    return True

  # Classification and moderation: engine work in pieces.

  async def classify(self, req: protocol.ClassifyRequest,
                     disconnected: Callable[[], Awaitable[None]]) -> dict | None:
    m = self.model
    if not m.has_cls_head:
      raise ApiError(400, "This model has no [CLS] head to classify with.", param="input")
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts:
      raise ApiError(400, "input: give at least one string.", param="input")
    if len(texts) > self.max_classify_inputs:
      raise ApiError(400, f"input: {len(texts)} strings, over this server's limit of "
                     f"{self.max_classify_inputs} per request (--max_classify_inputs); split "
                     "them over several requests.", param="input")
    for i, text in enumerate(texts):
      if not text:
        raise ApiError(400, f"input[{i}] is empty.", param="input")
      try:
        m.check_length(len(self._render([protocol.Message(role="user", content=text)],
                                        prefill=False).ids), 0)
      except ApiError as e:
        raise ApiError(400, f"input[{i}]: {e}", param="input") from None
      except ValueError as e:
        raise ApiError(400, f"input[{i}]: {e}", param="input") from None
    k = self.classify_batch
    steps = [lambda part=texts[s:s + k]: m.classify(part).tolist()
             for s in range(0, len(texts), k)]
    probs = await self._work(Work(steps, "classify"), disconnected, "classify")
    if probs is None:
      return None
    self.metrics.classified.inc(len(texts))
    threshold = m.gate_defaults.threshold
    flat = [p for part in probs for p in part]
    return protocol.ClassifyResponse(model=self.name, data=[
        protocol.Classification(index=i, p_malicious=p, malicious=p > threshold)
        for i, p in enumerate(flat)]).model_dump()

  async def moderate(self, req: protocol.ModerateRequest,
                     disconnected: Callable[[], Awaitable[None]]) -> dict | None:
    """The gate's windows over ``req.response`` (a new text, or the next piece of a stream)."""
    m = self.model
    if not m.has_cls_head:
      raise ApiError(400, "This model has no [CLS] head to moderate with.", param="messages")
    try:
      if req.stream_id is not None:
        if req.messages is not None or req.gate is not None:
          raise ApiError(400, "A piece of an open stream takes only stream_id, response and "
                         "done: its messages and gate were set when it was opened.",
                         param="messages")
        sid, stream = req.stream_id, self.streams.get(req.stream_id)
      else:
        if not req.messages:
          raise ApiError(400, "messages: give the conversation the response answers.",
                         param="messages")
        prompt = self._render(req.messages, prefill=False)
        m.check_length(len(prompt.ids), 0)
        stream = Stream(guard=None, gate=req.gate or self.gate)
        sid = self.streams.open(stream) if req.stream and not req.done else None
    except StreamError as e:
      raise ApiError(e.status, str(e), param="stream_id") from None
    except ValueError as e:
      raise ApiError(400, str(e), param="messages") from None

    def step():  # in the engine thread, as all model work
      with stream.lock:
        if stream.guard is None:  # a new stream: its prompt pass
          stream.guard = m.gate_stream((prompt.ids, prompt.roles), gate=stream.gate)
        return stream.guard.extend(req.response)

    try:
      out = await self._work(Work([step], "moderate"), disconnected, "moderate")
    except ApiError:
      if sid is not None:
        self.streams.close(sid)
      raise
    if sid is not None and (req.done or (out is None and req.stream_id is None)):
      self.streams.close(sid)  # the last piece, or a new stream whose client never got its id
    if out is None:
      return None
    v = out[0]
    return protocol.ModerateResponse(
        model=self.name, stream_id=sid if not req.done else None, gate=stream.gate,
        threshold=m.gate_defaults.threshold, response_tokens=v.tokens,
        windows=[protocol.Window(step=s, p_malicious=p) for s, p in zip(v.steps, v.probs)],
        fired=v.fired, fire_step=v.fire_step, fire_char=v.fire_char).model_dump()

  async def _work(self, work: Work, disconnected: Callable[[], Awaitable[None]],
                  endpoint: str) -> list | None:
    """Run ``work`` in the engine: its results, or None if the client went away first (the
    steps not yet run are dropped)."""
    try:
      self.engine.submit(work)
    except ServerClosing as e:
      raise ApiError(503, str(e), kind="server_error") from None

    async def result():
      try:
        return await asyncio.wrap_future(work.future)
      except ServerClosing as e:
        raise ApiError(503, str(e), kind="server_error") from None
      except ValueError as e:  # the request's own fault (e.g. past the context)
        raise ApiError(400, str(e)) from None
      except Exception as e:  # pylint: disable=broad-except
        raise _api_error(e) from None

    task = asyncio.ensure_future(result())
    if not await self._race(task, disconnected):
      work.future.cancel()
      self.engine.wake()
      self._count(endpoint, "cancelled")
      return None
    self._count(endpoint, "ok")
    return task.result()


def _api_error(e: Exception) -> ApiError:
  if isinstance(e, ApiError):
    return e
  if isinstance(e, ServerClosing):
    return ApiError(503, str(e), kind="server_error")
  return ApiError(500, str(e), kind="server_error")


def _error_body(e: Exception) -> dict:
  return _api_error(e).body


def _sse(body: dict) -> str:
  return f"data: {json.dumps(body)}\n\n"
