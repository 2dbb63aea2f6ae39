"""What the model object's calls take and give: their results (``Generation``, ``Rendered``),
the checks of their arguments (``check_arg``, ``texts``), the one meaning of a public ``gate``
(``resolve_gate``), per-row samplers (``sampler_of``) and their key stream (``sampling_key``), and
how prompts are split into decoder calls (``chunks``). ``SafetyModel`` (``safety_model.py``) and the defences built around it use
these; ``api`` re-exports the public ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from safety_align.decode import SCHEDULES, GateConfig, Prompts, bucket, make_sampler
from safety_align.decode.sampling import PerRow, row_keys

SHORT_TOKENS = 512  # prompt + response length up to which a decoder call takes a whole batch
NO_CLS = ("needs the [CLS] embedding and head, which this checkpoint lacks; use gate='off', "
          "or import it with `python -m safety_align.convert import_hf` and train it.")


@dataclasses.dataclass(frozen=True)
class Generation:
  """One response. ``text``/``tokens``: the response only (forced prefill included, EOS
  excluded). ``refusal_step``: token index in the response where the inserted refusal prefix
  starts. ``cls_probs``/``cls_steps``: P(malicious) at each evaluation and its step (the number
  of response tokens it could read; 0 is the first classification of the query). ``gate``: the
  gate settings it was decoded with (``resolve_gate``'s)."""

  text: str
  tokens: list[int]
  refused: bool
  refusal_step: int | None
  cls_probs: list[float]
  cls_steps: list[int]
  gate: GateConfig | None = None
  logits: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Rendered:
  """A chat through the template: prompt ``ids`` and their ``roles`` (``masks.Role``), and
  ``prefill_ids``, the forced start of the response (a final assistant message)."""

  ids: list[int]
  roles: list[int]
  prefill_ids: list[int]


def texts(name: str, values) -> list[str]:
  """``values`` as a list of strings; a TypeError says what was passed instead."""
  if isinstance(values, str):
    raise TypeError(f"{name} must be a list of strings, not one string: wrap it, "
                    f"{name}=[{values[:40]!r}].")
  try:
    values = list(values)
  except TypeError:
    raise TypeError(f"{name} must be a list of strings, got {type(values).__name__}.") from None
  for i, v in enumerate(values):
    if not isinstance(v, str):
      raise TypeError(f"{name}[{i}] is {type(v).__name__}, not str: {name} must be a list of "
                      "strings.")
  return values


def is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# generate()'s numeric arguments: (type test, range test, what is expected).
_ARGS = {
    "max_new_tokens": (is_int, lambda v: v >= 1, "an integer >= 1"),
    "temperature": (is_number, lambda v: math.isfinite(v) and v >= 0,
                    "a finite number >= 0 (0 = greedy)"),
    "top_k": (is_int, lambda v: v >= 0, "an integer >= 0 (0 = no limit)"),
    "top_p": (is_number, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "seed": (is_int, lambda v: True, "an integer"),
}


def check_arg(name: str, value) -> None:
  """Raise (TypeError: wrong type, ValueError: out of range) unless ``value`` is what
  ``generate``'s numeric argument ``name`` takes; the generate CLI checks its flags with it."""
  is_type, in_range, expected = _ARGS[name]
  if not is_type(value):
    raise TypeError(f"{name} must be {expected}, got {value!r}.")
  if not in_range(value):
    raise ValueError(f"{name} must be {expected}, got {value!r}.")


def resolve_gate(gate: str | GateConfig | None, defaults: GateConfig,
                 has_cls: bool) -> GateConfig:
  """The decoder's ``GateConfig`` for a public ``gate``: ``defaults`` (None), a schedule name
  applied to ``defaults``, or a full ``GateConfig``. The one meaning of ``off`` (``generate``, the
  server, the evaluation): the gate never acts, no re-evaluation and no inserted refusal. A
  model with [CLS] still reads it in the prompt pass, the implicit path it was trained with
  (``schedule="first", reliance="low"``); a plain LM decodes without [CLS] (the decoder's own
  ``schedule="off"``). Any other schedule needs [CLS]."""
  if gate is None:
    gate = defaults
  elif isinstance(gate, str):
    if gate not in SCHEDULES:
      raise ValueError(f"Unknown gate {gate!r}: expected one of {SCHEDULES}.")
    gate = dataclasses.replace(defaults, schedule=gate)
  elif not isinstance(gate, GateConfig):
    raise TypeError(f"gate must be a schedule name {SCHEDULES} or a GateConfig, got "
                    f"{type(gate).__name__}.")
  if gate.schedule == "off":
    return dataclasses.replace(gate, schedule="first", reliance="low") if has_cls else gate
  if not has_cls:
    raise ValueError(f"gate={gate.schedule!r} {NO_CLS}")
  return gate


def sampler_of(sampling: Sequence[Any] | None, n: int, shared: tuple[float, int, float]):
  """``rows -> sampler`` of one decoder call: the shared settings' sampler, or each row's own
  (``sampling``, checked like ``generate``'s arguments)."""
  if sampling is None:
    sampler = make_sampler(*shared)
    return lambda rows: sampler
  if shared != (0.0, 0, 1.0):
    raise ValueError("Give either per-prompt sampling or temperature/top_k/top_p, not both.")
  sampling = list(sampling)
  if len(sampling) != n:
    raise ValueError(f"{len(sampling)} sampling settings for {n} prompts: give one per prompt.")
  for i, s in enumerate(sampling):
    for name in ("temperature", "top_k", "top_p"):
      if not hasattr(s, name):
        raise TypeError(f"sampling[{i}] has no {name}: give objects with temperature, top_k "
                        "and top_p (e.g. attacks.decoding.Setting).")
      check_arg(name, getattr(s, name))
  return lambda rows: PerRow.of([sampling[i] for i in rows])


def sampling_key(seed: int, row: int, step: int):
  """The PRNG key prompt ``row`` of a decode with ``seed`` samples its response token ``step``
  with (a defence that samples outside the decoder draws from the same stream)."""
  return row_keys(seed, np.array([row]), step)[0]


def chunks(lengths: np.ndarray, size: int) -> list[range]:
  """Consecutive row ranges of at most ``size`` rows (``lengths`` [N] tokens each) whose rows x
  bucketed length^2 stays within ``size`` x ``SHORT_TOKENS``^2: the prompt pass's dense
  attention scores ([rows, heads, T, T]) of long prompts fit in the memory of a batch of short
  ones, and short prompts keep whole batches."""
  chunks, start, longest = [], 0, 0
  for i, n in enumerate(np.asarray(lengths)):
    longest = max(longest, bucket(int(n)))
    rows = i - start + 1
    if rows > size or (rows > 1 and rows * longest ** 2 > size * SHORT_TOKENS ** 2):
      chunks.append(range(start, i))
      start, longest = i, bucket(int(n))
  return chunks + [range(start, len(lengths))]


def select(prompts: Prompts, rows) -> Prompts:
  return Prompts(ids=tuple(prompts.ids[i] for i in rows),
                 roles=tuple(prompts.roles[i] for i in rows))


def token_ids(token_ids, vocab_size: int) -> np.ndarray:
  """``token_ids`` as [B, T] int32, checked (T > 0, ids in the vocabulary: no [CLS])."""
  ids = np.asarray(token_ids, np.int32)
  if ids.ndim != 2 or ids.shape[1] == 0:
    raise ValueError(f"token_ids must be [B, T] with T > 0, got shape {ids.shape}.")
  if ids.min() < 0 or ids.max() >= vocab_size:
    raise ValueError(f"token ids must be in [0, {vocab_size}) (no [CLS]).")
  return ids


def right_padded(ids: np.ndarray) -> np.ndarray:
  """[B, T] padded on the right to the batch and length buckets (causal: nothing before the
  padding changes)."""
  b, t = ids.shape
  padded = np.zeros((bucket(b, minimum=1), bucket(t)), np.int32)
  padded[:b, :t] = ids
  return padded
