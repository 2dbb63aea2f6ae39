"""Reading users' JSON and JSONL files, with errors that name the file and line."""

from __future__ import annotations

import json


def iter_jsonl(path: str, expected: str = ""):
  """``(where, object)`` for each non-blank line of a JSONL file; errors name file:line and,
  when given, the ``expected`` format."""
  hint = f"; expected {expected}" if expected else ""
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSON ({e.msg}){hint}.") from None
      if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
      yield where, obj


def read_json_list(path: str, what: str = "objects") -> list:
  """The JSON list in file ``path``; errors name file:line (malformed JSON) or the type found
  (``what``: what the list should hold, for the message)."""
  with open(path, encoding="utf-8") as f:
    try:
      items = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}).") from None
  if not isinstance(items, list):
    raise ValueError(f"{path}: expected a JSON list of {what}, got {type(items).__name__}.")
  return items
