"""TFDS builders for the public datasets of the paper, read from the user's local copies.

Nothing is downloaded: each builder reads its files from a ``manual_dir`` (TFDS' manual
download mechanism). ``load(name, manual_dir, data_dir)`` prepares one (cached in
``data_dir``) and returns its records; see ``docs/datasets.md`` for where to get each file.

| builder                | ``manual_dir`` holds                                    | label |
| ---------------------- | ------------------------------------------------------- | ----- |
| ``alert``              | ``alert.jsonl`` / ``alert_adversarial.jsonl``           | 1     |
| ``lima``               | ``train.jsonl``                                         | 0     |
| ``alpaca``             | ``alpaca_data.json``                                    | 0     |
| ``adv_bench``          | ``harmful_behaviors.csv``                               | 1     |
| ``hex_phi``            | ``category_*.csv`` / ``hex_phi_with_prefix.jsonl``      | 1     |
| ``harm_bench``         | ``harmbench_behaviors_text_all.csv``                    | 1     |
| ``malicious_instruct`` | ``MaliciousInstruct.txt``                               | 1     |
| ``wiki_labeled``       | ``wiki_labeled.jsonl``                                  | 0 / 1 |

Prompt datasets yield ``{"prompt", "response", "label", "target", "category"}`` (``response``
and ``target`` are "" when the release has none; ``target`` is the compliant opening a prefill
attack forces, e.g. AdvBench's "Sure, here is ..."); ALERT's adversarial config adds
``"attack_type"``. ``wiki_labeled`` yields ``{"text", "label"}``. Each builder has one split,
``train`` (the whole release), in file order. A missing file raises ``FileNotFoundError``
naming the expected path and the download page; a malformed row raises ``ValueError`` naming
``file:line``.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import re

import tensorflow_datasets as tfds

from safety_align.data import json_files, manual_builder
from safety_align.data.manual_builder import ManualBuilder, check_files, prompt_features
from safety_align.data.records import csv_rows, get, record
from safety_align.data.tfds_prepare import prepare_and_read

_jsonl = json_files.iter_jsonl
_instructions = manual_builder.instructions


# ---------------------------------------------------------------------------------------------
# Builders (``manual_builder.ManualBuilder``; rows through ``records``: errors name file:line).


@dataclasses.dataclass
class AlertConfig(tfds.core.BuilderConfig):
  adversarial: bool = False


_ALERT_WRAP = re.compile(r"^\s*###\s*Instruction:\s*(.*?)\s*###\s*Response:\s*$", re.DOTALL)


def strip_alert_wrapping(prompt: str) -> str:
  """``"### Instruction:\\n<text>\\n### Response:\\n"`` -> ``<text>`` (others: stripped)."""
  match = _ALERT_WRAP.match(prompt)
  return match.group(1) if match else prompt.strip()


class Alert(ManualBuilder):
  """ALERT (Tedeschi et al. 2024): red-teaming prompts in 32 categories, all malicious.

  Config ``standard`` reads ``alert.jsonl``, ``adversarial`` reads ``alert_adversarial.jsonl``
  (adds ``attack_type``: suffix_injection, prefix_injection, token_manipulation, jailbreaking).
  Each line: ``{"id", "category", "prompt"[, "attack_type"]}``; the release wraps prompts in
  ``### Instruction:\\n...\\n### Response:\\n``, which is stripped.
  """

  HOMEPAGE = "https://github.com/Babelscape/ALERT (data/) or hf.co/datasets/Babelscape/ALERT"
  LAYOUT = ("  alert.jsonl              (config standard)\n"
            "  alert_adversarial.jsonl  (config adversarial)\n"
            'one JSON object per line: {"id", "category", "prompt"} (+ "attack_type").')
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(HOMEPAGE, LAYOUT)
  BUILDER_CONFIGS = [AlertConfig(name="standard"),
                     AlertConfig(name="adversarial", adversarial=True)]

  @classmethod
  def required_files(cls, config):
    return ("alert_adversarial.jsonl" if config.adversarial else "alert.jsonl",)

  def _features(self):
    return prompt_features("attack_type") if self.builder_config.adversarial \
        else prompt_features()

  def _records(self, manual_dir):
    adversarial = self.builder_config.adversarial
    path = os.path.join(manual_dir, self.required_files(self.builder_config)[0])
    for where, obj in _jsonl(path):
      extra = {"attack_type": get(obj, "attack_type", where)} if adversarial else {}
      yield record(strip_alert_wrapping(get(obj, "prompt", where)), 1,
                    category=get(obj, "category", where), **extra)


# LIMA's safety items are its refusals of harmful requests: match refusal phrases in the answer
# and harm words in the question (whole words, case-insensitive). A heuristic, **(ours)**:
# inspect ``load("lima", ..., config="unfiltered")`` minus the filtered set for your release.
SAFETY_KEYWORDS = (
    # refusals and disclaimers in the answer
    "i cannot", "i can't", "i can not", "i won't", "i will not", "i'm sorry", "i am sorry",
    "as an ai", "as a language model", "i'm not able to", "i am not able to", "unethical",
    "illegal", "harmful", "not appropriate", "inappropriate", "offensive",
    # harmful topics in the question
    "kill", "murder", "suicide", "bomb", "weapon", "explosive", "poison", "steal", "hack",
    "drugs", "racist", "sexist", "terrorist", "violence", "abuse",
)


@dataclasses.dataclass
class LimaConfig(tfds.core.BuilderConfig):
  safety_filter: bool = True
  safety_keywords: tuple[str, ...] = SAFETY_KEYWORDS


def _keyword_pattern(keywords) -> re.Pattern:
  return re.compile(r"\b(?:" + "|".join(re.escape(k) for k in keywords) + r")\b", re.IGNORECASE)


class Lima(ManualBuilder):
  """LIMA (Zhou et al. 2023): 1,000 curated conversations, benign; the first user/assistant
  turn pair of each. Config ``filtered`` (default) drops the safety items (``SAFETY_KEYWORDS``),
  as the paper did; ``unfiltered`` keeps all. ``category`` is the item's ``source``.
  """

  HOMEPAGE = "hf.co/datasets/GAIR/lima (gated: accept the terms, then download train.jsonl)"
  LAYOUT = ('  train.jsonl  one JSON object per line: {"conversations": [user, assistant, ...], '
            '"source"}')
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(HOMEPAGE, LAYOUT)
  BUILDER_CONFIGS = [LimaConfig(name="filtered"), LimaConfig(name="unfiltered",
                                                             safety_filter=False)]

  @classmethod
  def required_files(cls, config):
    return ("train.jsonl",)

  def _records(self, manual_dir):
    cfg = self.builder_config
    unsafe = _keyword_pattern(cfg.safety_keywords) if cfg.safety_filter else None
    for where, obj in _jsonl(os.path.join(manual_dir, "train.jsonl")):
      turns = get(obj, "conversations", where, (list,))
      if len(turns) < 2 or not all(isinstance(t, str) for t in turns[:2]):
        raise ValueError(f"{where}: 'conversations' must start with a user and an assistant "
                         f"turn (strings), got {len(turns)} turn(s).")
      prompt, response = turns[0], turns[1]
      if unsafe is not None and unsafe.search(prompt + "\n" + response):
        continue
      yield record(prompt, 0, response=response, category=str(obj.get("source", "")))


class Alpaca(ManualBuilder):
  """Stanford Alpaca: 52k instruction-following pairs, benign. ``prompt`` = instruction, plus
  ``"\\n\\n" + input`` when the input is non-empty; ``response`` = output."""

  HOMEPAGE = "https://github.com/tatsu-lab/stanford_alpaca (alpaca_data.json)"
  LAYOUT = ('  alpaca_data.json  a JSON list of {"instruction", "input", "output"}')
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(HOMEPAGE, LAYOUT)

  @classmethod
  def required_files(cls, config):
    return ("alpaca_data.json",)

  def _records(self, manual_dir):
    path = os.path.join(manual_dir, "alpaca_data.json")
    items = json_files.read_json_list(path)
    for i, item in enumerate(items):
      where = f"{path}: item {i}"
      if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}.")
      instruction, extra = get(item, "instruction", where), get(item, "input", where)
      prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
      yield record(prompt, 0, response=get(item, "output", where))


class AdvBench(ManualBuilder):
  """AdvBench harmful behaviours (Zou et al. 2023): 520 goals, malicious; ``target`` is the
  release's compliant opening ("Sure, here is ..."), used by prefill attacks."""

  HOMEPAGE = ("https://github.com/llm-attacks/llm-attacks "
              "(data/advbench/harmful_behaviors.csv)")
  LAYOUT = "  harmful_behaviors.csv  CSV with a header row: goal,target"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(HOMEPAGE, LAYOUT)

  @classmethod
  def required_files(cls, config):
    return ("harmful_behaviors.csv",)

  def _records(self, manual_dir):
    path = os.path.join(manual_dir, "harmful_behaviors.csv")
    for _, row in csv_rows(path, ("goal", "target")):
      yield record(row["goal"], 1, target=row["target"])


HEX_PHI_CATEGORIES = {
    1: "illegal_activity", 2: "child_abuse_content", 3: "hate_harass_violence", 4: "malware",
    5: "physical_harm", 6: "economic_harm", 7: "fraud_deception", 8: "adult_content",
    9: "political_campaigning", 10: "privacy_violation", 11: "tailored_financial_advice",
}


@dataclasses.dataclass
class HexPhiConfig(tfds.core.BuilderConfig):
  with_prefix: bool = False


class HexPhi(ManualBuilder):
  """HEx-PHI (Qi et al. 2023): 330 harmful instructions in 11 categories, malicious.

  Config ``categories`` reads ``category_<n>.csv`` (one prompt per row, no header; the public
  release omits category 2); ``category`` is the name in ``HEX_PHI_CATEGORIES``. Config
  ``with_prefix`` reads ``hex_phi_with_prefix.jsonl`` (``{"category", "prompt", "prefix"}``,
  the harmful answer openings of Qi et al. 2024's prefill attacks) into ``target``.
  """

  HOMEPAGE = "hf.co/datasets/LLM-Tuning-Safety/HEx-PHI (gated: accept the license)"
  LAYOUT = ("  category_1.csv ... category_11.csv  (config categories) one prompt per row, "
            "no header\n"
            "  hex_phi_with_prefix.jsonl           (config with_prefix) "
            '{"category", "prompt", "prefix"} per line')
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(HOMEPAGE, LAYOUT)
  BUILDER_CONFIGS = [HexPhiConfig(name="categories"),
                     HexPhiConfig(name="with_prefix", with_prefix=True)]

  @classmethod
  def required_files(cls, config):
    return ("hex_phi_with_prefix.jsonl",) if config.with_prefix else ("category_*.csv",)

  def _records(self, manual_dir):
    if self.builder_config.with_prefix:
      for where, obj in _jsonl(os.path.join(manual_dir, "hex_phi_with_prefix.jsonl")):
        yield record(get(obj, "prompt", where), 1, target=get(obj, "prefix", where),
                      category=str(get(obj, "category", where, (str, int))))
      return
    for n, path in _hex_phi_files(manual_dir):
      for _, (prompt,) in csv_rows(path, None):
        yield record(prompt, 1, category=HEX_PHI_CATEGORIES.get(n, f"category_{n}"))


def _hex_phi_files(manual_dir: str) -> list[tuple[int, str]]:
  files = []
  for path in glob.glob(os.path.join(manual_dir, "category_*.csv")):
    match = re.fullmatch(r"category_(\d+)\.csv", os.path.basename(path))
    if not match:
      raise ValueError(f"{path}: expected HEx-PHI files named category_<number>.csv.")
    files.append((int(match.group(1)), path))
  return sorted(files)


HARM_BENCH_COLUMNS = ("Behavior", "FunctionalCategory", "SemanticCategory", "Tags",
                      "ContextString", "BehaviorID")


@dataclasses.dataclass
class HarmBenchConfig(tfds.core.BuilderConfig):
  functional_categories: tuple[str, ...] = ("standard",)


class HarmBench(ManualBuilder):
  """HarmBench text behaviours (Mazeika et al. 2024), malicious. Config ``standard`` keeps the
  standard functional category (the GCG set), ``all`` adds contextual and copyright. A
  ``ContextString`` is prepended as HarmBench does (``context\\n\\n---\\n\\nbehavior``);
  ``category`` is the semantic category."""

  HOMEPAGE = ("https://github.com/centerforaisafety/HarmBench "
              "(data/behavior_datasets/harmbench_behaviors_text_all.csv)")
  LAYOUT = ("  harmbench_behaviors_text_all.csv  CSV with a header row: "
            + ",".join(HARM_BENCH_COLUMNS))
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(HOMEPAGE, LAYOUT)
  BUILDER_CONFIGS = [
      HarmBenchConfig(name="standard"),
      HarmBenchConfig(name="all", functional_categories=("standard", "contextual", "copyright")),
  ]

  @classmethod
  def required_files(cls, config):
    return ("harmbench_behaviors_text_all.csv",)

  def _records(self, manual_dir):
    keep = self.builder_config.functional_categories
    path = os.path.join(manual_dir, "harmbench_behaviors_text_all.csv")
    for _, row in csv_rows(path, ("Behavior", "FunctionalCategory", "SemanticCategory",
                              "ContextString")):
      if row["FunctionalCategory"] not in keep:
        continue
      context = row["ContextString"].strip()
      prompt = f"{context}\n\n---\n\n{row['Behavior']}" if context else row["Behavior"]
      yield record(prompt, 1, category=row["SemanticCategory"])


class MaliciousInstruct(ManualBuilder):
  """MaliciousInstruct (Huang et al. 2023, the decoding-parameter attack): 100 prompts, one
  per line, malicious."""

  HOMEPAGE = ("https://github.com/Princeton-SysML/Jailbreak_LLM "
              "(data/MaliciousInstruct.txt)")
  LAYOUT = "  MaliciousInstruct.txt  one prompt per line"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(HOMEPAGE, LAYOUT)

  @classmethod
  def required_files(cls, config):
    return ("MaliciousInstruct.txt",)

  def _records(self, manual_dir):
    with open(os.path.join(manual_dir, "MaliciousInstruct.txt"), encoding="utf-8") as f:
      for line in f:
        if line.strip():
          yield record(line.strip(), 1)


@dataclasses.dataclass
class WikiConfig(tfds.core.BuilderConfig):
  threshold: float = 0.5  # unsafe_score >= threshold -> label 1


class WikiLabeled(ManualBuilder):
  """A text dump (the paper: Wikipedia) labelled by the user's safety classifier, for the
  pretraining phase. Each line ``{"text", "label"}`` (0 / 1) or ``{"text", "unsafe_score"}``
  (a probability in [0, 1], labelled 1 when ``>= threshold``). ``docs/datasets.md`` shows how
  to label a dump with Llama-Guard-3."""

  HOMEPAGE = ("https://dumps.wikimedia.org (or hf.co/datasets/wikimedia/wikipedia), labelled "
              "by the user (docs/datasets.md)")
  LAYOUT = ('  wiki_labeled.jsonl  one JSON object per line: {"text", "label"} or '
            '{"text", "unsafe_score"}')
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(HOMEPAGE, LAYOUT)
  BUILDER_CONFIGS = [WikiConfig(name="default")]

  @classmethod
  def required_files(cls, config):
    return ("wiki_labeled.jsonl",)

  def _features(self):
    return tfds.features.FeaturesDict({"text": manual_builder.TEXT,
                                       "label": manual_builder.LABEL})

  def _records(self, manual_dir):
    threshold = self.builder_config.threshold
    for where, obj in _jsonl(os.path.join(manual_dir, "wiki_labeled.jsonl")):
      text = get(obj, "text", where)
      if "label" in obj:
        label = get(obj, "label", where, (int,))
        if label not in (0, 1):
          raise ValueError(f"{where}: label must be 0 (benign) or 1 (malicious), got {label}.")
      elif "unsafe_score" in obj:
        score = get(obj, "unsafe_score", where, (int, float))
        if not 0.0 <= score <= 1.0:
          raise ValueError(f"{where}: unsafe_score must be in [0, 1], got {score}.")
        label = int(score >= threshold)
      else:
        raise ValueError(f"{where}: needs 'label' (0/1) or 'unsafe_score' (in [0, 1]) beside "
                         "'text'.")
      yield {"text": text, "label": label}


BUILDERS: dict[str, type[ManualBuilder]] = {
    cls.name: cls for cls in (Alert, Lima, Alpaca, AdvBench, HexPhi, HarmBench,
                              MaliciousInstruct, WikiLabeled)}


# ---------------------------------------------------------------------------------------------
# Loading.


def _builder_config(cls: type[ManualBuilder], config: str | None, options: dict):
  configs = {c.name: c for c in cls.BUILDER_CONFIGS}
  name = config or next(iter(configs))
  if name not in configs:
    raise ValueError(f"{cls.name}: unknown config {name!r}; expected one of {list(configs)}.")
  base = configs[name]
  valid = [f.name for f in dataclasses.fields(base)
           if f.name not in {g.name for g in dataclasses.fields(tfds.core.BuilderConfig)}]
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(f"{cls.name}: unknown options {unknown}; this config takes {valid}.")
  return dataclasses.replace(base, **options)


def load(name: str, manual_dir: str, data_dir: str, *, config: str | None = None,
         **options) -> list[dict]:
  """Prepare (once) dataset ``name`` from the files in ``manual_dir`` and return its records.

  Args:
    name: a key of ``BUILDERS``.
    manual_dir: the folder with the dataset's files (``BUILDERS[name].LAYOUT``).
    data_dir: the TFDS data directory (prepared datasets are cached there).
    config: a builder config name (e.g. ``"adversarial"`` for ALERT); None: the first.
    **options: fields of that config to override (e.g. ``threshold=0.7`` for wiki_labeled).

  The path, size and modification time of every file and the options are part of the prepared
  config's name, so editing a file or an option prepares the dataset again.
  """
  if name not in BUILDERS:
    raise ValueError(f"Unknown dataset {name!r}: expected one of {sorted(BUILDERS)}.")
  cls = BUILDERS[name]
  cfg = _builder_config(cls, config, options)
  manual_dir = os.path.abspath(manual_dir)
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(
        f"{name}: the manual directory {manual_dir} does not exist. Download the release from "
        f"{cls.HOMEPAGE} and lay it out as:\n{cls.LAYOUT}")
  digest = hashlib.sha256(repr(sorted(options.items())).encode())
  for path in check_files(cls, cfg, manual_dir):
    stat = os.stat(path)
    digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
  cfg = dataclasses.replace(cfg, name=f"{cfg.name}_{digest.hexdigest()[:16]}")
  return prepare_and_read(cls(config=cfg, data_dir=data_dir), manual_builder.SPLIT, manual_dir)
