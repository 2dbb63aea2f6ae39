"""The evaluation's plots: ``asr_by_attack.png`` (ASR per attack and gate, Wilson 95%
intervals), ``cls_trace.png`` (P(malicious) at each re-evaluation of a few gated generations)
and the trade-off curves (``tradeoff.plot``)."""

from __future__ import annotations

import os

import numpy as np

from safety_align.attacks.base import AttackedGeneration
from safety_align.config_lib import names
from safety_align.eval import tradeoff
from safety_align.stats import missing


def plot(results: dict, records: dict, out_dir: str, cfg) -> list[str]:
  """asr_by_attack.png (with the Wilson intervals) and cls_trace.png; the paths written."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  gate_on = results["gate_on"]
  attacks = results["attacks"]
  series = [("gate off", "asr_gate_off", "asr_gate_off_ci"),
            (f"gate on ({gate_on})", "asr_gate_on", "asr_gate_on_ci")]
  series += [(s, s, s) for s in names(cfg.schedules) if s != gate_on]
  if "baseline_no_cls" in results:
    series.append(("no [CLS] baseline", "asr_no_cls", "asr_no_cls_ci"))

  def get(a, field, ci_field):
    if field in a:
      return a[field], a.get(ci_field)
    return a["asr_by_gate"].get(field), a["asr_ci_by_gate"].get(ci_field)

  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(attacks) + 2), 4))
  width = 0.8 / len(series)
  for k, (label, field, ci_field) in enumerate(series):
    vals = [get(a, field, ci_field) for a in attacks.values()]
    ys = np.array([np.nan if missing(v) else 100 * v for v, _ in vals])
    err = np.array([[y - 100 * c[0], 100 * c[1] - y] if c and not np.isnan(y) else [0, 0]
                    for y, (_, c) in zip(ys, vals)]).T.reshape(2, -1)
    err = np.maximum(err, 0.0)  # a Wilson bound at 0 or 1 can round past the rate
    ax.bar(np.arange(len(attacks)) + (k - (len(series) - 1) / 2) * width, ys, width,
           yerr=err, capsize=2, label=label)
  ax.set_xticks(np.arange(len(attacks)), list(attacks), rotation=30, ha="right")
  ax.set_ylabel("attack success rate (%, Wilson 95%)")
  ax.set_ylim(0, 105)
  ax.set_title(f"ASR by attack ({results['n_malicious']} held-out malicious prompts)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths = [os.path.join(out_dir, "asr_by_attack.png")]
  fig.savefig(paths[0], dpi=120)
  plt.close(fig)

  traces = pick_traces(records, gate_on, cfg.n_traces)
  fig, ax = plt.subplots(figsize=(7, 4))
  for k, (name, r) in enumerate(traces):
    color = f"C{k}"
    ax.plot(r.cls_steps, r.cls_probs, "o-", color=color, ms=3,
            label=f"{name} #{r.item}" + (" (refused)" if r.refused else ""))
    if r.refused:
      ax.axvline(r.refusal_step, color=color, ls="--", lw=1)
    if r.n_forced:
      ax.axvspan(0, r.n_forced, color=color, alpha=0.06)
  ax.axhline(cfg.gate.threshold, color="gray", lw=0.8, ls=":")
  ax.set_xlabel("response tokens (step); dashed: refusal inserted; shaded: prefill")
  ax.set_ylabel("P(malicious)")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(f"[CLS] re-evaluations under {gate_on}")
  if traces:
    ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "cls_trace.png"))
  fig.savefig(paths[1], dpi=120)
  plt.close(fig)
  if results.get("tradeoff"):
    paths += tradeoff.plot(results["tradeoff"], out_dir)
  return paths


def pick_traces(records: dict, gate_on: str, n: int) -> list[tuple[str, AttackedGeneration]]:
  """Up to ``n`` gated generations with re-evaluations, mid-response refusals first."""
  cands = [(name, r) for name, recs in records.items() if not name.startswith("no_cls")
           and name != "benign" for r in recs if r.gate == gate_on and len(r.cls_steps) > 1]
  cands.sort(key=lambda x: (not (x[1].refused and (x[1].refusal_step or 0) > 0),
                            not x[0].startswith("prefill")))
  first = {}  # one per attack first, then the rest in order
  for name, r in cands:
    first.setdefault(name, r)
  out = list(first.items())[:n]
  out += [c for c in cands if all(c[1] is not o[1] for o in out)][:n - len(out)]
  return out
