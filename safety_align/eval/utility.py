"""Self-answer NLL: the mean per-token NLL of reference answers to held-out benign prompts under
the weights a defence decodes with, teacher-forced with its gate off (``SafetyModel.score``).
With ``make demo-real``'s references (the source model's own answers) it measures fit to the
source, which a model trained on those answers improves by imitation: it is not a utility
measure (``eval.benchmarks`` is).

Reference answers (``reference_answers``): ``utility.jsonl`` ``{"prompt", "response"}`` in
``held_out_dir`` (``make demo-real`` writes the source model's own answers to held-out
in-distribution benign prompts), else the demo corpus' test-split benign pairs. A wrapper
baseline (``safety_align.defences``) is scored by its ``score``: deep alignment's tuned model;
the probe's and SafeDecoding's source (their intervention, halting or reweighting the first
tokens, acts in ``generate``).
"""

from __future__ import annotations

import os
from typing import Sequence

from safety_align.data import corpus, json_files
from safety_align.defence import Defence

FILE = "utility.jsonl"


def reference_answers(held_out_dir: str, seed: int, n: int) -> list[dict]:
  """Up to ``n`` (0: all) ``{"prompt", "response"}`` (module doc); [] when a held-out folder
  has no ``utility.jsonl`` (the evaluation then reports no self-answer NLL)."""
  if held_out_dir:
    path = os.path.join(held_out_dir, FILE)
    rows = [r for _, r in json_files.iter_jsonl(path)] if os.path.isfile(path) else []
  else:
    rows = [p for p in corpus.sft_pairs("test", seed=seed) if p["label"] == 0]
  for i, r in enumerate(rows):
    if not (isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str)
            and r["response"]):
      raise ValueError(f"{held_out_dir or 'the demo test split'}: utility row {i} needs a "
                       f"'prompt' and a non-empty 'response', got {r!r:.80}.")
  return [dict(prompt=r["prompt"], response=r["response"]) for r in rows][:n or None]


def self_answer_nll(model: Defence, prompts: Sequence[str], responses: Sequence[str]) -> float:
  """Mean per-token NLL of ``responses`` (their tokens, no EOS; cut to the model's maximum
  length) after ``prompts`` under ``model`` (a ``SafetyModel`` or a wrapper baseline),
  teacher-forced by ``model.score``: the model as it is deployed, gate off. On the source's
  own answers this is fit to the source, not helpfulness."""
  scores = model.score(list(prompts), list(responses), truncate=True)
  return float(-scores.logprob.sum() / max(int(scores.n_tokens.sum()), 1))
