"""A defence's overhead: the object evaluated (the [CLS] model or a baseline wrapper) timed
through its own ``generate``, gate off vs each gate, on the same prompts in one run.

Lengths are equalised by disabling EOS on every decoder the object holds (``decoders``: its
own, and those of the models it wraps) for the duration, so every row decodes to
``new_tokens`` unless the defence itself ends it (an inserted refusal under high reliance, the
probe's ``halt``); the generated tokens are counted too, so a report can compare tokens per
second where a defence shortens responses.
"""

from __future__ import annotations

import contextlib
import time
from typing import Sequence

import numpy as np

from safety_align.attacks.base import GATE_OFF

WRAPPED = ("source", "aligned", "expert")  # the models a baseline wrapper holds


def decoders(model) -> list:
  """Every decoder ``model`` decodes with: its own and its wrapped models' (``WRAPPED``)."""
  out, todo, seen = [], [model], set()
  while todo:
    m = todo.pop()
    if id(m) in seen:
      continue
    seen.add(id(m))
    d = getattr(m, "decoder", None)
    if d is not None and hasattr(d, "eos_ids") and all(d is not x for x in out):
      out.append(d)
    todo += [getattr(m, a) for a in WRAPPED if getattr(m, a, None) is not None]
  return out


@contextlib.contextmanager
def eos_disabled(model):
  """EOS off on every decoder of ``model`` (module doc); restored on exit."""
  saved = [(d, d.eos_ids) for d in decoders(model)]
  try:
    for d, eos in saved:  # same shape: the compiled programs are reused
      d.eos_ids = np.full_like(np.asarray(eos), -1)
    yield
  finally:
    for d, eos in saved:
      d.eos_ids = eos


def timing(model, prompts: Sequence[str], gates: Sequence[str], *, new_tokens: int,
           repeats: int, log=lambda m: None) -> dict[str, dict[str, float]]:
  """{"seconds": {gate: s}, "tokens": {gate: n}} of ``model.generate(prompts)`` for gate
  ``off`` and each of ``gates`` (module doc): each setting compiled first, then ``repeats``
  rounds interleaving the settings, the best time kept; ``tokens``: the response tokens one
  call generates."""
  prompts = list(prompts)
  settings = [GATE_OFF] + [g for g in gates if g != GATE_OFF]

  def call(gate):
    gens = model.generate(prompts, max_new_tokens=new_tokens, gate=gate)
    return sum(len(g.tokens) for g in gens)

  with eos_disabled(model):
    tokens = {g: call(g) for g in settings}  # compile
    best = {g: float("inf") for g in settings}
    for _ in range(repeats):
      for g in settings:
        t0 = time.perf_counter()
        call(g)
        best[g] = min(best[g], time.perf_counter() - t0)
  log("timing: " + ", ".join(f"{g} {best[g]:.3f}s ({tokens[g]} tokens)" for g in settings))
  return dict(seconds=best, tokens=tokens)
