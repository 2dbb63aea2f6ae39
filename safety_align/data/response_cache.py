"""A resumable cache of generated responses (self-distillation targets), one JSONL line each.

``cached_responses`` generates only what its file lacks, batch by batch, and appends each
finished batch (flushed and synced), so a killed run resumes where it stopped. A line is
``{"key", "prompt", "response"}``; ``key`` (``response_key``) hashes the record's
``key_fields`` and the ``settings`` (model, sampler, ...), so changing either generates anew and
one file can hold several settings. A last line cut off mid-write is dropped and generated
again; a corrupt line elsewhere is an error naming ``file:line``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Mapping, Sequence

from absl import logging

from safety_align import console


def response_key(record: Mapping, key_fields: Sequence[str] = ("prompt",),
                 settings: Mapping | None = None) -> str:
  """The cache key of ``record``: a hash of its ``key_fields`` and of ``settings`` (JSON)."""
  payload = json.dumps({"fields": [record[k] for k in key_fields], "settings": settings},
                       sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(payload.encode()).hexdigest()


def _entry(line: bytes) -> tuple[str, str] | None:
  try:
    obj = json.loads(line)
  except ValueError:  # also UnicodeDecodeError
    return None
  if not (isinstance(obj, dict) and isinstance(obj.get("key"), str)
          and isinstance(obj.get("response"), str)):
    return None
  return obj["key"], obj["response"]


def read_cache(path: str) -> dict[str, str]:
  """``{key: response}`` of the cache file ``path`` ({} if absent). A corrupt last line (a write
  cut off by a kill) is truncated away; a corrupt line before it raises ``ValueError``."""
  if not os.path.exists(path):
    return {}
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  done, offset = {}, 0
  for i, line in enumerate(lines):
    if line.strip():
      entry = _entry(line)
      if entry is None and i < last:
        raise ValueError(f"{path}:{i + 1}: corrupt cache line (expected a JSON object with "
                         "string 'key' and 'response'); delete the line or the file.")
      if entry is None:
        logging.warning("%s:%d: dropping a line cut off mid-write; it is generated again.",
                        path, i + 1)
        with open(path, "r+b") as f:
          f.truncate(offset)
        return done
      done[entry[0]] = entry[1]
    offset += len(line) + 1
  if data and not data.endswith(b"\n"):  # killed between a line and its newline
    with open(path, "ab") as f:
      f.write(b"\n")
  return done


def cached_responses(path: str, records: Sequence[Mapping],
                     generate_fn: Callable[[list[str]], Sequence[str]], batch_size: int,
                     key_fields: Sequence[str] = ("prompt",), desc: str = "responses",
                     settings: Mapping | None = None) -> list[str]:
  """The response to each of ``records`` (in their order), generated once and cached in ``path``.

  Args:
    path: the JSONL cache (created with its folder; appended to after each batch).
    records: each needs ``"prompt"`` and the ``key_fields``.
    generate_fn: ``generate_fn(prompts) -> texts``, one text per prompt.
    batch_size: prompts per ``generate_fn`` call.
    key_fields: the record fields that identify a response (records sharing them share one).
    desc: the name on the progress bar (done/total, rate, ETA; ``console.progress``).
    settings: JSON-serialisable generation settings, part of every key.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  keys, prompts = [], {}
  for i, record in enumerate(records):
    missing = [k for k in ("prompt", *key_fields) if k not in record]
    if missing:
      raise ValueError(f"{desc}: record {i} lacks fields {missing}.")
    keys.append(response_key(record, key_fields, settings))
    prompts.setdefault(keys[-1], record["prompt"])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  done = read_cache(path)
  todo = [k for k in prompts if k not in done]
  total, cached = len(prompts), len(prompts) - len(todo)
  logging.vlog(1, "%s: %d/%d cached in %s", desc, cached, total, path)
  bar = console.progress(total=total, initial=cached, desc=desc, unit="answer",
                         disable=not todo)
  for first in range(0, len(todo), batch_size):
    batch = todo[first:first + batch_size]
    texts = list(generate_fn([prompts[k] for k in batch]))
    if len(texts) != len(batch) or not all(isinstance(t, str) for t in texts):
      raise ValueError(f"{desc}: generate_fn returned {len(texts)} items for {len(batch)} "
                       "prompts; expected one string per prompt.")
    with open(path, "a", encoding="utf-8") as f:
      for key, text in zip(batch, texts):
        f.write(json.dumps({"key": key, "prompt": prompts[key], "response": text},
                           ensure_ascii=False) + "\n")
      f.flush()
      os.fsync(f.fileno())
    done.update(zip(batch, texts))
    bar.update(len(batch))
  bar.close()
  return [done[k] for k in keys]
