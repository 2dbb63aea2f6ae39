"""Shared by the benchmarks: interleaved best-of-N timing, the device, results and the table."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np


def n_threads() -> int:
  """CPU cores this process may use (XLA's CPU thread pool uses them all)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def on_gpu() -> bool:
  return jax.devices()[0].platform == "gpu"


def device_name() -> str:
  d = jax.devices()[0]
  return "cpu" if d.platform == "cpu" else f"{d.platform} {d.device_kind}"


def torch_device() -> str:
  """Where the PyTorch peers run: the GPU when JAX has one (and torch sees it)."""
  import torch  # pylint: disable=g-import-not-at-top
  if on_gpu() and torch.cuda.is_available():
    return "cuda"
  return "cpu"


def torch_sync():
  import torch  # pylint: disable=g-import-not-at-top
  if torch.cuda.is_available() and torch_device() == "cuda":
    torch.cuda.synchronize()


def paired_ratio(num: list[float], den: list[float]) -> float:
  """Median over timing rounds of num / den, each round's two runs back to back (samples of
  ``interleaved``): a drift of the machine's speed between rounds (10-20% on this machine)
  cancels, where a ratio of best-of-N times does not."""
  return float(np.median(np.asarray(num) / np.asarray(den)))


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1, *,
                reps_of: dict[str, int] | None = None,
                prior: dict[str, float] | None = None,
                samples: dict[str, list[float]] | None = None) -> dict[str, float]:
  """Best-of-``reps`` wall time (s) of each no-argument function, run interleaved (one of each
  per round, the order rotating) so machine load drifts hit every side alike. Each function
  must block until its work is done. ``warmup`` untimed rounds first (compilation).
  ``reps_of`` lowers the rounds of some functions (expensive peers: they run in the
  first rounds only); ``prior`` holds times already taken (e.g. an uncompiled peer's
  first call), which count in the minimum. ``samples``, if given, receives every timed
  round's time per function (for paired comparisons)."""
  names = list(fns)
  reps_of = reps_of or {}
  for _ in range(warmup):
    for name in names:
      fns[name]()
  best = {name: float("inf") for name in names}
  best.update(prior or {})
  for r in range(reps):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      if r >= reps_of.get(name, reps):
        continue
      t0 = time.perf_counter()
      fns[name]()
      elapsed = time.perf_counter() - t0
      best[name] = min(best[name], elapsed)
      if samples is not None:
        samples.setdefault(name, []).append(elapsed)
  return best


@dataclasses.dataclass
class Result:
  """One entry of bench/results.json (API.md). ``ratio`` None: not measured (``values``
  says why), written as null."""

  config: dict
  values: dict
  ratio: float | None
  target: float
  higher_is_better: bool
  device: str

  @property
  def met(self) -> bool:
    if self.ratio is None:
      return False
    return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

  def to_json(self) -> dict:
    ratio = None if self.ratio is None else float(self.ratio)
    return dict(config=self.config, values=self.values, ratio=ratio,
                target=float(self.target), higher_is_better=self.higher_is_better,
                device=self.device)


def write_results(path: str, results: dict[str, Result]) -> None:
  """Merge ``results`` into ``path`` (benchmarks not run keep their previous entries)."""
  old = {}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  old.update({k: v.to_json() for k, v in results.items()})
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(old, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def table(results: dict[str, Result]) -> str:
  """The printed summary: one row per benchmark."""
  rows = [("benchmark", "ratio", "target", "met", "device")]
  for name, r in results.items():
    op = ">=" if r.higher_is_better else "<="
    if r.ratio is None:
      rows.append((name, "not measured", f"{op} {r.target:g}", "-", r.device))
    else:
      rows.append((name, f"{r.ratio:.3f}", f"{op} {r.target:g}", "yes" if r.met else "NO",
                   r.device))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def fmt(x: float, digits: int = 4) -> float:
  return float(f"{x:.{digits}g}")
