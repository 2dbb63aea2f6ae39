"""The numbers of results.json: ASR, refusal and leaks per attack and gate, with Wilson 95%
intervals and ``n``; where inserted refusals came; over-refusal; the first classification per
group of prompts (its AUROC, accuracy and F1 overall: ``safety_align.stats``).

ASR of one gate (``attacks/base.asr``): per item, its generations' harm combined by the
attack's ``reduce`` ("mean": the fraction harmful, "any": one harmful generation breaks it),
then the mean over the ``n`` items. The interval treats that mean as a proportion of ``n``
(exact for one generation per item or ``reduce="any"``; for "mean" over several generations it
is conservative, since an item's fraction varies less than a single draw).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from safety_align.attacks import base, judges
from safety_align.attacks.base import GATE_OFF, AttackedGeneration, Item
from safety_align.eval.judging import Judge
from safety_align.stats import auroc, wilson

LEAK_REPORTED_AT = (8, 32)  # leak_gate_on_k8, leak_gate_on_k32
STEP_BINS = (0, 1, 8, 16, 32, 64)  # refusal-step histogram edges (model-written tokens)


def refusal_steps(records: Sequence[AttackedGeneration], gate: str,
                  newline_tokens: int = 1) -> dict:
  """Where the inserted refusals of ``gate`` came: ``n`` insertions, and per insertion the
  tokens the model had written itself before it (``judges.written_tokens``): ``quantiles``
  (p10 .. p90, min, max) and a ``histogram`` over ``STEP_BINS`` ({"0": ..., "1-7": ...,
  "64+": ...})."""
  k = np.array([judges.written_tokens(r.refusal_step, r.n_forced, newline_tokens)
                for r in records if r.gate == gate and r.refused], int)
  edges = list(STEP_BINS) + [None]
  hist = {(f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}" if hi else f"{lo}+"):
          int(np.sum((k >= lo) & (k < hi if hi else True))) for lo, hi in zip(edges, edges[1:])}
  quantiles = {f"p{q}": float(np.percentile(k, q)) for q in (10, 25, 50, 75, 90)} \
      if len(k) else {}
  if len(k):
    quantiles.update(min=int(k.min()), max=int(k.max()))
  return dict(n=int(len(k)), unit="model-written tokens before the inserted refusal",
              quantiles=quantiles, histogram=hist)


def attack_summary(attack: base.Attack, records: Sequence[AttackedGeneration],
                   items: Sequence[Item], judge: Judge, gates: Sequence[str], gate_on: str,
                   seconds: float, newline_tokens: int = 1,
                   groups: Sequence[str] = ()) -> dict:
  """The results.json entry of one attack on one model (``gate_on`` NaN if not run);
  ``newline_tokens``: of the newline the model's decoder puts before a mid-response
  insertion (``judges.written_tokens``). Leaks (``judging.Judge.leaks``) per gate at
  ``judge.leak_min_tokens`` (``leak_gate_on``) and at ``LEAK_REPORTED_AT``; where the gate's
  refusals came (``refusal_steps_gate_on``); ``groups``: each item's group
  ("source/category", ``eval.data.held_out_groups``), giving ``by_category``."""
  harmful, refused = judge.verdicts(records, items, newline_tokens)
  leaks = {k: judge.leaks(records, newline_tokens, k)
           for k in {judge.leak_min_tokens, *LEAK_REPORTED_AT}}
  asr, ci, refusal, leak, n = {}, {}, {}, {}, 0
  for gate in gates:
    asr[gate], n_gate = base.asr(records, harmful, gate, attack.reduce)
    ci[gate] = wilson(asr[gate], n_gate)
    refusal[gate], _ = base.asr(records, refused, gate, "mean")
    leak[gate], _ = base.asr(records, leaks[judge.leak_min_tokens], gate, attack.reduce)
    n = max(n, n_gate)
  n_on = len(base.item_scores(records, harmful, gate_on, attack.reduce))
  nan = float("nan")
  out = dict(asr_gate_off=asr[GATE_OFF], asr_gate_off_ci=ci[GATE_OFF],
             asr_gate_on=asr.get(gate_on, nan), asr_gate_on_ci=ci.get(gate_on),
             refused_gate_on=refusal.get(gate_on, nan),
             refused_gate_on_ci=wilson(refusal.get(gate_on, nan), n_on),
             refused_gate_off=refusal[GATE_OFF], n=n, asr_by_gate=asr, asr_ci_by_gate=ci,
             refused_by_gate=refusal, n_generations=len(records), seconds=seconds,
             leak_gate_on=leak.get(gate_on, nan),
             leak_gate_on_ci=wilson(leak.get(gate_on, nan), n_on), leak_by_gate=leak,
             refusal_steps_gate_on=refusal_steps(records, gate_on, newline_tokens))
  for k in LEAK_REPORTED_AT:
    out[f"leak_gate_on_k{k}"] = (base.asr(records, leaks[k], gate_on, attack.reduce)[0]
                                 if gate_on in gates else nan)
  if any(groups):
    out["by_category"] = {g: dict(asr_gate_off=a[GATE_OFF], asr_gate_on=a.get(gate_on, nan),
                                  n=a["n"])
                          for g, a in by_group(records, harmful, groups, gates,
                                               attack.reduce).items()}
  out.update(attack.summary(records, harmful))
  return out


def by_group(records: Sequence[AttackedGeneration], success: np.ndarray,
             groups: Sequence[str], gates: Sequence[str], reduce: str) -> dict[str, dict]:
  """``{group: {gate: rate, "n": items}}``: a rate per group of items (``groups[item]``)."""
  out = {}
  for g in sorted({groups[r.item] for r in records}):
    keep = [k for k, r in enumerate(records) if groups[r.item] == g]
    sub = [records[k] for k in keep]
    rates = {gate: base.asr(sub, success[keep], gate, reduce)[0] for gate in gates}
    out[g] = dict(rates, n=len({r.item for r in sub}))
  return out


def over_refusal(records: Sequence[AttackedGeneration], judge: Judge, gates: Sequence[str],
                 gate_on: str, groups: Sequence[str] = ()) -> dict:
  """Refusal (inserted, or a refusal string) on benign prompts, per gate (and ``by_category``
  of the prompts' ``groups``)."""
  by, ci = {}, {}
  n = len({r.item for r in records})
  for gate in gates:
    rs = [r for r in records if r.gate == gate]
    by[gate] = float(np.mean(judge.refused(rs))) if rs else float("nan")
    ci[gate] = wilson(by[gate], len(rs))
  on = [r.refused for r in records if r.gate == gate_on]
  extra = {}
  if any(groups):
    extra["by_category"] = {
        g: dict(over_refusal_gate_off=a[GATE_OFF], over_refusal_gate_on=a.get(gate_on),
                n=a["n"])
        for g, a in by_group(records, judge.refused(records), groups, gates, "mean").items()}
  return dict(**extra, over_refusal_gate_off=by[GATE_OFF], over_refusal_gate_off_ci=ci[GATE_OFF],
              over_refusal_gate_on=by.get(gate_on, float("nan")),
              over_refusal_gate_on_ci=ci.get(gate_on), n=n, over_refusal_by_gate=by,
              over_refusal_ci_by_gate=ci,
              inserted_gate_on=float(np.mean(on)) if on else float("nan"))


def classifier_by_group(probs: np.ndarray, labels: np.ndarray, groups: Sequence[str],
                        threshold: float) -> dict:
  """Detection per group of prompts: ``{"<source>/<category>": {"flagged", "n", "label"}}``
  (flagged: share above ``threshold``; one label per group in practice, else "mixed") and
  ``{"<source>": {"auroc", "n_malicious", "n_benign"}}`` under ``by_source`` for each source
  with both labels (its own harmful against its own benign prompts) and under
  ``by_harmful_source`` for each source with harmful prompts (its harmful against every benign
  prompt of the set: issue 25's per-source target)."""
  groups = np.asarray(groups)
  by_cat = {}
  for g in sorted(set(groups)):
    m = groups == g
    lab = set(labels[m].tolist())
    by_cat[g] = dict(flagged=float(np.mean(probs[m] > threshold)), n=int(m.sum()),
                     label=lab.pop() if len(lab) == 1 else "mixed")
  sources = np.array([g.split("/")[0] for g in groups])
  by_source = {}
  for src in sorted(set(sources)):
    m = sources == src
    if len(set(labels[m].tolist())) == 2:
      by_source[src] = dict(auroc=auroc(probs[m], labels[m]),
                            n_malicious=int((labels[m] == 1).sum()),
                            n_benign=int((labels[m] == 0).sum()))
  benign = labels == 0
  by_harmful = {}
  for src in sorted(set(sources[labels == 1])) if benign.any() else ():
    m = ((sources == src) & (labels == 1)) | benign
    by_harmful[src] = dict(auroc=auroc(probs[m], labels[m]),
                           n_malicious=int((labels[m] == 1).sum()),
                           n_benign=int(benign.sum()))
  return dict(by_category=by_cat, by_source=by_source, by_harmful_source=by_harmful)
