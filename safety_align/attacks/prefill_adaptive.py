"""The adaptive prefill attack (METHOD.md section 7: "prefills chosen to keep P(malicious)
low"): a forced response start built token by token to continue the harmful text while the
gate's window ``[CLS]`` rows stay benign.

The prefill is the item's harmful opening (the first ``opening_tokens`` tokens of its
harmful answer, forced as they are) followed by ``n_tokens`` tokens chosen by beam search
(``width`` beams) among the model's own ``topk`` most likely next tokens. A beam's score is
the log-likelihood of its chosen tokens minus ``penalty`` x the sum, over the gate's
re-evaluations within the prefill, of -log P(benign) of the window row the gate reads there:
at each step of ``schedule`` (the model's own gate settings otherwise, ``gate_defaults``),
rule 2's latest r2 tokens if the first classification (which a prefill cannot change) is
benign, rule 1's QUERY + ``[0, r1-1]`` if it is malicious. Rule 3 windows (after an alarm) are
not modelled: the penalty keeps alarms off. Every candidate of a beam step is scored in one
forward: ``gcg_layout.build_layout`` with no suffix, the whole prefill as its target (positions not
chosen yet hold placeholders, which causal attention keeps unread) and one window row per
re-evaluation, the prompt cached once. The implicit path of a re-evaluation (later tokens read
the re-evaluated ``[CLS]``) is not modelled, as in ``gcg``.

The chosen prefill is then forced under each gate (``base.generate_records``); its window
P(malicious) trace goes into each record's ``extra``. On a model without [CLS] there is no
gate term: a plain likelihood beam (the baseline's own white-box prefill).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safety_align.attacks import base
from safety_align.attacks import gcg as gcg_lib
from safety_align.attacks import gcg_layout as layout_lib
from safety_align.attacks.base import Attack, eta_text, fits
from safety_align.config_lib import attack_sections
from safety_align.decode.gate import SCHEDULES, GateConfig
from safety_align.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class BeamResult:
  """A prefill: ``ids`` (opening then chosen tokens), ``n_opening``, ``logp`` (log-likelihood
  of the chosen tokens), ``first_prob`` (the first classification's P(malicious); NaN without
  [CLS]), and per gate re-evaluation within the prefill its ``steps`` and the ``window_probs``
  of the window read there."""

  ids: tuple[int, ...]
  n_opening: int
  logp: float
  first_prob: float
  steps: tuple[int, ...]
  window_probs: tuple[float, ...]

  @property
  def max_prob(self) -> float:
    """The largest window P(malicious) (0 without re-evaluations)."""
    return max(self.window_probs, default=0.0)


@dataclasses.dataclass
class _Beam:
  seq: list[int]
  logp: float
  penalty: float
  probs: list[float]


@functools.partial(jax.jit, static_argnames="cfg")
def _score(cfg: ModelConfig, params, cache, layout: layout_lib.Layout, responses, row):
  """For responses [B, R] in the target slots: (log-probs [B, V] of response token ``row``,
  first P(malicious) [B], window P(malicious) [B, W])."""
  b = responses.shape[0]
  tokens = jnp.broadcast_to(layout.block_tokens, (b, layout.block_tokens.shape[1]))
  tokens = tokens.at[:, layout.target_rows + 1].set(responses)
  lm, cls = layout_lib.block_forward(cfg, params, cache, layout,
                                     layout_lib.embed(cfg, params, tokens))
  logp = jax.nn.log_softmax(lm[:, layout.target_rows[row]], axis=-1)
  p_first, _, window_p, _ = layout_lib.cls_terms(layout, cls)
  return logp, p_first, window_p


def _nll_benign(p: float) -> float:
  return -math.log1p(-min(p, 1.0 - 1e-7))


def beam_prefill(cfg: ModelConfig, params, tokenizer, prompt_pieces, opening_ids: Sequence[int],
                 *, n_tokens: int, width: int, topk: int, penalty: float,
                 gate: GateConfig | None, allowed: np.ndarray, use_cls: bool = True
                 ) -> BeamResult:
  """The prefill of the module doc for one prompt.

  Args:
    cfg, params: the model. tokenizer: ``encode``/``decode`` (every chosen prefix must
      re-encode to itself, as ``generate`` encodes the prefill text).
    prompt_pieces: the prompt (``template.prompt_pieces``). opening_ids: the forced opening.
    n_tokens, width, topk, penalty: beam settings. gate: the gate whose re-evaluations are
      penalised (its schedule, r1, r2, threshold); ``None`` or ``use_cls=False``: none.
    allowed: [V] bool, tokens the beam may choose (``gcg.allowed_tokens``).
  """
  opening = [int(t) for t in opening_ids]
  if not opening:
    raise ValueError("The adaptive prefill needs a non-empty harmful opening.")
  n_open, total = len(opening), len(opening) + n_tokens
  steps = layout_lib.gate_steps(gate, total).tolist() if gate is not None and use_cls else []
  # Window rows: rule 2 at each step, then rule 1 at each step (the branch is chosen below).
  windows = layout_lib.Windows.of(
      [(False, max(0, n - gate.r2), n - 1) for n in steps]
      + [(True, 0, min(n, gate.r1) - 1) for n in steps]) if steps else None
  placeholder = opening + [opening[-1]] * n_tokens
  layout = layout_lib.build_layout(cfg, prompt_pieces, placeholder, 0, windows, use_cls)
  cache = layout_lib.prefill(cfg, params, layout)
  rows = width * topk

  def score(seqs, row):
    resp = np.tile(np.asarray(placeholder, np.int32), (rows, 1))
    for k, s in enumerate(seqs):
      resp[k, :len(s)] = s
    out = jax.device_get(_score(cfg, params, cache, layout, resp, np.int32(min(row, total - 1))))
    return [np.asarray(a[:len(seqs)]) for a in out]

  next_logp, p_first, window_p = score([opening], n_open)
  first = float(p_first[0])
  offset = len(steps) if steps and first > gate.threshold else 0  # rule 1 rows if malicious
  probs = [float(window_p[0, offset + k]) for k, n in enumerate(steps) if n <= n_open]
  beams = [_Beam(opening, 0.0, sum(map(_nll_benign, probs)), probs)]
  for length in range(n_open, total):
    cands = []  # (beam, seq, logp)
    for b, beam in enumerate(beams):
      lp = np.where(allowed, next_logp[b], -np.inf)
      kept = 0
      for t in np.argsort(-lp, kind="stable")[:8 * topk]:
        if not np.isfinite(lp[t]) or kept == topk:
          break
        seq = beam.seq + [int(t)]
        if tokenizer.encode(tokenizer.decode(seq)) == seq:
          cands.append((b, seq, beam.logp + float(lp[t])))
          kept += 1
    if not cands:
      break
    cand_logp, _, cand_window = score([c[1] for c in cands], length + 1)
    n = length + 1
    scored = []
    for k, (b, seq, logp) in enumerate(cands):
      pen, probs = beams[b].penalty, list(beams[b].probs)
      if n in steps:
        p = float(cand_window[k, offset + steps.index(n)])
        pen, probs = pen + _nll_benign(p), probs + [p]
      scored.append((logp - penalty * pen, k, _Beam(seq, logp, pen, probs)))
    scored.sort(key=lambda s: (-s[0], s[1]))
    beams = [s[2] for s in scored[:width]]
    next_logp = cand_logp[[s[1] for s in scored[:width]]]
  best = beams[0]
  return BeamResult(ids=tuple(best.seq), n_opening=n_open, logp=best.logp, first_prob=first,
                    steps=tuple(n for n in steps if n <= len(best.seq)),
                    window_probs=tuple(best.probs))


class PrefillAdaptiveAttack(Attack):
  """The adaptive prefill (module doc); settings as ``config_lib.attack_sections()``'s."""

  name = "prefill_adaptive"

  def __init__(self, *, n_prompts: int = 0, opening_tokens: int = 5, n_tokens: int = 24,
               width: int = 4, topk: int = 8, penalty: float = 2.0,
               schedule: str = "annealing"):
    for key, value in dict(opening_tokens=opening_tokens, n_tokens=n_tokens, width=width,
                           topk=topk).items():
      if value < 1:
        raise ValueError(f"prefill_adaptive.{key} must be >= 1, got {value}.")
    if n_prompts < 0 or penalty < 0:
      raise ValueError("prefill_adaptive.n_prompts and penalty must be >= 0.")
    if schedule not in SCHEDULES:
      raise ValueError(f"prefill_adaptive.schedule={schedule!r}: expected one of {SCHEDULES}.")
    self.n_prompts, self.opening_tokens, self.n_tokens = n_prompts, opening_tokens, n_tokens
    self.width, self.topk, self.penalty, self.schedule = width, topk, penalty, schedule

  @classmethod
  def from_config(cls, cfg) -> "PrefillAdaptiveAttack":
    section = base.section_settings(cfg, "prefill_adaptive", attack_sections()["prefill_adaptive"])
    return cls(**section)

  def config(self):
    return dict(n_prompts=self.n_prompts, opening_tokens=self.opening_tokens,
                n_tokens=self.n_tokens, width=self.width, topk=self.topk,
                penalty=self.penalty, schedule=self.schedule)

  def search(self, model, items, settings) -> list[tuple[int, BeamResult]]:
    """(item, BeamResult) per attacked item (items without a long enough harmful answer, or
    whose prefill does not fit the model's length, are left out)."""
    tok = model.tokenizer
    gate = (dataclasses.replace(model.gate_defaults, schedule=self.schedule)
            if model.has_cls_head else None)
    allowed = gcg_lib.allowed_tokens(tok, model.config.vocab_size, allow_non_ascii=True)
    chosen = items[:self.n_prompts] if self.n_prompts else items
    out, t0 = [], time.perf_counter()
    for i, item in enumerate(chosen):
      ids = tok.encode(item.harmful_response)
      if len(ids) < self.opening_tokens or not fits(
          model, item.prompt, self.opening_tokens + self.n_tokens, settings.max_new_tokens):
        continue
      result = beam_prefill(
          model.config, model.params, tok, model.template.prompt_pieces(tok, item.prompt),
          tok.encode(tok.decode(ids[:self.opening_tokens])), n_tokens=self.n_tokens,
          width=self.width, topk=self.topk, penalty=self.penalty, gate=gate, allowed=allowed,
          use_cls=model.has_cls_head)
      settings.log(f"{self.name}: prompt {i + 1}/{len(chosen)}: {len(result.ids)} prefill "
                   f"tokens, window P(malicious) max {result.max_prob:.3f}; "
                   + eta_text(time.perf_counter() - t0, i + 1, len(chosen)))
      out.append((i, result))
    return out

  def run(self, model, items, gates, settings):
    tok = model.tokenizer
    found = self.search(model, items, settings)
    queries = [(i, "", items[i].prompt, tok.decode(list(r.ids))) for i, r in found]
    extra = {i: dict(prefill_cls_steps=list(r.steps), prefill_cls_probs=list(r.window_probs),
                     prefill_cls_max=r.max_prob,
                     first_cls_prob=None if math.isnan(r.first_prob) else r.first_prob,
                     prefill_logp=r.logp, n_opening=r.n_opening,
                     n_chosen=len(r.ids) - r.n_opening)
             for i, r in found}
    return base.records_with_extra(model, queries, gates, settings, extra)

  def summary(self, records, success):
    del success
    vals = base.item_extras(records, "prefill_cls_max")
    if not vals:
      return {}
    return dict(mean_prefill_cls_max=float(np.mean([v["prefill_cls_max"] for v in vals])),
                mean_prefill_tokens=float(np.mean([v["n_opening"] + v["n_chosen"]
                                                   for v in vals])))
