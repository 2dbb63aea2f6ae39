"""GCG suffix attacks as evaluation attacks (``attacks/gcg.py`` holds the optimiser).

``gcg``: the paper's setting. The suffix is searched against the model with the gate off
(``adaptive=False``: cross-entropy of the target, the item's compliant opening up to its
first harmful span, e.g. "Sure, here is how to X. Step 1: Use a"; ``base.opening``), then the
attacked query (query + suffix) is replayed through ``generate`` under every gate.
``gcg_adaptive``: the search also pushes toward benign the first classification and the
window rows the gate re-evaluates over the target (``gcg_layout.gate_windows`` with the model's own
gate settings, ``gate_defaults``, under ``GCGConfig.window_schedule``; METHOD.md section 7),
then the same replay.

A model without [CLS] (the implicit-alignment baseline, ``run_baseline``) gets its own
white-box search: plain GCG on its own layout (no [CLS] slot, no [CLS] terms), replayed with
the gate off; it does not depend on the main model's records. The search is deterministic, so
a model that decodes with the very weights of one searched before (the same ``params`` object:
the probe and SafeDecoding wrap one source model) reuses its suffixes and is only replayed; an
evaluation's ``gcg`` and ``gcg_adaptive`` share these searches (``searches``), so a baseline's
``gcg_adaptive``, which is its plain GCG, is a replay.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from safety_align.attacks import base
from safety_align.attacks import gcg as gcg_lib
from safety_align.attacks.base import Attack, GATE_OFF, eta_text, fits


def _prob(p: float) -> float | None:
  """A probability for the records (None where the model has no [CLS])."""
  return None if math.isnan(p) else float(p)


class GCGAttack(Attack):
  """``n_prompts`` items (0: all), ``target_tokens``: the target is cut to that many tokens;
  ``searches``: the searches run so far (search inputs, params by id -> (params, GCGResult)),
  a dict the attacks of one evaluation share (module doc)."""

  replays_main_records = False

  def __init__(self, config: gcg_lib.GCGConfig, *, adaptive: bool = False, n_prompts: int = 0,
               target_tokens: int = 32, searches: dict | None = None):
    self.gcg_config, self.adaptive = config, adaptive
    self.n_prompts, self.target_tokens = n_prompts, target_tokens
    self.name = "gcg_adaptive" if adaptive else "gcg"
    self._searches = {} if searches is None else searches

  def config(self):
    return dict(gcg=dataclasses.asdict(self.gcg_config), adaptive=self.adaptive,
                n_prompts=self.n_prompts, target_tokens=self.target_tokens)

  def search(self, model, items, settings, *, adaptive: bool):
    """(item, GCGResult) per attacked item, against ``model`` (its [CLS] if it has one)."""
    tok = model.tokenizer
    chosen = items[:self.n_prompts] if self.n_prompts else items
    out, t0 = [], time.perf_counter()
    for i, item in enumerate(chosen):
      # The suffix re-tokenises to itself after the query (gcg's filter): n_suffix more tokens.
      if not fits(model, item.prompt, self.gcg_config.n_suffix, settings.max_new_tokens):
        continue
      target = tok.encode(item.target)[:self.target_tokens]
      pieces = model.template.prompt_pieces(tok, item.prompt)
      result = self._search_one(model, pieces, target, adaptive)
      settings.log(f"{self.name}: prompt {i + 1}/{len(chosen)}: {result.steps_run} steps, "
                   f"loss {result.losses[0]:.3f} -> {result.best_loss:.3f}, "
                   f"P(malicious) {result.cls_probs[0]:.3f} -> {result.cls_prob:.3f}, "
                   f"window max {result.window_prob:.3f}, search success {result.success} "
                   f"({result.seconds:.1f}s); "
                   + eta_text(time.perf_counter() - t0, i + 1, len(chosen)))
      out.append((i, result))
    return out

  def _search_one(self, model, pieces, target, adaptive: bool) -> gcg_lib.GCGResult:
    """``gcg_lib.gcg`` on one item, or the result of the same search run before: same weights
    object, model config, layout, target and gate (the params are kept with the result, so
    their id is not reused while it is stored)."""
    gate = model.gate_defaults if adaptive else None
    key = (id(model.params), model.config, model.has_cls_head, self.gcg_config, adaptive, gate,
           repr(pieces), tuple(target))
    params, result = self._searches.get(key, (None, None))
    if params is not model.params:
      result = gcg_lib.gcg(model.config, model.params, model.tokenizer, pieces, target,
                           config=self.gcg_config, adaptive=adaptive, gate=gate,
                           use_cls=model.has_cls_head)
      self._searches[key] = (model.params, result)
    return result

  def _replay(self, model, found, gates, settings, **marks):
    queries = [(i, "", r.query_text, "") for i, r in found]
    extra = {i: dict(suffix=r.suffix_text, loss_initial=float(r.losses[0]),
                     loss=float(r.best_loss), cls_prob_initial=_prob(r.cls_probs[0]),
                     cls_prob=_prob(r.cls_prob), window_prob=float(r.window_prob),
                     steps=int(r.steps_run), seconds=float(r.seconds),
                     search_success=bool(r.success), **marks)
             for i, r in found}
    return base.records_with_extra(model, queries, gates, settings, extra)

  def run(self, model, items, gates, settings):
    return self._replay(model, self.search(model, items, settings, adaptive=self.adaptive),
                        gates, settings)

  def run_baseline(self, model, items, records, settings):
    """Plain GCG against this model itself (white-box; see module doc), gate off."""
    del records
    return self._replay(model, self.search(model, items, settings, adaptive=False),
                        [GATE_OFF], settings, white_box_baseline=True)

  def summary(self, records, success):
    del success
    per_item = {r.item: r.extra for r in records if "search_success" in r.extra}
    if not per_item:
      return {}
    vals = list(per_item.values())
    cls_probs = [v["cls_prob"] for v in vals if v["cls_prob"] is not None]
    return dict(search_success=float(np.mean([v["search_success"] for v in vals])),
                mean_steps=float(np.mean([v["steps"] for v in vals])),
                mean_search_seconds=float(np.mean([v["seconds"] for v in vals])),
                mean_cls_prob=float(np.mean(cls_probs)) if cls_probs else None,
                mean_window_prob=float(np.mean([v["window_prob"] for v in vals])),
                suffixes={str(i): v["suffix"] for i, v in per_item.items()})
