"""Wheel members (``wheels.Member``) parsed as YAML, JSON or JSON lines.

Every error names ``<wheel>/<member>`` and the line or item.
"""

from __future__ import annotations

import json
from typing import Iterator

import yaml

from safety_align.data import json_files
from safety_align.data.wheels import Member

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # safe: builds plain data only


def yaml_mapping(member: Member) -> dict:
  """The YAML mapping of ``member``."""
  try:
    doc = yaml.load(member.text, Loader=_YAML_LOADER)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    raise ValueError(f"{member.where}{line}: malformed YAML ({getattr(e, 'problem', e)}).") \
        from None
  if not isinstance(doc, dict):
    raise ValueError(f"{member.where}: expected a YAML mapping, got {type(doc).__name__}.")
  return doc


def json_doc(member: Member, drop: tuple[str, ...] = ()):
  """The JSON document of ``member``; keys in ``drop`` are discarded as each object is built."""
  hook = lambda pairs: {k: v for k, v in pairs if k not in drop}  # noqa: E731
  try:
    return json.loads(member.text, object_pairs_hook=hook)
  except json.JSONDecodeError as e:
    raise ValueError(f"{member.where}:{e.lineno}: malformed JSON ({e.msg}).") from None


def objects(items: list, where: str) -> Iterator[tuple[str, dict]]:
  """``(where: item i, item)``, each checked to be an object."""
  for i, item in enumerate(items):
    item_where = f"{where}: item {i}"
    if not isinstance(item, dict):
      raise ValueError(f"{item_where}: expected an object, got {type(item).__name__}.")
    yield item_where, item


def json_list(member: Member, drop: tuple[str, ...] = ()) -> Iterator[tuple[str, dict]]:
  """``(where, object)`` of a member holding a JSON list of objects."""
  items = json_doc(member, drop)
  if not isinstance(items, list):
    raise ValueError(f"{member.where}: expected a JSON list of objects, got "
                     f"{type(items).__name__}.")
  return objects(items, member.where)


def jsonl(member: Member) -> Iterator[tuple[str, dict]]:
  """``(where, object)`` of each line of a JSON-lines member."""
  return json_files.jsonl_objects(member.text.split("\n"), member.where)
