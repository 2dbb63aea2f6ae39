"""The evaluation config's list fields: comma-separated strings; float lists also take
``start:stop:step``."""

from __future__ import annotations

import math


def names(s: str) -> list[str]:
  return [x.strip() for x in str(s).split(",") if x.strip()]


def floats(s: str) -> list[float]:
  """``"0.1,0.5"`` or ``"start:stop:step"`` (stop included)."""
  s = str(s).strip()
  if ":" in s:
    start, stop, step = (float(x) for x in s.split(":"))
    n = int(math.floor((stop - start) / step + 1e-6)) + 1
    return [round(start + i * step, 6) for i in range(n)]
  return [float(x) for x in names(s)]


def ints(s: str) -> list[int]:
  return [int(x) for x in names(s)]
