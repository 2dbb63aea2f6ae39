"""The HTTP routes: a FastAPI app over a ``Handler`` and its ``Engine``.

Every route reads its body with a size limit (413 before any parsing or tokenizing), hands the
request to the handler and returns what it builds; errors are OpenAI's ``{"error": {...}}``.
With an API key, ``/v1/*``, ``/docs`` and ``/openapi.json`` require it; ``/health`` and
``/metrics`` stay open (load balancers and scrapers).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time

import fastapi
from absl import logging
from fastapi import openapi, responses
from starlette.exceptions import HTTPException

from safety_align.api import SafetyModel
from safety_align.serving import protocol
from safety_align.serving.engine import Engine
from safety_align.serving.handler import ApiError, Handler, parse
from safety_align.serving.metrics import Metrics
from safety_align.serving.streams import ModerationStreams


def create_app(model: SafetyModel, *, name: str, api_key: str | None = None,
               gate: str = "annealing", max_batch: int = 16, chunk_tokens: int = 8,
               max_model_len: int | None = None, max_tokens: int = 256,
               max_classify_inputs: int = 256, max_body_bytes: int = 1 << 20,
               max_moderation_streams: int = 64, moderation_ttl_s: float = 600.0,
               stuck_after_s: float = 300.0, shutdown_timeout: float = 30.0,
               log_prompts: bool = False) -> fastapi.FastAPI:
  """The server's app (``safety_align.serve``'s flags name each setting). ``app.state``
  holds ``engine``, ``handler`` and ``metrics``."""
  metrics = Metrics()
  engine = Engine(model, max_batch=max_batch, max_len=max_model_len,
                  chunk_tokens=chunk_tokens, metrics=metrics, stuck_after_s=stuck_after_s)
  handler = Handler(model, engine, metrics, name=name, gate=gate, max_tokens=max_tokens,
                    max_classify_inputs=max_classify_inputs, classify_batch=max_batch,
                    streams=ModerationStreams(max_streams=max_moderation_streams,
                                              ttl_s=moderation_ttl_s, metrics=metrics),
                    log_prompts=log_prompts)
  created = int(time.time())

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    engine.start()
    yield
    if not engine.close(shutdown_timeout):
      logging.warning("The engine did not stop within %g s.", shutdown_timeout)

  def check_key(authorization: str | None = fastapi.Header(None)):
    if api_key is None:
      return
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                             api_key.encode()):
      raise ApiError(401, "Missing or incorrect API key: send 'Authorization: Bearer KEY'.",
                     code="invalid_api_key")

  app = fastapi.FastAPI(title="safety_align", lifespan=lifespan, docs_url=None,
                        redoc_url=None, openapi_url=None)
  app.state.engine, app.state.handler, app.state.metrics = engine, handler, metrics
  keyed = [fastapi.Depends(check_key)]
  v1 = fastapi.APIRouter(prefix="/v1", dependencies=keyed)

  @app.exception_handler(ApiError)
  async def api_error(request, e: ApiError):
    del request
    return responses.JSONResponse(e.body, status_code=e.status)

  @app.exception_handler(HTTPException)
  async def http_error(request, e: HTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return await api_error(request, ApiError(e.status_code, str(e.detail), kind=kind))

  @app.exception_handler(Exception)
  async def internal_error(request, e: Exception):
    return await api_error(request, ApiError(
        500, f"Internal server error: {type(e).__name__}: {e}", kind="server_error"))

  @app.get("/openapi.json", dependencies=keyed, include_in_schema=False)
  async def openapi_json():
    return openapi.utils.get_openapi(title=app.title, version=app.version, routes=app.routes)

  @app.get("/docs", dependencies=keyed, include_in_schema=False)
  async def docs():
    return openapi.docs.get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

  @app.get("/health")
  async def health():
    state = "ok" if engine.alive else "stopped"
    if engine.stuck:
      state = "stuck"
    return responses.JSONResponse(dict(status=state, model=name, **engine.stats()),
                                  status_code=200 if state == "ok" else 503)

  @app.get("/metrics", response_class=responses.PlainTextResponse)
  async def prometheus():
    return responses.PlainTextResponse(metrics.render(),
                                       media_type="text/plain; version=0.0.4; charset=utf-8")

  @v1.get("/models", response_model=protocol.ModelList)
  async def models():
    return protocol.ModelList(data=[protocol.ModelCard(id=name, created=created,
                                                       max_model_len=engine.slots.max_len)])

  @v1.post("/chat/completions", response_model=protocol.ChatCompletion,
           openapi_extra=_body_schema(protocol.ChatRequest))
  async def chat_completions(request: fastapi.Request):
    t0 = time.monotonic()
    job = handler.chat_job(parse(protocol.ChatRequest, await _body(request, max_body_bytes)))
    req, events = handler.submit(job, asyncio.get_running_loop())
    if job.stream:
      return responses.StreamingResponse(handler.stream(job, req, events, t0),
                                         media_type="text/event-stream")
    body = await handler.complete(job, req, events, _disconnected(request), t0)
    return _gone() if body is None else body

  async def work(request: fastapi.Request, body_type, run):
    """A route whose reply is engine work (``run``: the handler's method)."""
    body = await run(parse(body_type, await _body(request, max_body_bytes)),
                     _disconnected(request))
    return _gone() if body is None else body

  @v1.post("/safety/classify", response_model=protocol.ClassifyResponse,
           openapi_extra=_body_schema(protocol.ClassifyRequest))
  async def classify(request: fastapi.Request):
    return await work(request, protocol.ClassifyRequest, handler.classify)

  @v1.post("/safety/moderate", response_model=protocol.ModerateResponse,
           openapi_extra=_body_schema(protocol.ModerateRequest))
  async def moderate(request: fastapi.Request):
    return await work(request, protocol.ModerateRequest, handler.moderate)

  app.include_router(v1)
  return app


async def _body(request: fastapi.Request, limit: int) -> bytes:
  """The request body, refused with a 413 as soon as it is known to exceed ``limit`` bytes
  (by its Content-Length, else while it arrives)."""
  too_big = ApiError(413, f"The request body is over this server's limit of {limit} bytes "
                     "(--max_body_bytes).", code="request_too_large")
  length = request.headers.get("content-length", "")
  if length.isdigit() and int(length) > limit:
    raise too_big
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise too_big
    chunks.append(chunk)
  return b"".join(chunks)


def _disconnected(request: fastapi.Request):
  """A coroutine function returning when the client disconnects (its body has been read:
  nothing else comes)."""
  async def wait():
    while (await request.receive())["type"] != "http.disconnect":
      pass
  return wait


def _gone() -> responses.Response:
  return responses.Response(status_code=499)  # nobody is listening


def _body_schema(model) -> dict:
  """OpenAPI request body of a route that reads its body itself (to limit its size)."""
  return {"requestBody": {"content": {"application/json": {
      "schema": model.model_json_schema()}},
      "required": True}}
