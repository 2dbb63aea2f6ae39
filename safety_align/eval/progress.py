"""Progress of a long evaluation: elapsed time, steps done of the total, and an ETA.

Each step of the suite (an attack on a model, the benign set, the timing) is planned with a
cost estimate in decoded-token equivalents (``attack_cost``). The ETA is the remaining cost at
the rate measured so far on the steps that ran (stored steps cost nothing and are left out of
the rate), so it is an estimate that sharpens as the run goes; it says so until a step ran.
With ``bar``, one progress bar over the planned cost (``console.progress``) shows it instead of
a line per step.
"""

from __future__ import annotations

import time
from typing import Callable

from safety_align import console
from safety_align.attacks.base import duration, remaining


def attack_cost(attack, n_items: int, n_gates: int, max_new_tokens: int) -> float:
  """Estimated cost of one attack in decoded tokens: generations x response budget, and for
  GCG its search (steps x candidates x sequence length forward tokens, a candidate's token
  about a tenth of a decoded one: a batched forward without the per-step loop)."""
  n = min(n_items, getattr(attack, "n_prompts", 0) or n_items)
  variants = len(getattr(attack, "settings", ())) * getattr(attack, "samples", 1) or len(
      getattr(attack, "templates", ())) or 1
  cost = float(n * variants * n_gates * max_new_tokens)
  g = getattr(attack, "gcg_config", None)
  if g is not None:
    length = 48 + g.n_suffix + getattr(attack, "target_tokens", 32)
    cost += 0.1 * n * g.steps * g.search_width * length
  return cost


class Progress:
  """Planned steps with costs; ``start``/``finish`` log done/total and the ETA, or with ``bar``
  advance one progress bar (in decoded-token equivalents) over the steps."""

  def __init__(self, log: Callable[[str], None], bar: bool = False):
    self.log, self.t0 = log, time.perf_counter()
    self.planned: dict[str, float] = {}
    self.finished: set[str] = set()
    self.ran_cost, self.ran_seconds = 0.0, 0.0
    self._started: tuple[str, float] | None = None
    self._bar = None
    self._use_bar = bar

  def plan(self, name: str, cost: float) -> None:
    self.planned[name] = max(float(cost), 1.0)

  def start(self, name: str) -> None:
    self._started = (name, time.perf_counter())
    if self._use_bar:
      if self._bar is None:
        self._bar = console.progress(total=0, desc="evaluation", unit="tok")
      self._bar.total = round(sum(self.planned.values()))
      self._bar.set_postfix_str(name, refresh=False)
    self.log(f"[{len(self.finished) + 1}/{len(self.planned)}] {name}: starting; "
             + self.eta())

  def finish(self, name: str, stored: bool = False) -> None:
    """``stored``: its result came from the store (no work ran)."""
    if self._started and self._started[0] == name and not stored:
      self.ran_seconds += time.perf_counter() - self._started[1]
      self.ran_cost += self.planned[name]
    elif stored:
      self.planned[name] = 0.0
    self.finished.add(name)
    self._started = None
    if self._bar is not None:
      self._bar.total = round(sum(self.planned.values()))
      self._bar.update(round(self.planned[name]))
      if self.finished >= set(self.planned):
        self._bar.close()
        self._bar = None

  def eta(self) -> str:
    """Time left at the rate of the steps that ran (module doc)."""
    left = sum(c for n, c in self.planned.items() if n not in self.finished)
    return (f"{duration(time.perf_counter() - self.t0)} elapsed, "
            + remaining(self.ran_seconds, self.ran_cost, left))
