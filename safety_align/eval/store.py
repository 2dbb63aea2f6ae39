"""Stored results of a resumable evaluation, and which checkpoint they belong to.

``ResultStore``: ``<dir>/<name>.json`` = {"key", "name", "data"}, where ``key`` hashes
everything that changes the data (settings, checkpoint fingerprint, items); ``get`` returns the
stored data when the key matches and recomputes (and stores) it otherwise. Judging is never
stored: it is redone every run on the stored generations.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

from safety_align import checkpoint, workdir
from safety_align.data import json_files


def key(payload) -> str:
  return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class ResultStore:
  """Results under ``directory``, each named and keyed (see the module doc)."""

  def __init__(self, directory: str, log: Callable[[str], None] = print):
    self.dir, self.log = directory, log
    os.makedirs(directory, exist_ok=True)

  def path(self, name: str) -> str:
    return os.path.join(self.dir, f"{name}.json")

  def has(self, name: str, payload) -> bool:
    """Whether ``get(name, payload, ...)`` would return stored data."""
    return self._load(name).get("key") == key(payload)

  def get(self, name: str, payload, compute: Callable[[], Any]):
    saved = self._load(name)
    if saved.get("key") == key(payload):
      self.log(f"{name}: stored ({self.path(name)})")
      return saved["data"]
    data = compute()
    json_files.write_json(self.path(name), {"key": key(payload), "name": name, "data": data})
    return data

  def _load(self, name: str) -> dict:
    try:
      with open(self.path(name)) as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError):
      return {}


def newest_step(path: str, phase: str) -> int | None:
  d = checkpoint.phase_dir(path, phase)
  steps = [int(s) for s in os.listdir(d) if s.isdigit()] if os.path.isdir(d) else []
  return max(steps) if steps else None


def fingerprint(path: str) -> str | None:
  """Which checkpoint ``sa.load(path)`` would load: "path:phase:step:mtime", or None."""
  for phase in workdir.INFERENCE_PHASES:
    step = newest_step(path, phase)
    if step is not None:
      mtime = os.path.getmtime(os.path.join(checkpoint.phase_dir(path, phase), str(step)))
      return f"{os.path.abspath(path)}:{phase}:{step}:{mtime:.0f}"
  return None


def require_checkpoint(path: str, what: str = "workdir") -> str:
  """``fingerprint(path)``; a clear error if ``path`` holds no loadable checkpoint."""
  if not os.path.isfile(os.path.join(path, workdir.CONFIG_FILE)):
    raise FileNotFoundError(f"{what} {path} is not a safety_align workdir (no "
                            f"{workdir.CONFIG_FILE}): train one with python -m "
                            "safety_align.train, or import one with safety_align.convert.")
  fp = fingerprint(path)
  if fp is None:
    raise FileNotFoundError(
        f"{what} {path} has no checkpoint under checkpoints/"
        f"{{{','.join(workdir.INFERENCE_PHASES)}}}: train it first "
        "(python -m safety_align.train --workdir=...).")
  return fp
