"""The open ``/v1/safety/moderate`` streams: each a ``moderation.GateStream`` (the gate's state
and KV cache over one response so far) under a server-made id.

At most ``max_streams`` are open (a new one beyond is refused, 429) and one idle longer than
``ttl_s`` is dropped; a piece for an unknown or expired id is a 404 naming which.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import uuid

from safety_align.serving.metrics import Metrics

_FORGET = 1024  # expired ids remembered (to say "expired" rather than "unknown")


class StreamError(Exception):
  """A request about a stream that cannot be served: HTTP ``status`` and a message."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(eq=False)
class Stream:
  """One open stream: its ``guard`` (a ``GateStream``, made by its first piece in the engine
  thread), the gate schedule it runs, and a lock (its pieces are applied one at a time, in
  the order they arrive)."""

  guard: object | None
  gate: str
  used: float = dataclasses.field(default_factory=time.monotonic)
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class ModerationStreams:
  """The open streams (thread-safe)."""

  def __init__(self, *, max_streams: int = 64, ttl_s: float = 600.0,
               metrics: Metrics | None = None):
    self.max_streams, self.ttl_s = max_streams, ttl_s
    self.metrics = metrics or Metrics()
    self._open: dict[str, Stream] = {}
    self._expired: collections.OrderedDict[str, None] = collections.OrderedDict()
    self._lock = threading.Lock()

  def open(self, stream: Stream) -> str:
    """The id ``stream`` is kept under; ``StreamError`` (429) when ``max_streams`` are
    open."""
    with self._lock:
      self._expire()
      if len(self._open) >= self.max_streams:
        raise StreamError(429, f"{len(self._open)} moderation streams are open, this server's "
                          f"limit (--max_moderation_streams); send done=true on finished "
                          f"ones, or wait for idle ones to expire ({self.ttl_s:g} s).")
      sid = f"modstream-{uuid.uuid4().hex}"
      self._open[sid] = stream
      self.metrics.moderation_streams.set(len(self._open))
      return sid

  def get(self, sid: str) -> Stream:
    """The stream ``sid`` (its idle clock restarted); ``StreamError`` (404) if unknown or
    expired."""
    with self._lock:
      self._expire()
      stream = self._open.get(sid)
      if stream is None:
        why = (f"expired after {self.ttl_s:g} s without a piece" if sid in self._expired
               else "is unknown")
        raise StreamError(404, f"stream_id {sid!r} {why}: open a new stream with the whole "
                          "response so far (stream=true).")
      stream.used = time.monotonic()
      return stream

  def close(self, sid: str) -> None:
    with self._lock:
      self._open.pop(sid, None)
      self.metrics.moderation_streams.set(len(self._open))

  def _expire(self) -> None:
    now = time.monotonic()
    for sid in [s for s, st in self._open.items() if now - st.used > self.ttl_s]:
      del self._open[sid]
      self._expired[sid] = None
      while len(self._expired) > _FORGET:
        self._expired.popitem(last=False)
    self.metrics.moderation_streams.set(len(self._open))
