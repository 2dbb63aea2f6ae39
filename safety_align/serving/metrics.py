"""The server's metrics in Prometheus' text exposition format (``GET /metrics``).

Counters, gauges and histograms with optional labels, thread-safe (the engine thread and the
event loop both record), rendered as the text format 0.0.4 that Prometheus scrapes. One
``Metrics`` object per app: two apps in one process keep separate counts.
"""

from __future__ import annotations

import bisect
import threading
from typing import Sequence

PREFIX = "safety_align_"
# Seconds: from 1 ms (a chunk's share per token on a small model) to a minute (a long queue).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
  parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)] + ([extra] if extra else [])
  return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
  return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
  return repr(float(x)) if x != int(x) or abs(x) > 2**53 else str(int(x))


class _Metric:
  kind = ""

  def __init__(self, name: str, help_text: str, labels: Sequence[str], lock: threading.Lock):
    self.name, self.help, self.label_names, self._lock = PREFIX + name, help_text, labels, lock
    self._values: dict[tuple[str, ...], object] = {}
    if not labels:  # an unlabelled series exists, at zero, from the start (as prometheus_client)
      self._values[()] = self._zero()

  def _zero(self):
    return 0.0

  def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
    if set(labels) != set(self.label_names):
      raise ValueError(f"{self.name} takes labels {list(self.label_names)}, got {sorted(labels)}.")
    return tuple(str(labels[n]) for n in self.label_names)

  def header(self) -> list[str]:
    return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
  kind = "counter"

  def inc(self, amount: float = 1.0, **labels) -> None:
    with self._lock:
      key = self._key(labels)
      self._values[key] = self._values.get(key, 0.0) + amount

  def value(self, **labels) -> float:
    with self._lock:
      return self._values.get(self._key(labels), 0.0)

  def lines(self) -> list[str]:
    return [f"{self.name}_total{_labels(self.label_names, k)} {_number(v)}"
            for k, v in sorted(self._values.items())]


class Gauge(Counter):
  kind = "gauge"

  def set(self, value: float, **labels) -> None:
    with self._lock:
      self._values[self._key(labels)] = value

  def lines(self) -> list[str]:
    return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}"
            for k, v in sorted(self._values.items())]


class Histogram(_Metric):
  kind = "histogram"

  def __init__(self, *args, buckets: Sequence[float] = LATENCY_BUCKETS):
    self.buckets = tuple(buckets)
    super().__init__(*args)

  def _zero(self):
    return [0] * (len(self.buckets) + 1), 0.0

  def observe(self, value: float, count: int = 1, **labels) -> None:
    """Record ``value`` ``count`` times."""
    with self._lock:
      key = self._key(labels)
      counts, total = self._values.get(key) or self._zero()
      counts[bisect.bisect_left(self.buckets, value)] += count
      self._values[key] = (counts, total + value * count)

  def count(self, **labels) -> int:
    with self._lock:
      counts, _ = self._values.get(self._key(labels), ([0], 0.0))
      return sum(counts)

  def lines(self) -> list[str]:
    out = []
    for key, (counts, total) in sorted(self._values.items()):
      running = 0
      for bound, n in zip(list(self.buckets) + [float("inf")], counts):
        running += n
        le = "+Inf" if bound == float("inf") else _number(bound)
        bucket = _labels(self.label_names, key, 'le="%s"' % le)
        out.append(f"{self.name}_bucket{bucket} {running}")
      out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}")
      out.append(f"{self.name}_count{_labels(self.label_names, key)} {running}")
    return out


class Metrics:
  """Everything the server counts. Engine side: queue depth, live slots, gate firings by
  schedule, chunks; handler side: requests by endpoint and outcome, tokens, time to first token
  and inter-token latency."""

  def __init__(self):
    self._lock = threading.Lock()
    self._all: list[_Metric] = []
    c, g, h = self._make(Counter), self._make(Gauge), self._make(Histogram)
    self.requests = c("requests", "Requests finished, by endpoint and outcome.",
                      ("endpoint", "outcome"))
    self.prompt_tokens = c("prompt_tokens", "Prompt tokens of decoded requests.")
    self.generation_tokens = c("generation_tokens", "Response tokens decoded.")
    self.classified = c("classified_inputs", "Inputs classified by /v1/safety/classify.")
    self.gate_firings = c("gate_firings", "Refusals the gate inserted, by schedule.",
                          ("schedule",))
    self.chunks = c("engine_chunks", "Chunks the engine advanced its live slots by.")
    self.ttft = h("time_to_first_token_seconds", "From request to its first token sent.")
    self.itl = h("inter_token_latency_seconds",
                 "Time between a stream's tokens (a chunk's gap shared by its tokens).")
    self.queue = g("queue_depth", "Requests waiting for a slot or for the engine.")
    self.live = g("live_slots", "Slots decoding a request.")
    self.slots = g("slots", "Slots the engine has (--max_batch).")
    self.moderation_streams = g("moderation_streams", "Open /v1/safety/moderate streams.")
    for gauge in (self.queue, self.live, self.slots, self.moderation_streams):
      gauge.set(0)

  def _make(self, cls):
    def make(name: str, help_text: str, labels: Sequence[str] = ()):
      metric = cls(name, help_text, labels, self._lock)
      self._all.append(metric)
      return metric
    return make

  def render(self) -> str:
    """The text exposition format."""
    with self._lock:
      lines = []
      for m in self._all:
        lines += m.header() + m.lines()
    return "\n".join(lines) + "\n"
