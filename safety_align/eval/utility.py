"""Utility: the mean per-token NLL of reference answers to held-out benign prompts under the
weights a defence decodes with, teacher-forced with its gate off.

Reference answers (``reference_answers``): ``utility.jsonl`` ``{"prompt", "response"}`` in
``held_out_dir`` (``make demo-real`` writes the source model's own answers to held-out
in-distribution benign prompts), else the demo corpus' test-split benign pairs. A wrapper
baseline (``safety_align.baselines``) is scored through its ``decoder`` and ``params``: deep
alignment's are its fine-tuned model's; the probe's and SafeDecoding's are the source's (their
intervention, halting or reweighting the first tokens, is what over-refusal measures, as the
[CLS] gate's is).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from safety_align.api import resolve_gate
from safety_align.attacks.base import GATE_OFF
from safety_align.data import corpus, json_files
from safety_align.decode import Prompts

FILE = "utility.jsonl"
CHUNK = 16  # rows per teacher-forced decoder call


def reference_answers(held_out_dir: str, seed: int, n: int) -> list[dict]:
  """Up to ``n`` (0: all) ``{"prompt", "response"}`` (module doc); [] when a held-out folder
  has no ``utility.jsonl`` (the evaluation then reports no utility)."""
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


def response_nll(model, prompts: Sequence[str], responses: Sequence[str]) -> float:
  """Mean per-token NLL of ``responses`` (forced, EOS included; cut to what fits the model's
  maximum length) after ``prompts`` under ``model`` (a ``SafetyModel`` or a wrapper
  baseline), gate off (``api.resolve_gate``)."""
  tok = model.tokenizer
  gate = resolve_gate(GATE_OFF, model.gate_defaults, model.has_cls_head)
  total, count = 0.0, 0
  for first in range(0, len(prompts), CHUNK):
    chunk = slice(first, first + CHUNK)
    pieces = [model.template.prompt_pieces(tok, p) for p in prompts[chunk]]
    encoded = Prompts.from_pieces(pieces)
    forced = [(tok.encode(r) + [tok.eos_id])[:_room(model, pc)]
              for r, pc in zip(responses[chunk], pieces)]
    res = model.decoder(model.params, encoded, max_new_tokens=1, gate=gate, prefill=forced,
                        return_logits=True)
    for i, ids in enumerate(forced):
      logits = np.asarray(res.logits[i, :len(ids)], np.float64)
      logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
      total -= float(logp[np.arange(len(ids)), ids].sum())
      count += len(ids)
  return total / max(count, 1)


def _room(model, pieces) -> int | None:
  """Response tokens that fit after a prompt (its pieces, [CLS] included) and one generated
  token; None without a maximum length."""
  limit = model.decoder.max_length
  if not limit:
    return None
  room = limit - sum(len(ids) for ids, _ in pieces) - 2
  if room < 1:
    raise ValueError(f"A utility prompt of {limit - room - 2} tokens leaves no room for its "
                     f"answer in the model's maximum length of {limit} tokens.")
  return room
