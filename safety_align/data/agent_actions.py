"""agent-action-guard's HarmActions: agent actions labelled safe, harmful or unethical.

The dataset is ``agent_action_guard/harmactions_dataset.json`` of the ``agent-action-guard``
wheel (release 1.2.1, ``package_data.PINS``): HarmActions by Praneeth Vadlapati, "Agent
Action Guard: Safe AI Agents through Action Classifier" (Preprints 2025,
doi:10.20944/preprints202510.1415), https://github.com/Pro-GenAI/Agent-Action-Guard, licensed
CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). It is read from the wheel at run
time, never copied into this repository; only the fields named here are used.

A JSON list of objects ``{"action_id", "prompt", "manipulated_prompt", "action",
"classification", "risk_level", "flag_reason"}``: ``prompt`` the user's request to an agent
("Retrieve current weather data for New York City."), ``action`` the tool call it leads to,
``classification`` one of ``safe`` / ``harmful`` / ``unethical``, and ``manipulated_prompt``
the same request with disguised spellings ("Generate f@ke reviews ...") where the action is
not safe (equal to ``prompt`` otherwise). 1.2.1 holds 260: 119 safe, 124 harmful, 17
unethical, 138 manipulated.

``parse`` gives the source's records (label 1 for harmful and unethical, 0 for safe;
``category`` the classification); ``variants`` the disguised spelling of each request that has
one (the evaluation's ``agent_obfuscated`` attack). The source is a cross-source test source
(``real_splits.CROSS_SOURCES``): never trained on, tuned on or calibrated on.
"""

from __future__ import annotations

import json
from typing import Iterator, Sequence

from safety_align.data.real_splits import normalise_prompt
from safety_align.data.records import get, record

PACKAGE = "agent-action-guard"
MEMBER = "agent_action_guard/harmactions_dataset.json"
LABELS = {"safe": 0, "harmful": 1, "unethical": 1}


def _actions(members) -> Iterator[tuple[str, dict]]:
  """``(where, action)`` for each object of each member (``wheels.Member``)."""
  for member in members:
    try:
      items = json.loads(member.text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{member.where}:{e.lineno}: malformed JSON ({e.msg}).") from None
    if not isinstance(items, list):
      raise ValueError(f"{member.where}: expected a JSON list of actions, got "
                       f"{type(items).__name__}.")
    for i, item in enumerate(items):
      where = f"{member.where}: item {i}"
      if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object, got {type(item).__name__}.")
      kind = get(item, "classification", where)
      if kind not in LABELS:
        raise ValueError(f"{where}: classification must be one of {sorted(LABELS)}, got "
                         f"{kind!r}.")
      yield where, item


def parse(members) -> Iterator[dict]:
  """Records (without ``source``) of the request of each action, in file order."""
  for where, item in _actions(members):
    kind = item["classification"]
    yield record(get(item, "prompt", where).strip(), LABELS[kind], category=kind)


def variants(members: Sequence) -> dict[str, str]:
  """``{normalised prompt: its manipulated_prompt}`` for every action whose manipulated
  request differs from its request."""
  out = {}
  for where, item in _actions(members):
    prompt, disguised = (get(item, k, where).strip() for k in ("prompt", "manipulated_prompt"))
    if normalise_prompt(disguised) != normalise_prompt(prompt):
      out[normalise_prompt(prompt)] = disguised
  return out
