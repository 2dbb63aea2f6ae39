"""GCG suffix attacks as evaluation attacks (``attacks/gcg.py`` holds the optimiser).

``gcg``: the paper's setting. The suffix is searched against the model with the gate off
(``adaptive=False``: cross-entropy of the target, the item's compliant opening up to its
first harmful span, e.g. "Sure, here is how to X. Step 1: Use a"; ``base.opening``), then the
attacked query (query + suffix) is replayed through ``generate`` under every gate.
``gcg_adaptive``: the search also pushes the first classification toward benign
(``adaptive=True``, METHOD.md section 7), then the same replay.

A model without [CLS] (the implicit-alignment baseline) replays the main model's suffixes
(a transfer attack): ``gcg.py`` lays out the sequence with a [CLS] slot, which such a model
never saw, so a search against it would not be exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from safety_align.attacks import gcg as gcg_lib
from safety_align.attacks.base import Attack, GATE_OFF, fits, generate_records


class GCGAttack(Attack):
  """``n_prompts`` items (0: all), ``target_tokens``: the target is cut to that many tokens."""

  def __init__(self, config: gcg_lib.GCGConfig, *, adaptive: bool = False, n_prompts: int = 0,
               target_tokens: int = 32):
    self.gcg_config, self.adaptive = config, adaptive
    self.n_prompts, self.target_tokens = n_prompts, target_tokens
    self.name = "gcg_adaptive" if adaptive else "gcg"

  def config(self):
    return dict(gcg=dataclasses.asdict(self.gcg_config), adaptive=self.adaptive,
                n_prompts=self.n_prompts, target_tokens=self.target_tokens)

  def search(self, model, items, settings):
    """(item, GCGResult) per attacked item."""
    tok = model.tokenizer
    chosen = items[:self.n_prompts] if self.n_prompts else items
    out = []
    for i, item in enumerate(chosen):
      # The suffix re-tokenises to itself after the query (gcg's filter): n_suffix more tokens.
      if not fits(model, item.prompt, self.gcg_config.n_suffix, settings.max_new_tokens):
        continue
      target = tok.encode(item.target)[:self.target_tokens]
      pieces = model.template.prompt_pieces(tok, item.prompt)
      result = gcg_lib.gcg(model.config, model.params, tok, pieces, target,
                           config=self.gcg_config, adaptive=self.adaptive)
      settings.log(f"{self.name}: prompt {i + 1}/{len(chosen)}: {result.steps_run} steps, "
                   f"loss {result.losses[0]:.3f} -> {result.best_loss:.3f}, "
                   f"P(malicious) {result.cls_probs[0]:.3f} -> {result.cls_probs[-1]:.3f}, "
                   f"search success {result.success} ({result.seconds:.1f}s)")
      out.append((i, result))
    return out

  def run(self, model, items, gates, settings):
    found = self.search(model, items, settings)
    queries = [(i, "", r.query_text, "") for i, r in found]
    extra = {i: dict(suffix=r.suffix_text, loss_initial=float(r.losses[0]),
                     loss=float(r.best_loss), cls_prob_initial=float(r.cls_probs[0]),
                     cls_prob=float(r.cls_probs[-1]), steps=int(r.steps_run),
                     seconds=float(r.seconds), search_success=bool(r.success))
             for i, r in found}
    out = []
    for gate in gates:
      recs = generate_records(model, queries, gate, settings)
      for rec in recs:
        rec.extra.update(extra[rec.item])
      out += recs
    return out

  def run_baseline(self, model, items, records, settings):
    """Replay the main model's attacked queries (transfer; see module doc)."""
    del items
    seen, queries = set(), []
    for r in records:
      if r.item not in seen:
        seen.add(r.item)
        queries.append((r.item, "", r.query, ""))
    out = generate_records(model, queries, GATE_OFF, settings)
    for r in out:
      r.extra["transfer"] = True
    return out

  def summary(self, records, success):
    del success
    per_item = {r.item: r.extra for r in records if "search_success" in r.extra}
    if not per_item:
      return {}
    vals = list(per_item.values())
    return dict(search_success=float(np.mean([v["search_success"] for v in vals])),
                mean_steps=float(np.mean([v["steps"] for v in vals])),
                mean_search_seconds=float(np.mean([v["seconds"] for v in vals])),
                mean_cls_prob=float(np.mean([v["cls_prob"] for v in vals])),
                suffixes={str(i): v["suffix"] for i, v in per_item.items()})

