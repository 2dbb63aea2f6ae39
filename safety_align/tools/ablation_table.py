"""The README's ablation table: one row per trained variant of the recipe, from each workdir's
``validation_report.json`` (validation data only: no test prompt is read).

  python -m safety_align.tools.ablation_table \\
      --runs="recipe=runs/abl/base,top20=runs/abl/top20" [--readme=README.md]

Each row: the calibrated gate, the first classification's AUROC (in-distribution validation
and the held-out validation source, with intervals), the gate-on ASR on the held-out source's
harmful prompts (plain and "Sure, here is"-prefilled) and the over-refusal on the validation's
look-alike-safe and everyday prompts (% with Wilson 95% intervals, and the share the gate
inserted: the rest is the model's own refusals), and the multiple-choice utility (``acc``
averaged over the benchmark tasks, "–" where the report has none). Intervals are rounded
outwards. A report with baselines
(``validation_report --baselines``) adds the frozen-source probe's row (the floor) and the
source model's after its run. With ``--readme`` the block between ``BEGIN`` and ``END`` is
replaced; otherwise the table is printed.
"""

from __future__ import annotations

import json
import math
import os

from absl import app, flags

from safety_align import gate_calibration, validation_report

BEGIN = "<!-- ablation-table: python -m safety_align.tools.ablation_table -->"
END = "<!-- /ablation-table -->"
HEAD = ["variant", "gate", "AUROC in-dist.", "AUROC held-out source", "ASR direct",
        "ASR prefilled", "over-refusal edgy", "over-refusal everyday", "MC accuracy"]


def _interval(lo: float, hi: float, scale: float) -> str:
  """``[lo, hi]`` at ``scale`` steps, rounded outwards (never shown narrower than it is)."""
  digits = max(0, round(-math.log10(scale)))
  return (f"[{math.floor(lo / scale + 1e-9) * scale:.{digits}f}, "
          f"{math.ceil(hi / scale - 1e-9) * scale:.{digits}f}]")


def _auroc(entry: dict) -> str:
  return f"{entry['auroc']:.3f} {_interval(*entry['auroc_ci'], 0.01)}"


def _pct(entry: dict) -> str:
  lo, hi = entry["ci"]
  return f"{100 * entry['rate']:.1f} {_interval(100 * lo, 100 * hi, 1)}"


def _over(entry: dict) -> str:
  return f"{_pct(entry)}, {100 * entry['inserted']:.0f} inserted"


def _utility(figures: dict) -> str:
  if "utility" not in figures:
    return "–"
  u = figures["utility"]["mc_average"]
  return _pct(dict(rate=u["acc"], ci=u["ci"])) + f" (n {u['n']})"


def read(workdir: str) -> dict:
  path = os.path.join(workdir, validation_report.FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: run `python -m safety_align.validation_report "
                            f"--workdir={workdir}` first.")
  with open(path) as f:
    return json.load(f)


def row(name: str, workdir: str, v: dict) -> list[str]:
  """One table row of ``workdir``'s validation report ``v`` and calibrated gate."""
  g = v["gate"]["settings"]
  gate = f"{g['schedule']} θ {g['threshold']:.2f} τ {g['tau']}"
  if gate_calibration.read(workdir) is None:
    gate += " (uncalibrated)"
  a, gates, over = v["auroc"], v["gate"], v["over_refusal"]
  return [name, gate, _auroc(a["in_distribution"]), _auroc(a["held_out_source"]),
          _pct(gates["asr_direct"]), _pct(gates["asr_prefill"]), _over(over["edgy"]),
          _over(over["everyday"]), _utility(v)]


def baseline_rows(v: dict) -> list[list[str]]:
  """The frozen-source probe's row (its AUROCs, no gate) and the source model's (its own
  refusals, no defence)."""
  p, src = v["probe"], v["source"]
  a = p["auroc"]
  return [[f"frozen-source probe (layer {p['layer']})", "–", _auroc(a["in_distribution"]),
           _auroc(a["held_out_source"])] + ["–"] * (len(HEAD) - 4),
          ["source model, no defence", "–", "–", "–", _pct(src["gate"]["asr_direct"]),
           _pct(src["gate"]["asr_prefill"]), _pct(src["over_refusal"]["edgy"]),
           _pct(src["over_refusal"]["everyday"]), _utility(src)]]


def table(runs: list[tuple[str, str]]) -> list[str]:
  lines = ["| " + " | ".join(HEAD) + " |", "|---" * len(HEAD) + "|"]
  for name, workdir in runs:
    v = read(workdir)
    lines.append("| " + " | ".join(row(name, workdir, v)) + " |")
    if "probe" in v:
      lines += ["| " + " | ".join(r) + " |" for r in baseline_rows(v)]
  return lines


def parse_runs(spec: str, flag: str = "--runs", what: str = "WORKDIR"
               ) -> list[tuple[str, str]]:
  """``"name=workdir,name=workdir"`` as pairs (``flag``, ``what``: for the error)."""
  runs = []
  for item in filter(None, spec.split(",")):
    name, sep, workdir = item.partition("=")
    if not sep or not name or not workdir:
      raise ValueError(f"{flag} item {item!r}: expected NAME={what}.")
    runs.append((name, workdir))
  if not runs:
    raise ValueError(f"{flag} names no run: expected NAME={what}[,NAME={what}...].")
  return runs


def replace_block(text: str, lines: list[str]) -> str:
  if BEGIN not in text or END not in text:
    raise ValueError(f"The README has no {BEGIN} ... {END} block to replace.")
  head, rest = text.split(BEGIN, 1)
  return head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + rest.split(END, 1)[1]


def main(argv):
  del argv
  lines = table(parse_runs(flags.FLAGS.runs))
  if not flags.FLAGS.readme:
    print("\n".join(lines))
    return
  with open(flags.FLAGS.readme) as f:
    text = f.read()
  with open(flags.FLAGS.readme, "w") as f:
    f.write(replace_block(text, lines))


if __name__ == "__main__":
  flags.DEFINE_string("runs", None, "NAME=WORKDIR pairs, comma-separated, in row order.")
  flags.DEFINE_string("readme", "", "README to update in place ('' = print the table).")
  flags.mark_flag_as_required("runs")
  app.run(main)
