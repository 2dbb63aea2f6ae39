"""The decode worker: one thread that groups queued jobs into batched decoder calls.

A job is one request's decode (or classification). Jobs with the same ``DecodeKey`` (gate,
sampler settings and seed, ``max_tokens`` bucket) that arrive within ``window_s`` of the
oldest queued one are decoded in one call of the compiled loop, up to ``max_batch`` rows; the
rest wait for the next call. A row's result does not depend on its batch: greedy decoding is
row-independent, and a sampled row draws from ``(seed, row_id, step)``: ``(seed, 0, step)``
for a seeded request, exactly as ``SafetyModel.generate([prompt], seed=seed)``, and a random
``row_id`` under the server's seed for an unseeded one. Rows of one call share its
``max_new_tokens`` (the largest); each is cut back to its own budget, which leaves what the
call alone would give (a row's tokens and evaluations never depend on later steps).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import random
import threading
import time
from typing import Sequence

from absl import logging

from safety_align.api import Generation, SafetyModel, resolve_gate
from safety_align.data.chat_jinja import Pieces
from safety_align.decode import Prompts, bucket, make_sampler


class ServerClosing(RuntimeError):
  """The server is shutting down: the job was not run."""


@dataclasses.dataclass(frozen=True)
class DecodeKey:
  """What the jobs of one decoder call share. ``seed``: the sampling seed (0 when greedy)."""

  gate: str
  temperature: float
  top_k: int
  top_p: float
  seed: int
  max_tokens_bucket: int

  def fits(self, model: SafetyModel, jobs: Sequence["Job"]) -> bool:
    """Whether every row has room for the call's ``max_new_tokens`` in the context."""
    limit = model.decoder.max_length
    longest = max(j.max_new_tokens for j in jobs)
    return limit is None or all(j.n_prompt + len(j.forced) + longest <= limit for j in jobs)

  def run(self, model: SafetyModel, jobs: Sequence["Job"]) -> list[Generation]:
    tok = model.tokenizer
    gate = resolve_gate(self.gate, model.gate_defaults, model.has_cls_head)
    out = model.decoder(
        model.params, Prompts.from_pieces([j.pieces for j in jobs]),
        max_new_tokens=max(j.max_new_tokens for j in jobs), gate=gate,
        sampler=make_sampler(self.temperature, self.top_k, self.top_p), seed=self.seed,
        prefill=[j.forced for j in jobs], refusal_ids=tok.encode(gate.refusal_prefix),
        newline_ids=tok.encode("\n"), row_ids=[j.row_id for j in jobs])
    gens = []
    for i, job in enumerate(jobs):
      steps, probs = out.trace(i)
      step = int(out.refusal_step[i])
      full = Generation(text="", tokens=out.response(i), refused=step >= 0,
                        refusal_step=step if step >= 0 else None, cls_probs=probs,
                        cls_steps=steps)
      gens.append(truncate(tok, full, len(job.forced) + job.max_new_tokens))
    return gens


@dataclasses.dataclass(frozen=True)
class ClassifyKey:
  """Classification jobs: their texts go through ``SafetyModel.classify`` together."""

  def fits(self, model: SafetyModel, jobs: Sequence["Job"]) -> bool:
    del model, jobs
    return True

  def run(self, model: SafetyModel, jobs: Sequence["Job"]) -> list[list[float]]:
    probs = model.classify([t for j in jobs for t in j.texts]).tolist()
    out, start = [], 0
    for j in jobs:
      out.append(probs[start:start + len(j.texts)])
      start += len(j.texts)
    return out


@dataclasses.dataclass(eq=False)
class Job:
  """One request's work. Decoding: the prompt's template ``pieces`` (``n_prompt`` tokens), the
  ``forced`` response start (prefill) and ``max_new_tokens`` after it; classification:
  ``texts``. ``future`` receives the ``Generation`` (or the list of P(malicious))."""

  key: DecodeKey | ClassifyKey
  pieces: Pieces = ()
  forced: list[int] = dataclasses.field(default_factory=list)
  max_new_tokens: int = 0
  texts: list[str] = dataclasses.field(default_factory=list)
  row_id: int = 0
  future: concurrent.futures.Future = dataclasses.field(
      default_factory=concurrent.futures.Future)
  arrival: float = dataclasses.field(default_factory=time.monotonic)

  @property
  def n_prompt(self) -> int:
    return sum(len(ids) for ids, _ in self.pieces)


def decode_key(*, gate: str, temperature: float, top_k: int, top_p: float, seed: int | None,
               max_tokens: int, server_seed: int) -> tuple[DecodeKey, int]:
  """(key, row id) of a decode request; ``seed=None``: unseeded (a random row id)."""
  if temperature == 0.0:
    return DecodeKey(gate, 0.0, 0, 1.0, 0, bucket(max_tokens)), 0
  key = DecodeKey(gate, temperature, top_k, top_p, server_seed if seed is None else seed,
                  bucket(max_tokens))
  return key, random.randrange(1, 2**31) if seed is None else 0


def truncate(tok, gen: Generation, n: int, text: str | None = None) -> Generation:
  """``gen`` cut to its first ``n`` response tokens: the evaluations before step ``n`` (the
  query's classification, step 0, always) and the refusal if it started before. ``text``:
  the cut text (default: the decoded tokens)."""
  keep = [i for i, s in enumerate(gen.cls_steps) if s < max(n, 1)]
  refused = gen.refused and gen.refusal_step < n
  tokens = gen.tokens[:n]
  return Generation(text=tok.decode(tokens) if text is None else text, tokens=tokens,
                    refused=refused, refusal_step=gen.refusal_step if refused else None,
                    cls_probs=[gen.cls_probs[i] for i in keep],
                    cls_steps=[gen.cls_steps[i] for i in keep])


class Batcher:
  """Runs jobs on one worker thread, batching compatible ones.

  Args:
    model: the model (used from the worker thread only).
    max_batch: most jobs per decoder call.
    window_s: how long the oldest queued job waits for others to join its call.
  """

  def __init__(self, model: SafetyModel, *, max_batch: int = 16, window_s: float = 0.015):
    if max_batch < 1:
      raise ValueError(f"max_batch must be >= 1, got {max_batch}.")
    self.model = model
    self.max_batch = max_batch
    self.window_s = window_s
    self.seed = random.randrange(2**31)  # of unseeded sampled requests
    self._pending: list[Job] = []
    self._running = 0
    self._closed = False
    self._cv = threading.Condition()
    self._counts = dict(completed=0, failed=0, cancelled=0, batches=0)
    self._thread = threading.Thread(target=self._loop, name="decode-worker", daemon=True)

  def start(self) -> None:
    self._thread.start()

  @property
  def stopped(self) -> bool:
    """Whether the worker is not running (not started, or finished)."""
    return not self._thread.is_alive()

  def submit(self, job: Job) -> concurrent.futures.Future:
    with self._cv:
      if self._closed:
        raise ServerClosing("The server is shutting down.")
      self._pending.append(job)
      self._cv.notify()
    return job.future

  def stats(self) -> dict[str, int]:
    """Queued (not cancelled) and running jobs, and totals since the start."""
    with self._cv:
      queued = sum(not j.future.cancelled() for j in self._pending)
      return dict(queued=queued, running=self._running, **self._counts)

  def close(self, timeout: float) -> bool:
    """Fail the queued jobs with ``ServerClosing``, let the running call finish (up to
    ``timeout`` s); returns whether the worker stopped."""
    with self._cv:
      self._closed = True
      for job in self._pending:
        if job.future.set_running_or_notify_cancel():
          job.future.set_exception(ServerClosing("The server shut down before this request "
                                                 "was decoded; retry it."))
      self._pending.clear()
      self._cv.notify()
    if not self.stopped:
      self._thread.join(timeout)
    return self.stopped

  def _loop(self) -> None:
    while True:
      with self._cv:
        while not self._pending and not self._closed:
          self._cv.wait()
        if self._closed:
          return
        wait = self._pending[0].arrival + self.window_s - time.monotonic()
      if wait > 0:
        time.sleep(wait)
      with self._cv:
        batch = self._take()
        self._running = len(batch)
      if batch:
        self._run(batch)
      with self._cv:
        self._running = 0

  def _take(self) -> list[Job]:
    """Remove and return the oldest live job and the compatible ones after it (called with
    the lock held); cancelled jobs are dropped."""
    batch, rest = [], []
    for job in self._pending:
      if job.future.cancelled():
        self._counts["cancelled"] += 1
      elif (not batch or (len(batch) < self.max_batch and job.key == batch[0].key
                          and job.key.fits(self.model, batch + [job]))):
        if job.future.set_running_or_notify_cancel():
          batch.append(job)
        else:
          self._counts["cancelled"] += 1
      else:
        rest.append(job)
    self._pending = rest
    return batch

  def _run(self, batch: list[Job]) -> None:
    """One call for the batch; if it fails, each job alone, so only a failing one fails."""
    self._count("batches", 1)
    try:
      results = batch[0].key.run(self.model, batch)
    except Exception as e:  # pylint: disable=broad-except
      if len(batch) > 1:
        logging.exception("A batch of %d failed; running its jobs one by one.", len(batch))
        for job in batch:
          self._run([job])
        return
      logging.exception("A job failed.")
      batch[0].future.set_exception(RuntimeError(
          f"Internal error while decoding this request: {type(e).__name__}: {e}"))
      self._count("failed", 1)
      return
    for job, result in zip(batch, results):
      job.future.set_result(result)
    self._count("completed", len(batch))

  def _count(self, name: str, n: int) -> None:
    with self._cv:
      self._counts[name] += n
