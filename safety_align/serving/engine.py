"""The engine: one thread that schedules requests over the model's decode slots.

``SafetyModel.slots(max_batch, max_len)`` holds a fixed number of slots, each a row of the KV
cache with its gate state; one compiled call advances every live slot by ``chunk_tokens``
steps. The engine's loop, between two such calls (a chunk boundary):

1. frees the slots of finished requests and of cancelled ones (a client gone, a stop string);
2. admits queued requests into free slots (``start``: the request's prompt pass);
3. runs one piece of other queued model work (a classification batch, a moderation piece),
   so long work interleaves with decoding instead of holding it;
4. advances the live slots and hands each request its chunk's events (new tokens, gate
   evaluations, the refusal) through its ``sink``, at once: a stream sends them while the next
   chunk decodes.

A slot's tokens do not depend on what shares the chunk (rows are independent, sampling draws
from the request's own seed), so a request gets the tokens ``SafetyModel.generate`` gives it
alone. ``stats`` and the ``Metrics`` gauges say what the engine holds; ``stuck`` says whether
one call has run longer than ``stuck_after_s``. ``after_chunk`` is a hook called in the engine
thread after each chunk's events are handed out (tests hold the engine there).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import threading
import time
from typing import Any, Callable

from absl import logging

from safety_align.api import SafetyModel
from safety_align.serving.metrics import Metrics


class ServerClosing(RuntimeError):
  """The server is shutting down: the request was not (fully) served."""


_CLOSED = ServerClosing("The server shut down before this request finished; retry it.")


class Request:
  """One decode request in the engine.

  Args:
    slot_request: what ``SlotDecoder.start`` takes.
    sink: called in the engine thread with each ``SlotEvents`` of the request, then once with
      ``None`` when it is over (done or cancelled), or with an exception instead (then nothing
      more).
    ident: the request id (log lines); log_fields: more fields of its gate-firing log line.
  """

  def __init__(self, slot_request, sink: Callable[[Any], None], *, ident: str = "",
               log_fields: dict | None = None):
    self.slot_request, self.sink, self.ident = slot_request, sink, ident
    self.log_fields = log_fields or {}
    self.cancel_reason: str | None = None
    self.slot: int | None = None
    self.fired = False
    self.evals: list[tuple[int, float]] = []  # (step, P(malicious)) of each evaluation

  def cancel(self, reason: str) -> None:
    """Stop decoding this request at the next chunk boundary (``reason``: a metrics label)."""
    if self.cancel_reason is None:
      self.cancel_reason = reason


class Work:
  """Model work other than decoding, run one step per chunk boundary: ``steps`` are called in
  order in the engine thread; ``future`` gets the list of their results. Cancelling the future
  (its client went away) drops the steps not yet run."""

  def __init__(self, steps: list[Callable[[], Any]], kind: str):
    self.steps, self.kind = collections.deque(steps), kind
    self.results: list[Any] = []
    self.future: concurrent.futures.Future = concurrent.futures.Future()


class Engine:
  """Schedules ``Request``s over ``model.slots(max_batch, max_len)`` and runs ``Work``.

  Args:
    model: the model (used from the engine thread only).
    max_batch: slots; max_len: each slot's context (None: the model's).
    chunk_tokens: steps each advance call takes.
    metrics: where the engine records its gauges and counters.
    stuck_after_s: a single call running longer than this makes ``stuck`` true.
  """

  def __init__(self, model: SafetyModel, *, max_batch: int = 16, max_len: int | None = None,
               chunk_tokens: int = 8, metrics: Metrics | None = None,
               stuck_after_s: float = 300.0):
    if max_batch < 1 or chunk_tokens < 1:
      raise ValueError(f"max_batch and chunk_tokens must be >= 1, got {max_batch} and "
                       f"{chunk_tokens}.")
    self.model = model
    self.slots = model.slots(max_batch=max_batch, max_len=max_len)
    self.chunk_tokens = chunk_tokens
    self.metrics = metrics or Metrics()
    self.metrics.slots.set(max_batch)
    self.stuck_after_s = stuck_after_s
    self.after_chunk: Callable[[list], None] | None = None
    self._queue: collections.deque[Request] = collections.deque()
    self._work: collections.deque[Work] = collections.deque()
    self._live: dict[int, Request] = {}
    self._free = list(range(max_batch))[::-1]
    self._cv = threading.Condition()
    self._accepting = True
    self._deadline: float | None = None  # draining: fail what is left at this time
    self._busy_since: float | None = None
    self.counts = collections.Counter()
    self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

  # The handler's side (any thread).

  def start(self) -> None:
    self._thread.start()

  @property
  def alive(self) -> bool:
    return self._thread.is_alive()

  def submit(self, item: Request | Work) -> None:
    """Queue a request or work; ``ServerClosing`` once the server drains."""
    with self._cv:
      if not self._accepting:
        raise ServerClosing("The server is shutting down; retry on another replica.")
      (self._queue if isinstance(item, Request) else self._work).append(item)
      self._gauges()
      self._cv.notify()

  def wake(self) -> None:
    """Let the loop see a cancellation now (a held or idle loop picks it up at its next
    boundary anyway)."""
    with self._cv:
      self._cv.notify()

  @property
  def stuck(self) -> bool:
    """Whether one engine call has been running longer than ``stuck_after_s``."""
    since = self._busy_since
    return since is not None and time.monotonic() - since > self.stuck_after_s

  def stats(self) -> dict[str, Any]:
    with self._cv:
      return dict(queued=len(self._queue), work_queued=len(self._work), live=len(self._live),
                  slots=self.slots.max_batch, **self.counts)

  def drain(self, timeout: float) -> None:
    """Stop accepting; serve what is queued and live for up to ``timeout`` s, then fail the
    rest with ``ServerClosing`` (at that time, even if an engine call is still running) and
    stop the loop."""
    with self._cv:
      self._accepting = False
      self._deadline = time.monotonic() + max(0.0, timeout)
      self._cv.notify()
    timer = threading.Timer(max(0.0, timeout), self._expire)
    timer.daemon = True
    timer.start()

  def _expire(self) -> None:
    """At the drain's deadline: fail every request and work left (the loop, if in a long
    call, stops at its next boundary; what it hands out after this is not read)."""
    with self._cv:
      requests = list(self._live.values()) + list(self._queue)
      works = list(self._work)
    for req in requests:
      req.sink(_CLOSED)
    for work in works:
      _settle(work.future, exception=_CLOSED)

  def close(self, timeout: float) -> bool:
    """``drain(timeout)`` and wait for the loop to stop (up to ``timeout`` s more only if a
    single call outlives it); returns whether it stopped."""
    if self._deadline is None:
      self.drain(timeout)
    if self.alive:
      self._thread.join(max(0.0, self._deadline - time.monotonic()) + 0.5)
    return not self.alive

  # The engine thread.

  def _gauges(self) -> None:
    self.metrics.queue.set(len(self._queue) + len(self._work))
    self.metrics.live.set(len(self._live))

  def _run(self) -> None:
    try:
      while self._iteration():
        pass
    except Exception:  # pylint: disable=broad-except
      logging.exception("The engine loop failed; /health reports it.")
      raise
    finally:
      self._fail_all(_CLOSED)

  def _iteration(self) -> bool:
    """One chunk boundary and chunk; False when the loop should stop."""
    with self._cv:
      while not (self._queue or self._work or self._live or self._deadline is not None):
        self._cv.wait()
      if self._deadline is not None and (time.monotonic() >= self._deadline or not (
          self._queue or self._work or self._live)):
        return False
      self._busy_since = time.monotonic()
    try:
      self._free_finished()
      self._admit()
      self._work_step()
      if self._live:
        self._advance()
    finally:
      self._busy_since = None
    return True

  def _free_finished(self) -> None:
    for slot, req in list(self._live.items()):
      if req.cancel_reason is not None:
        self._release(req)
        self.counts[f"cancelled_{req.cancel_reason}"] += 1
        req.sink(None)

  def _release(self, req: Request) -> None:
    self.slots.free(req.slot)
    with self._cv:
      del self._live[req.slot]
      self._free.append(req.slot)
      self._gauges()

  def _admit(self) -> None:
    while True:
      with self._cv:
        if not self._queue or not self._free:
          return
        req = self._queue.popleft()
        if req.cancel_reason is not None:
          self._gauges()
          self.counts[f"cancelled_{req.cancel_reason}"] += 1
          req.sink(None)
          continue
        req.slot = self._free.pop()
        self._live[req.slot] = req
        self._gauges()
      try:
        events = self.slots.start(req.slot, req.slot_request)
      except Exception as e:  # pylint: disable=broad-except
        self._release(req)
        self.counts["failed"] += 1
        req.sink(RuntimeError(f"Internal error while starting the request: "
                              f"{type(e).__name__}: {e}"))
        continue
      self._deliver(req, events)

  def _work_step(self) -> None:
    with self._cv:
      while self._work and self._work[0].future.cancelled():
        self.counts[f"cancelled_{self._work.popleft().kind}"] += 1
        self._gauges()
      if not self._work:
        return
      work = self._work[0]
    try:
      work.results.append(work.steps.popleft()())
    except Exception as e:  # pylint: disable=broad-except
      with self._cv:
        self._work.popleft()
        self._gauges()
      self.counts["failed"] += 1
      _settle(work.future, exception=e)
      return
    self.counts[f"{work.kind}_steps"] += 1
    if not work.steps:
      with self._cv:
        self._work.popleft()
        self._gauges()
      self.counts["completed"] += 1
      _settle(work.future, result=work.results)

  def _advance(self) -> None:
    try:
      chunk = self.slots.advance(self.chunk_tokens)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("A decode chunk failed; its requests fail.")
      for req in list(self._live.values()):
        self._release(req)
        self.counts["failed"] += 1
        req.sink(RuntimeError(f"Internal error while decoding: {type(e).__name__}: {e}"))
      return
    self.counts["chunks"] += 1
    self.metrics.chunks.inc()
    for events in chunk:
      req = self._live.get(events.slot)
      if req is not None:
        self._deliver(req, events)
    if self.after_chunk is not None:
      self.after_chunk(chunk)

  def _deliver(self, req: Request, events) -> None:
    """Hand ``events`` to the request; log the gate's firing; free the slot when done."""
    req.evals += events.cls
    if events.refused and not req.fired:
      req.fired = True
      schedule = req.slot_request.gate
      self.metrics.gate_firings.inc(schedule=schedule)
      step = events.refusal_step  # the evaluation that decided: the last one before it
      decided = [e for e in req.evals if e[0] < step or e[0] == 0]
      logging.info("gate_fired %s", json.dumps(dict(
          request_id=req.ident, step=step, decided_at=decided[-1][0],
          p_malicious=decided[-1][1], schedule=schedule, **req.log_fields)))
    req.sink(events)
    if events.done:
      self._release(req)
      self.counts["completed"] += 1
      req.sink(None)

  def _fail_all(self, error: Exception) -> None:
    with self._cv:
      self._accepting = False
      requests = list(self._live.values()) + list(self._queue)
      works = list(self._work)
      self._queue.clear()
      self._work.clear()
    for req in requests:
      if req.slot is not None and req.slot in self._live:
        self._release(req)
      req.sink(error)
    for work in works:
      _settle(work.future, exception=error)


def _settle(future: concurrent.futures.Future, *, result=None, exception=None) -> None:
  """Set a future's outcome unless its client cancelled it meanwhile."""
  if future.cancelled():
    return
  try:
    if exception is not None:
      future.set_exception(exception)
    else:
      future.set_result(result)
  except concurrent.futures.InvalidStateError:  # cancelled between the check and the set
    pass
