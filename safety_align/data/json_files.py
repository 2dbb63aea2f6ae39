"""Reading users' JSON and JSONL files, with errors that name the file and line, and writing
the project's own files atomically (a reader or a killed run never sees half a file)."""

from __future__ import annotations

import json
import os


def iter_jsonl(path: str, expected: str = ""):
  """``(where, object)`` for each non-blank line of a JSONL file; errors name file:line and,
  when given, the ``expected`` format."""
  with open(path, "rb") as f:
    yield from jsonl_objects((_decode(raw, path, n) for n, raw in enumerate(f, 1)), path,
                             expected)


def jsonl_objects(lines, source: str, expected: str = ""):
  """``(where, object)`` for each non-blank one of ``lines`` (JSONL text lines, in order) of
  ``source``; errors name ``source:line`` and, when given, the ``expected`` format."""
  hint = f"; expected {expected}" if expected else ""
  for line_no, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{source}:{line_no}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: malformed JSON ({e.msg}){hint}.") from None
    if not isinstance(obj, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
    yield where, obj


def _decode(raw: bytes, path: str, line_no: int = 1) -> str:
  """``raw`` (the file from line ``line_no`` on) as text; errors name file:line and column."""
  try:
    return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
  except UnicodeDecodeError as e:
    line = line_no + raw.count(b"\n", 0, e.start)
    column = e.start - raw.rfind(b"\n", 0, e.start)
    raise ValueError(f"{path}:{line}: byte 0x{raw[e.start]:02x} at column {column} is not "
                     "valid UTF-8: save the file as UTF-8.") from None


def read_json_list(path: str, what: str = "objects") -> list:
  """The JSON list in file ``path``; errors name file:line (malformed JSON) or the type found
  (``what``: what the list should hold, for the message)."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    items = json.loads(_decode(raw, path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}).") from None
  if not isinstance(items, list):
    raise ValueError(f"{path}: expected a JSON list of {what}, got {type(items).__name__}.")
  return items


def write_atomic(path: str, data: str | bytes) -> None:
  """Write ``data`` (text as UTF-8, or bytes) to ``path`` through ``path.tmp`` and a rename."""
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data.encode("utf-8") if isinstance(data, str) else data)
  os.replace(tmp, path)


def write_json(path: str, obj, **dump_kwargs) -> None:
  """``json.dumps(obj, **dump_kwargs)`` to ``path``, atomically (``write_atomic``)."""
  write_atomic(path, json.dumps(obj, **dump_kwargs))
