"""The gate's overhead: the same prompts and lengths decoded plainly (a decoder without
[CLS]) and under each schedule, in one run."""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from safety_align.attacks.base import GATE_OFF


def timing(model, prompts: Sequence[str], schedules: Sequence[str], *, new_tokens: int,
           repeats: int, log=lambda m: None) -> dict[str, float]:
  """Seconds of ``generate`` for ``prompts``: ``off`` = the plain decoder (the model's weights
  as a plain LM, no [CLS]), and each schedule. EOS is disabled so every row decodes exactly
  ``new_tokens``; each setting is compiled first, then repeats interleave the settings, best
  kept."""
  import safety_align as sa  # pylint: disable=g-import-not-at-top
  common = dict(eos_ids=[], max_length=model.decoder.max_length,
                batch_size=max(len(prompts), 1))
  plain = sa.SafetyModel(model.config, model.params, model.tokenizer, model.template,
                         model.gate_defaults, uses_cls=False, **common)
  gated = sa.SafetyModel(model.config, model.params, model.tokenizer, model.template,
                         model.gate_defaults, **common)
  runs = {GATE_OFF: (plain, GATE_OFF)}
  runs.update({s: (gated, dataclasses.replace(model.gate_defaults, schedule=s))
               for s in schedules})
  for m, gate in runs.values():  # compile
    m.generate(list(prompts), max_new_tokens=new_tokens, gate=gate)
  best = {name: float("inf") for name in runs}
  for _ in range(repeats):
    for name, (m, gate) in runs.items():
      t0 = time.perf_counter()
      m.generate(list(prompts), max_new_tokens=new_tokens, gate=gate)
      best[name] = min(best[name], time.perf_counter() - t0)
  log("timing: " + ", ".join(f"{k} {v:.3f}s" for k, v in best.items()))
  return best
