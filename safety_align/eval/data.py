"""The held-out prompts an evaluation runs on: the demo corpus' test split, or a folder of
JSONL files (``make demo-real`` writes one)."""

from __future__ import annotations

import os

from safety_align.attacks.base import Item
from safety_align.data import corpus, json_files

HELD_OUT_FILES = ("malicious.jsonl", "benign.jsonl", "classifier.jsonl")


def held_out(seed: int) -> tuple[list[Item], list[str], list[dict]]:
  """(malicious items, benign prompts, all pairs) of the test split, duplicates dropped."""
  seen, pairs = set(), []
  for p in corpus.sft_pairs("test", seed=seed):
    if p["prompt"] not in seen:
      seen.add(p["prompt"])
      pairs.append(p)
  return ([Item.from_pair(p) for p in pairs if p["label"] == 1],
          [p["prompt"] for p in pairs if p["label"] == 0], pairs)


def held_out_benign(directory: str, seed: int) -> list[str]:
  """The held-out benign prompts: ``directory``'s (``held_out_files``) when given, else the
  demo corpus' test split's (``held_out(seed)``)."""
  return (held_out_files(directory) if directory else held_out(seed))[1]


def held_out_files(directory: str) -> tuple[list[Item], list[str], list[dict]]:
  """(malicious items, benign prompts, classifier pairs) from ``directory``:
  ``malicious.jsonl`` ``{"prompt", "harmful_response", "target"}`` (the prefill source and
  the GCG target), ``benign.jsonl`` ``{"prompt"}`` (over-refusal) and ``classifier.jsonl``
  ``{"prompt", "label"}``."""
  rows = {}
  for name in HELD_OUT_FILES:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"held_out_dir={directory} has no {name}: it needs "
                              f"{', '.join(HELD_OUT_FILES)} (make demo-real writes them).")
    rows[name] = [r for _, r in json_files.iter_jsonl(path)]
  items = [Item(r["prompt"], r["harmful_response"], r.get("target", ""))
           for r in rows["malicious.jsonl"]]
  return (items, [r["prompt"] for r in rows["benign.jsonl"]],
          [dict(prompt=r["prompt"], label=int(r["label"])) for r in rows["classifier.jsonl"]])


def held_out_groups(directory: str) -> dict[str, list[str]]:
  """``{"malicious", "benign", "classifier": [group of each row]}`` of ``held_out_files``'
  files, a group being ``"<source>/<category>"`` (``"<source>"`` without a category, ``""``
  without a source): the per-category breakdowns of results.json."""
  out = {}
  for name in HELD_OUT_FILES:
    rows = [r for _, r in json_files.iter_jsonl(os.path.join(directory, name))]
    out[name.split(".")[0]] = ["/".join(x for x in (str(r.get("source", "")),
                                                    str(r.get("category", ""))) if x)
                               for r in rows]
  return out
