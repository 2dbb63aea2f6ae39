"""The README's real-model tables, regenerated from an evaluation's results.json.

  python -m safety_align.tools.readme_tables --results=runs/smollm2/eval/results.json \\
      [--readme=README.md]

Replaces the block between ``BEGIN`` and ``END`` in the README with: the attacks against every
defence (ASR with the defence on, the [CLS] model's refusals and leaks beside it), the
over-refusal per defence (look-alike-safe and everyday prompts), the first classification's
AUROC, and the utility benchmarks (``report.benchmark_table``). The figures are the
results.json ones, rounded; intervals stay in results.md.
"""

from __future__ import annotations

import json

from absl import app, flags

from safety_align.eval.report import DEFENCE_LABELS, baseline_label, benchmark_table, pct

BEGIN = "<!-- real-model-tables: python -m safety_align.tools.readme_tables -->"
END = "<!-- /real-model-tables -->"


def _cell(entry: dict | None, field: str = "asr_gate_on") -> str:
  return "–" if not entry or entry.get(field) is None else pct(entry[field])


def attack_table(results: dict) -> list[str]:
  """One row per attack: n, the [CLS] model gate off / gate on / refused / leaked, the
  source model, and each competitor baseline with its defence on (ASR in %)."""
  baselines = results.get("baselines", {})
  has_source = any("asr_no_cls" in a for a in results["attacks"].values())
  head = ["attack", "n", "[CLS] gate off", f"**[CLS] gate** ({results['gate_on']})",
          "refused (gate)", "leaked (gate)"]
  head += [baseline_label(results["baseline_no_cls"])] if has_source else []
  head += [DEFENCE_LABELS.get(n, n) for n in baselines]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for name, a in results["attacks"].items():
    row = [name, str(a["n"]), _cell(a, "asr_gate_off"), f"**{_cell(a)}**",
           _cell(a, "refused_gate_on"), _cell(a, "leak_gate_on")]
    row += [_cell(a, "asr_no_cls")] if has_source else []
    row += [_cell(e["attacks"].get(name)) for e in baselines.values()]
    lines.append("| " + " | ".join(row) + " |")
  return lines


def refusal_table(results: dict) -> list[str]:
  """Over-refusal per defence: the held-out benign prompts (look-alike-safe on real text) and
  the everyday (IFBench) requests, and the first classification's AUROC where the defence classifies."""
  rows = [(f"[CLS] gate ({results['gate_on']})", results["benign"].get("over_refusal_gate_on"),
           results.get("benign_everyday"), results.get("classifier", {}).get("auroc"))]
  bl = results.get("baseline_no_cls")
  if bl:
    rows.append((baseline_label(bl), bl.get("over_refusal"),
                 (results.get("source") or {}).get("benign_everyday"), None))
  for name, e in results.get("baselines", {}).items():
    rows.append((DEFENCE_LABELS.get(name, name), e["benign"].get("over_refusal_gate_on"),
                 e.get("benign_everyday"), (e.get("classifier") or {}).get("auroc")))
  lines = [f"| defence | held-out benign (n = {results['benign']['n']}) | everyday | "
           "first-classification AUROC |", "|---|---|---|---|"]
  for label, edgy, everyday, auroc in rows:
    daily = "–" if not everyday else f"{pct(everyday['over_refusal'])} (n = {everyday['n']})"
    lines.append(f"| {label} | {'–' if edgy is None else pct(edgy)} | {daily} | "
                 f"{'–' if auroc is None else f'{auroc:.3f}'} |")
  return lines


def block(results: dict) -> str:
  """The README block (markers included) for ``results``."""
  k = results.get("leak_min_tokens", 8)
  success = (f"not refused, or refused only after >= {k} tokens the model wrote itself"
             if results["judge"] == "not_refused" else f"harm judge {results['judge']}")
  lines = [BEGIN, "", f"ASR in % ({success}; n = attacked prompts), each defence on:", ""]
  lines += attack_table(results)
  lines += ["", "Over-refusal in % and the first classification:", ""]
  lines += refusal_table(results)
  lines += benchmark_table(results, brief=True)
  return "\n".join(lines + ["", END])


def update(readme: str, results: dict) -> str:
  """``readme`` with its block replaced; a README without the markers is a ValueError."""
  start, end = readme.find(BEGIN), readme.find(END)
  if start < 0 or end < start:
    raise ValueError(f"The README has no {BEGIN} ... {END} block: add the two markers where "
                     "the real-model tables go.")
  return readme[:start] + block(results) + readme[end + len(END):]


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  with open(f.results, encoding="utf-8") as fh:
    results = json.load(fh)
  with open(f.readme, encoding="utf-8") as fh:
    text = fh.read()
  with open(f.readme, "w", encoding="utf-8") as fh:
    fh.write(update(text, results))
  print(f"wrote {f.readme}: the real-model tables of {f.results}")


if __name__ == "__main__":
  flags.DEFINE_string("results", None, "An evaluation's results.json.")
  flags.DEFINE_string("readme", "README.md", "The README to update.")
  flags.mark_flags_as_required(["results"])
  app.run(main)
