"""The record every prompt source yields, and checked access to the rows it is read from.

A prompt record is ``{"prompt", "response", "label", "target", "category"}`` (+ extra text
fields a source adds). Every error names where the row came from (``file:line``,
``<wheel>/<member>: item i``).
"""

from __future__ import annotations

import csv
from typing import Iterator


def record(prompt: str, label: int, *, response: str = "", target: str = "",
           category: str = "", **extra: str) -> dict:
  """A prompt record; ``label`` 1 malicious, 0 benign."""
  return dict(prompt=prompt, response=response, label=label, target=target,
              category=category, **extra)


def get(obj: dict, key: str, where: str, types=(str,)):
  """``obj[key]``, checked to exist and to be one of ``types``."""
  if key not in obj:
    raise ValueError(f"{where}: missing key {key!r} (the record has {sorted(obj)}).")
  value = obj[key]
  if not isinstance(value, types) or isinstance(value, bool):
    names = " or ".join(t.__name__ for t in types)
    raise ValueError(f"{where}: {key!r} must be a {names}, got {type(value).__name__}.")
  return value


def csv_rows(path: str, columns: tuple[str, ...] | None,
             n_columns: int = 1) -> Iterator[tuple[str, dict | list]]:
  """``(where, row)`` of a CSV file: a dict when ``columns`` (a header that must contain them),
  else the list of ``n_columns`` fields (no header). Blank rows are skipped."""
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f)
    header = None
    try:
      for row in reader:
        where = f"{path}:{reader.line_num}"
        if not any(cell.strip() for cell in row):
          continue
        if columns is not None and header is None:
          missing = [c for c in columns if c not in row]
          if missing:
            raise ValueError(f"{where}: the header lacks columns {missing}; expected a header "
                             f"row with {list(columns)}, got {row}.")
          header = row
          continue
        width = len(header) if header is not None else n_columns
        if len(row) != width:
          raise ValueError(f"{where}: expected {width} columns, got {len(row)} (unquoted comma "
                           "or a truncated row?).")
        yield where, dict(zip(header, row)) if header is not None else row
    except csv.Error as e:
      raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({e}).") from None
