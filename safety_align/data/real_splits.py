"""Honest, seeded splits of the package-data sources: records in, records out, no I/O.

``make_splits`` holds out whole sources: ``test_cross_source`` is every record of
``cross_sources`` and ``validation_source`` every record of ``validation_sources`` (the source
the recipe's ablations and choices are judged on, never trained on nor tested on); neither is
in ``train`` / ``validation`` / ``test_in_distribution``, which are seeded per-source fractions
of ``train_sources``. No normalised prompt (``normalise_prompt``) is in two splits: a prompt of
a cross-source test source is dropped from the other sources, and a prompt that several
sources share is kept once (the first source's).
``eval_group`` tells harmful, benign and over-refusal records apart for reporting;
``split_templates`` splits jailbreak templates by template.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import random
from typing import Mapping, Sequence

TRAIN_SOURCES = ("adv_bench", "airt", "ollama_harmless", "chatterbot")
CROSS_SOURCES = ("uncensorbench", "weighted_safety", "rho_refusal_benign", "rho_overrefusal",
                 "agent_action_guard")
# Sources whose benign records are safe prompts that look unsafe (over-refusal probes; the
# agent actions' safe ones are requests in the same agentic style as their harmful ones).
OVERREFUSAL_SOURCES = ("rho_overrefusal", "weighted_safety", "agent_action_guard")
SPLITS = ("train", "validation", "validation_source", "test_in_distribution", "test_cross_source")


def normalise_prompt(prompt: str) -> str:
  """The identity of a prompt for deduplication: whitespace collapsed, case folded."""
  return " ".join(prompt.split()).casefold()


def eval_group(record: dict) -> str:
  """"harmful" (label 1), "overrefusal" (a benign record of ``OVERREFUSAL_SOURCES``) or
  "benign"."""
  if record["label"] == 1:
    return "harmful"
  return "overrefusal" if record["source"] in OVERREFUSAL_SOURCES else "benign"


def _rng(seed: int, name: str) -> random.Random:
  digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
  return random.Random(int.from_bytes(digest[:8], "little"))


def make_splits(records_by_source: Mapping[str, Sequence[dict]], seed: int, *,
                train_sources: Sequence[str] = TRAIN_SOURCES,
                cross_sources: Sequence[str] = CROSS_SOURCES,
                validation_sources: Sequence[str] = (),
                validation_fraction: float = 0.1, test_fraction: float = 0.1,
                max_per_source: int | None = 5000) -> dict[str, list[dict]]:
  """``{split: records}`` for each of ``SPLITS`` (``validation_source`` empty without
  ``validation_sources``).

  Args:
    records_by_source: ``{source: records}`` (``package_data.load_all``); records need
      ``"prompt"``; sources in neither list are ignored.
    seed: the shuffle seed; each source's order depends only on it and the source's name.
    train_sources: split into train / validation / test_in_distribution.
    cross_sources: held out whole, as test_cross_source (deduplicated, in source order).
    validation_sources: held out whole, as validation_source (after the cross sources' prompts
      are taken, before the train sources').
    validation_fraction, test_fraction: of each train source (after the cap), rounded.
    max_per_source: at most this many records of each train source are used (a seeded
      sample; caps the 33k-line harmless list); None: all.

  Records are copies, grouped by source (in the order of the source lists) and, within a train
  source, in seeded order.
  """
  roles = dict(train=train_sources, cross_source_test=cross_sources,
               validation_source=validation_sources)
  missing = [s for names in roles.values() for s in names if s not in records_by_source]
  if missing:
    raise ValueError(f"No records for sources {missing}; got {sorted(records_by_source)}.")
  for (a, names_a), (b, names_b) in itertools.combinations(roles.items(), 2):
    if set(names_a) & set(names_b):
      raise ValueError(f"Sources {sorted(set(names_a) & set(names_b))} are both {a} and {b} "
                       "sources; each source has one role.")
  if min(validation_fraction, test_fraction) < 0 or validation_fraction + test_fraction >= 1:
    raise ValueError(f"validation_fraction={validation_fraction} and test_fraction="
                     f"{test_fraction} must be >= 0 and sum to less than 1.")
  seen: set[str] = set()
  splits = {name: [] for name in SPLITS}

  def take(records, limit=None):
    taken = []
    for record in records:
      if limit is not None and len(taken) == limit:
        break
      key = normalise_prompt(record["prompt"])
      if key not in seen:
        seen.add(key)
        taken.append(dict(record))
    return taken

  for source in cross_sources:
    splits["test_cross_source"] += take(records_by_source[source])
  for source in validation_sources:
    splits["validation_source"] += take(records_by_source[source])
  for source in train_sources:
    records = list(records_by_source[source])
    _rng(seed, source).shuffle(records)
    records = take(records, max_per_source)
    n_test = round(test_fraction * len(records))
    n_validation = round(validation_fraction * len(records))
    splits["test_in_distribution"] += records[:n_test]
    splits["validation"] += records[n_test:n_test + n_validation]
    splits["train"] += records[n_test + n_validation:]
  return splits


def split_counts(splits: Mapping[str, Sequence[dict]]) -> dict[str, dict[str, dict[str, int]]]:
  """``{split: {source: {eval_group: count}}}``, for reports."""
  counts = {}
  for name, records in splits.items():
    by_source = collections.defaultdict(collections.Counter)
    for record in records:
      by_source[record["source"]][eval_group(record)] += 1
    counts[name] = {source: dict(c) for source, c in by_source.items()}
  return counts


def split_templates(templates: Sequence[dict], seed: int,
                    eval_fraction: float = 0.5) -> dict[str, list[dict]]:
  """``{"train", "eval"}``: a seeded ``eval_fraction`` of the templates (by ``name``) held out
  for evaluation, the rest for training augmentation; independent of the input order."""
  names = sorted(t["name"] for t in templates)
  if len(set(names)) != len(names):
    repeated = sorted(n for n, c in collections.Counter(names).items() if c > 1)
    raise ValueError(f"Template names must be unique; repeated: {repeated}.")
  if not 0 <= eval_fraction <= 1:
    raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1].")
  _rng(seed, "templates").shuffle(names)
  held_out = set(names[:round(eval_fraction * len(names))])
  return {"train": [t for t in templates if t["name"] not in held_out],
          "eval": [t for t in templates if t["name"] in held_out]}
