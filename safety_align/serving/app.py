"""The HTTP side: a FastAPI app over a ``Batcher``.

Handlers are async; each queues its job and awaits it while watching for the client to
disconnect (a job not yet started is then dropped). A job's failure fails its request only
(500); the server's shutdown fails queued jobs with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid

import fastapi
from absl import logging
from fastapi import responses
from starlette.exceptions import HTTPException

from safety_align.api import SafetyModel
from safety_align.serving import protocol
from safety_align.serving.batcher import Batcher, Job, ServerClosing
from safety_align.serving.protocol import ApiError


def create_app(model: SafetyModel, *, name: str, api_key: str | None = None,
               gate: str = "annealing", max_batch: int = 16, window_s: float = 0.015,
               max_tokens: int = 256, shutdown_timeout: float = 30.0) -> fastapi.FastAPI:
  """The server's app. ``name``: the model id it reports; ``api_key``: required as
  ``Authorization: Bearer KEY`` on ``/v1/*`` if set; ``gate``, ``max_tokens``: defaults of
  requests that set none; ``shutdown_timeout``: how long shutdown waits for a running decode.
  """
  batcher = Batcher(model, max_batch=max_batch, window_s=window_s)
  created = int(time.time())

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    batcher.start()
    yield
    if not batcher.close(shutdown_timeout):
      logging.warning("The decode worker did not finish within %g s.", shutdown_timeout)

  def check_key(authorization: str | None = fastapi.Header(None)):
    if api_key is None:
      return
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                             api_key.encode()):
      raise ApiError(401, "Missing or incorrect API key: send 'Authorization: Bearer KEY'.",
                     code="invalid_api_key")

  app = fastapi.FastAPI(title="safety_align", lifespan=lifespan)
  app.state.batcher = batcher
  v1 = fastapi.APIRouter(prefix="/v1", dependencies=[fastapi.Depends(check_key)])

  @app.exception_handler(ApiError)
  async def api_error(request, e: ApiError):
    del request
    return _error(e)

  @app.exception_handler(HTTPException)
  async def http_error(request, e: HTTPException):
    del request
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return _error(ApiError(e.status_code, str(e.detail), kind=kind))

  @app.exception_handler(Exception)
  async def internal_error(request, e: Exception):
    del request
    return _error(ApiError(500, f"Internal server error: {type(e).__name__}: {e}",
                           kind="server_error"))

  @app.get("/health")
  async def health():
    return dict(status="ok", model=name, **batcher.stats())

  @v1.get("/models")
  async def models():
    return dict(object="list", data=[dict(id=name, object="model", created=created,
                                          owned_by="safety_align",
                                          max_model_len=model.decoder.max_length)])

  @v1.post("/chat/completions")
  async def chat_completions(request: fastapi.Request):
    req = protocol.parse(protocol.ChatRequest, await request.body())
    chat = protocol.chat_job(model, req, gate=gate, max_tokens=max_tokens,
                             server_seed=batcher.seed)
    gen = await _result(request, batcher, chat.job)
    if gen is None:
      return responses.Response(status_code=499)  # nobody is listening
    r = protocol.reply(model.tokenizer, chat, gen)
    meta = dict(ident=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=name)
    if chat.stream:
      return responses.StreamingResponse(_events(protocol.chunks(r, **meta)),
                                         media_type="text/event-stream")
    return protocol.completion(r, **meta)

  @v1.post("/safety/classify")
  async def classify(request: fastapi.Request):
    req = protocol.parse(protocol.ClassifyRequest, await request.body())
    job = protocol.classify_job(model, req)
    probs = await _result(request, batcher, job)
    if probs is None:
      return responses.Response(status_code=499)
    threshold = model.gate_defaults.threshold
    return dict(object="list", model=name,
                data=[dict(index=i, p_malicious=p, malicious=p > threshold)
                      for i, p in enumerate(probs)])

  app.include_router(v1)
  return app


def _error(e: ApiError) -> responses.JSONResponse:
  return responses.JSONResponse(e.body, status_code=e.status)


async def _result(request: fastapi.Request, batcher: Batcher, job: Job):
  """The job's result, or ``None`` if the client went away first (a job not yet started is
  then dropped, one already running finishes unread)."""
  try:
    done = asyncio.wrap_future(batcher.submit(job))
  except ServerClosing as e:
    raise ApiError(503, str(e), kind="server_error") from None
  gone = asyncio.ensure_future(_disconnected(request))
  try:
    await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
  except asyncio.CancelledError:  # the shutdown's grace period is over
    raise ApiError(503, "The server shut down before this request finished; retry it.",
                   kind="server_error") from None
  finally:
    gone.cancel()
    if not done.done():
      done.cancel()
  if done.cancelled():
    return None
  try:
    return done.result()
  except ServerClosing as e:
    raise ApiError(503, str(e), kind="server_error") from None
  except RuntimeError as e:
    raise ApiError(500, str(e), kind="server_error") from None


async def _disconnected(request: fastapi.Request) -> None:
  """Returns when the client disconnects (the body has been read: nothing else comes)."""
  while (await request.receive())["type"] != "http.disconnect":
    pass


async def _events(bodies):
  """The server-sent events of a finished reply, as OpenAI streams them, in one write (the
  tokens are all known: a write per event would only add work)."""
  yield "".join(f"data: {json.dumps(body)}\n\n" for body in bodies) + "data: [DONE]\n\n"
