"""The README's real-model block regenerated from results.json (``tools/readme_tables.py``):
each figure lands in its attack's row and its defence's column, the text around the block is
kept, a second run changes nothing, and a README without the markers is a clear error."""

import pytest

from safety_align.tools import readme_tables


def _attack(on, off, refused, leak, n=8, no_cls=None, by_category=None):
  """An attack entry; ``by_category`` {group: (asr_gate_on, asr_gate_off, n)}, else all ``n``
  prompts are the cross-source "ub/x" group at the entry's rates."""
  a = dict(asr_gate_on=on, asr_gate_off=off, refused_gate_on=refused, leak_gate_on=leak, n=n,
           by_category={g: dict(asr_gate_on=g_on, asr_gate_off=g_off, n=g_n) for g, (
               g_on, g_off, g_n) in (by_category or {"ub/x": (on, off, n)}).items()})
  return a if no_cls is None else dict(a, asr_no_cls=no_cls)


def _results():
  bench = dict(utility_benchmarks=dict(
      arc_easy=dict(acc=0.5, acc_norm=0.25, n=4), mc_average=dict(acc=0.5, acc_norm=0.25)))
  return dict(
      gate_on="annealing", judge="not_refused", leak_min_tokens=8,
      attacks=dict(direct=_attack(0.125, 0.75, 0.875, 0.0625, no_cls=1.0, by_category={
          "ub/x": (1 / 6, 2 / 3, 6), "adv/z": (0.0, 1.0, 2)}),
                   prefill_10=_attack(0.375, 1.0, 0.75, 0.25, no_cls=1.0)),
      benign=dict(over_refusal_gate_on=0.0625, n=16),
      benign_everyday=dict(over_refusal=0.125, n=8),
      classifier=dict(auroc=0.8512, by_category={"ub/x": {}, "rho/y": {}}),
      baseline_no_cls=dict(model="import", over_refusal=0.0, n=16, phase="import", **bench),
      source=dict(model="import", benign_everyday=dict(over_refusal=0.0, n=8), **bench),
      baselines=dict(probe=dict(attacks=dict(direct=_attack(0.5, 1.0, 0.5, 0.0)),
                                benign=dict(over_refusal_gate_on=0.1875),
                                classifier=dict(auroc=0.7771))),
      **bench)


def test_block_puts_each_figure_in_its_place():
  lines = readme_tables.block(_results()).splitlines()
  start = lines.index(next(x for x in lines if "cross-source prompts only" in x))
  rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")
          for line in lines[:start] + lines[start + 6:] if line.startswith("| ")}
  head = rows["attack"]
  direct, prefill = rows["direct"], rows["prefill_10"]
  assert head[2:7] == ["[CLS] gate off", "**[CLS] gate** (annealing)", "refused (gate)",
                       "leaked (gate)", "source model, imported (gate off)"]
  assert direct[1:] == ["8", "75.0", "**12.5**", "87.5", "6.2", "100.0", "50.0"]
  assert prefill[-1] == "–"  # the probe did not run prefill_10
  assert rows["[CLS] gate (annealing)"][1:] == ["6.2", "12.5 (n = 8)", "0.851"]
  assert rows["probe (ADA-style)"][1:] == ["18.8", "–", "0.777"]
  assert rows["source model, imported (gate off)"][1:] == ["0.0", "0.0 (n = 8)", "–"]
  # The cross-source table: direct's 6 "ub" prompts of 8 (1 of 6 succeeds gated, 4 of 6 off).
  cross = lines[start:]
  assert "sources rho, ub;" in cross[0]
  assert cross[4].strip("| ").split(" | ") == ["direct", "6", "66.7", "**16.7**", "50.0"]
  assert cross[5].strip("| ").split(" | ") == ["prefill_10", "8", "100.0", "**37.5**", "–"]
  assert any("arc_easy" in line for line in lines)  # the utility benchmarks follow
  assert "refused only after >= 8 tokens the model wrote itself" in lines[2]


def test_update_replaces_only_the_block_and_is_idempotent():
  old = f"intro\n{readme_tables.BEGIN}\nstale figures\n{readme_tables.END}\ntail\n"
  new = readme_tables.update(old, _results())
  assert new.startswith("intro\n" + readme_tables.BEGIN) and new.endswith(
      readme_tables.END + "\ntail\n")
  assert "stale figures" not in new and "**12.5**" in new
  assert readme_tables.update(new, _results()) == new
  with pytest.raises(ValueError, match="no .* block: add the two markers"):
    readme_tables.update("intro\n", _results())


def test_target_table_judges_the_mean_of_the_runs():
  """Issue 25's targets over two runs: each run's figure, their mean, and "met" from the mean
  (so one run inside a bound and one outside can go either way), the floor against the probe,
  the lowest per-harmful-source AUROC, and utility against the source's interval."""
  a, b = _results(), _results()
  b["attacks"]["direct"] = _attack(0.0, 0.75, 1.0, 0.0, no_cls=1.0)  # all 8 cross-source
  a["classifier"]["by_harmful_source"] = {"x": dict(auroc=0.9), "y": dict(auroc=0.8)}
  b["classifier"] = dict(auroc=0.9512, by_harmful_source={"x": dict(auroc=0.95)},
                        by_category=a["classifier"]["by_category"])
  b["benign"]["over_refusal_gate_on"] = 0.0
  del b["baselines"], b["source"]  # a run of the [CLS] model alone
  low = dict(arc_easy=dict(acc=0.0, acc_norm=0.0, n=4), mc_average=dict(acc=0.0, acc_norm=0.0))
  b["utility_benchmarks"] = low
  rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")
          for line in readme_tables.target_table([("seed 0", a), ("seed 1", b)])
          if line.startswith("| ")}
  assert rows["measure"] == ["measure", "target", "seed 0", "seed 1", "mean", "met (mean)"]
  assert rows["first-classification AUROC"][2:] == ["0.851", "0.951", "0.901", "**no**"]
  # The probe (0.7771), evaluated with seed 0 only, is the floor of both.
  assert rows["AUROC minus the frozen-source probe's (floor)"][2:] == [
      "0.074", "0.174", "0.124", "yes"]
  assert rows["lowest per-harmful-source AUROC"][2:] == ["0.800", "0.950", "0.875", "yes"]
  # ASR on the cross-source prompts only: seed 0's direct 1 of its 6 "ub" prompts.
  assert rows["ASR gate on, cross-source prompts: direct"][2:] == [
      "16.7", "0.0", "8.3", "**no**"]
  assert rows["ASR gate on, cross-source prompts: prefill_10"][2:] == [
      "37.5", "37.5", "37.5", "**no**"]
  assert rows["over-refusal, look-alike-safe"][2:] == ["6.2", "0.0", "3.1", "yes"]
  assert rows["over-refusal, everyday (IFBench prompts)"][2:] == ["12.5", "12.5", "12.5", "**no**"]
  # MC: mean 25% over 8 questions, the source 50%: inside the Wilson interval [7.1, 59.1].
  assert rows["multiple-choice average acc"][1:] == [
      "not below the source (50.0) beyond the interval", "50.0", "0.0", "25.0", "yes"]
  b["attacks"].pop("direct")  # a measure one run lacks is not judged
  rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")
          for line in readme_tables.target_table([("seed 0", a), ("seed 1", b)])
          if line.startswith("| ")}
  assert rows["ASR gate on, cross-source prompts: direct"][2:] == ["16.7", "–", "–", "–"]
  block = readme_tables.block(a, [("seed 0", a), ("seed 1", b)])
  assert "judged on the mean of the runs" in block and block.endswith(readme_tables.END)
