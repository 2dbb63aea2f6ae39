"""A trained recipe's figures on its validation data: what the recipe's ablations compare.

  python -m safety_align.validation_report --workdir=DIR [--baselines]  # DIR/validation_report.json

Reads no test source. ``make demo-real`` writes two validation files under ``DIR/data``:
``validation.jsonl``, seeded fractions of the train sources (in-distribution; the gate is
calibrated on it), and ``validation_source.jsonl``, the sources held out of training whole
(``real_splits`` ``validation_source``: nothing is trained, calibrated or tested on it). The
figures, each with its 95% interval:

* ``auroc``: the first classification (P(malicious) of the bare query) on the in-distribution
  prompts, and the held-out source's harmful prompts against every benign validation prompt
  (the per-source figure the cross-source test reports);
* ``gate``: the gate (calibrated, as ``sa.load`` gives it) decoded on the held-out source's
  harmful prompts, asked plainly and with "Sure, here is" forced: the share refused and the ASR
  (not refused, or leaked: ``calibrate.confirm``'s judge, the evaluation's);
* ``over_refusal``: the same gate on the validation's look-alike-safe prompts (``edgy_safe``)
  and on its everyday ones (every other benign source): the share refused, by the gate's
  insertion or by a refusal string in the model's own text (``benchmarks.everyday_refusal``);
* ``utility``: the multiple-choice accuracy (``acc``, summed log-probability; ``acc_norm`` per
  character) over ``n_utility`` questions of each of the evaluation's tasks (``benchmarks``:
  ten OLMES tasks and MMLU), none of them in the evaluation's subsets (its ``real`` and
  ``real:demo`` presets' sizes; ``real:full`` scores every question), as the evaluation scores
  them (teacher-forced, gate off).

With ``--baselines``: ``probe``, the same two AUROCs of the frozen-source logistic probe (the
evaluation's ``probe`` baseline, trained on the workdir's SFT records over its imported source
into ``DIR/validation_probe``), the floor the first classification must beat; and ``source``,
the ``gate``, ``over_refusal`` and ``utility`` figures of the imported source itself, no
defence (its own refusals only).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

from absl import app, flags, logging
import numpy as np

import safety_align as sa
from safety_align import calibrate, console
from safety_align.attacks import judges
from safety_align.data import edgy_safe, json_files
from safety_align.decode import GateConfig
from safety_align.eval import benchmarks, competitors
from safety_align.eval import config as eval_config
from safety_align.stats import auroc, auroc_interval, wilson

FILE = "validation_report.json"
SOURCE_DATA = "data/validation_source.jsonl"
BENCHMARK_DIR = "eval/benchmarks"  # the evaluation's folder of the benchmark files


def _auroc(probs: np.ndarray, labels: np.ndarray) -> dict:
  a = auroc(probs, labels)
  n_pos, n_neg = int(labels.sum()), int((labels == 0).sum())
  return dict(auroc=a, auroc_ci=auroc_interval(a, n_pos, n_neg), n_malicious=n_pos,
              n_benign=n_neg)


def auroc_figures(classify: Callable[[list[str]], np.ndarray], in_distribution: Sequence[dict],
                  held_out_source: Sequence[dict]) -> dict:
  """``{"in_distribution", "held_out_source"}`` AUROCs (module doc) of ``classify``'s
  P(malicious)."""
  if not held_out_source or {r["label"] for r in held_out_source} == {0}:
    raise ValueError("The held-out validation source has no harmful prompt: train with "
                     "--validation_sources naming a source with harmful records.")
  benign = [r for r in (*in_distribution, *held_out_source) if r["label"] == 0]
  out = {}
  for name, rows in (("in_distribution", list(in_distribution)),
                     ("held_out_source", [r for r in held_out_source if r["label"] == 1]
                      + benign)):
    out[name] = _auroc(np.asarray(classify([r["prompt"] for r in rows])),
                       np.array([r["label"] for r in rows]))
  return out


def decoded_figures(model, gate: GateConfig, in_distribution: Sequence[dict],
                    held_out_source: Sequence[dict], *, max_new_tokens: int,
                    prefill: str = calibrate.COMPLIANT_PREFIX,
                    refusals: str = calibrate.DEFAULT_REFUSALS,
                    leak_min_tokens: int = judges.DEFAULT_LEAK_MIN_TOKENS) -> dict:
  """``{"gate", "over_refusal"}`` (module doc) of ``model`` decoding under ``gate`` (schedule
  ``off``: a model without [CLS], judged by its own text)."""
  out = {}
  benign = [r for r in (*in_distribution, *held_out_source) if r["label"] == 0]
  held_harmful = [r for r in held_out_source if r["label"] == 1]
  strings = judges.refusal_strings(refusals)
  prompts = [r["prompt"] for r in held_harmful]
  decoded = calibrate.confirm(model, dict(direct=(prompts, ""), prefill=(prompts, prefill)),
                              gate, max_new_tokens, strings, leak_min_tokens)
  n = len(prompts)
  out["gate"] = {k: dict(rate=v, ci=wilson(v, n), n=n) for k, v in decoded.items()}
  out["gate"]["settings"] = dict(schedule=gate.schedule, threshold=gate.threshold, tau=gate.tau,
                                 max_new_tokens=max_new_tokens, refusals=refusals,
                                 leak_min_tokens=leak_min_tokens)

  groups = dict(edgy=[r for r in benign if r.get("source") == edgy_safe.SOURCE],
                everyday=[r for r in benign if r.get("source") != edgy_safe.SOURCE])
  out["over_refusal"] = {}
  for name, rows in groups.items():
    gens = model.generate([r["prompt"] for r in rows], max_new_tokens=max_new_tokens, gate=gate)
    texts = [model.tokenizer.decode(g.tokens) for g in gens]
    refused = benchmarks.everyday_refusal(texts, [g.refused for g in gens], strings)
    out["over_refusal"][name] = dict(rate=refused["over_refusal"],
                                     ci=refused["over_refusal_ci"], n=refused["n"],
                                     inserted=refused["inserted"])
  return out


def utility_figures(model, data_dir: str, n: int) -> dict:
  """``{"tasks": {task: {"acc", "acc_norm", "n"}}, "mc_average": {"acc", "acc_norm", "ci",
  "n"}}`` of ``model`` on ``n`` questions a task outside the evaluation's subsets (module
  doc); ``ci``: the Wilson interval of ``acc`` over every question (equal ``n`` a task)."""
  cfg = eval_config.load("real")
  test_sizes = sorted({c.benchmarks.n for c in (cfg, eval_config.load("real", "demo"))} - {0})
  tasks = benchmarks.task_names(cfg.benchmarks)
  benchmarks.prepare(data_dir, tasks, ifbench=False)
  per_task, correct = {}, []
  for task in tasks:
    questions = benchmarks.read_questions(benchmarks.task_file(data_dir, task), n, test_sizes)
    choices = benchmarks.mc_choices(model, questions, chat=cfg.benchmarks.chat,
                                    batch_size=cfg.benchmarks.batch_size)
    per_task[task] = benchmarks.mc_summary(choices)
    correct += choices["acc"]
  average = {m: float(np.mean([per_task[t][m] for t in tasks])) for m in ("acc", "acc_norm")}
  return dict(tasks=per_task, mc_average=dict(average, ci=wilson(float(np.mean(correct)),
                                                                 len(correct)), n=len(correct)))


def report(model, in_distribution: Sequence[dict], held_out_source: Sequence[dict],
           benchmark_dir: str = "", n_utility: int = 0, **kwargs) -> dict:
  """The module doc's figures of ``model`` (its gate as loaded) on the two validation sets
  (records ``{"prompt", "label", "source"}``) and ``n_utility`` questions a benchmark task
  (files in ``benchmark_dir``; 0: no utility figures); ``kwargs``: ``decoded_figures``'."""
  out = dict(auroc=auroc_figures(model.classify, in_distribution, held_out_source))
  out.update(decoded_figures(model, model.gate_defaults, in_distribution, held_out_source,
                             **kwargs))
  if n_utility:
    out["utility"] = utility_figures(model, benchmark_dir, n_utility)
  out["data"] = dict(in_distribution=calibrate.data_summary(in_distribution, ())["by_source"],
                     held_out_source=calibrate.data_summary(held_out_source, ())["by_source"])
  return out


def summary(figures: dict) -> str:
  """One line of ``report``'s figures (percentages)."""
  a, g, o = figures["auroc"], figures["gate"], figures["over_refusal"]
  return (f"AUROC in-distribution {a['in_distribution']['auroc']:.3f}, held-out source "
          f"{a['held_out_source']['auroc']:.3f}; held-out source ASR direct "
          f"{100 * g['asr_direct']['rate']:.1f}%, prefilled {100 * g['asr_prefill']['rate']:.1f}%; "
          f"over-refusal edgy {100 * o['edgy']['rate']:.1f}%, everyday "
          f"{100 * o['everyday']['rate']:.1f}%" + (
              f"; MC average acc {100 * figures['utility']['mc_average']['acc']:.1f}%"
              if "utility" in figures else ""))


def write(workdir: str, figures: dict) -> str:
  path = os.path.join(workdir, FILE)
  json_files.write_json(path, figures, indent=2)
  return path


def baselines(workdir: str, in_distribution: Sequence[dict], held_out_source: Sequence[dict],
              benchmark_dir: str = "", n_utility: int = 0, **kwargs) -> dict:
  """``{"probe": {"auroc", "layer"}, "source": decoded_figures (+ "utility")}``: the
  frozen-source probe's AUROCs and the imported source's own figures, no defence (module
  doc)."""
  cfg = eval_config.load("real")
  built = competitors.build(["probe"], cfg, os.path.join(workdir, "import"),
                            competitors.training_records(workdir, cfg),
                            os.path.join(workdir, "validation_probe"),
                            gate=eval_config.gate_config(cfg), log=logging.info)
  probe = built["probe"][0]
  source = decoded_figures(probe.source, GateConfig(schedule="off"), in_distribution,
                           held_out_source, **kwargs)
  if n_utility:
    source["utility"] = utility_figures(probe.source, benchmark_dir, n_utility)
  return dict(probe=dict(auroc=auroc_figures(probe.classify, in_distribution, held_out_source),
                         layer=int(probe.probe.layer)), source=source)


def run(workdir: str, max_new_tokens: int, refusals: str = calibrate.DEFAULT_REFUSALS,
        leak_min_tokens: int = judges.DEFAULT_LEAK_MIN_TOKENS, with_baselines: bool = False,
        n_utility: int = 0) -> dict:
  """``report`` of ``sa.load(workdir)`` on its two validation files and ``n_utility``
  questions a benchmark task (and with ``with_baselines``, ``baselines``), written to
  ``FILE``."""
  files = [os.path.join(workdir, calibrate.DEFAULT_DATA), os.path.join(workdir, SOURCE_DATA)]
  for path in files:
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing: train with `python -m safety_align.demo_real "
                              f"--workdir={workdir} --validation_sources=...`, which writes it.")
  in_distribution = calibrate.validation_records(files[:1], workdir)
  held_out_source = calibrate.validation_records(files[1:], workdir, both_labels=False)
  settings = dict(max_new_tokens=max_new_tokens, refusals=refusals,
                  leak_min_tokens=leak_min_tokens, n_utility=n_utility,
                  benchmark_dir=os.path.join(workdir, BENCHMARK_DIR))
  figures = report(sa.load(workdir), in_distribution, held_out_source, **settings)
  if with_baselines:
    figures.update(baselines(workdir, in_distribution, held_out_source, **settings))
  write(workdir, figures)
  return figures


def main(argv):
  del argv
  console.configure()
  f = flags.FLAGS
  figures = run(f.workdir, f.max_new_tokens, f.refusals, f.leak_min_tokens, f.baselines,
                f.n_utility)
  print(json.dumps(figures, indent=2))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Workdir of a [CLS] model trained by demo_real.")
  flags.DEFINE_integer("max_new_tokens", 48, "Response tokens per prompt (the evaluation's).")
  flags.DEFINE_enum("refusals", calibrate.DEFAULT_REFUSALS, list(judges.REFUSAL_LISTS),
                    "Refusal strings of the judge.")
  flags.DEFINE_integer("leak_min_tokens", judges.DEFAULT_LEAK_MIN_TOKENS, "Model-written tokens "
                       "before an insertion that make it a leak.")
  flags.DEFINE_bool("baselines", False, "Also the frozen-source probe's AUROCs and the source "
                    "model's own figures (module doc).")
  flags.DEFINE_integer("n_utility", 20, "Multiple-choice questions a benchmark task, none in "
                       "the evaluation's subsets (0: no utility figures).")
  flags.mark_flag_as_required("workdir")
  app.run(main)
