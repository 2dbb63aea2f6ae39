"""What the competitor baselines share: the wrapper over the source ``SafetyModel``, what a
``gate`` means for a baseline, token-level continuation through the source's ``decode``, and
the folder of trained artefacts.

A baseline implements ``defence.Defence`` (what the evaluation's attacks run unchanged):
``Defended`` holds the source model and forwards all of it but ``generate``; each baseline
defines ``generate`` and overrides what else it changes. ``gate``: ``"off"`` (or a ``GateConfig``
whose schedule is off) is the undefended source model, decoded as
``SafetyModel.generate(gate="off")`` does; any other schedule name turns the baseline's defence
on (which schedule does not matter: the baseline has its own). ``has_cls_head`` is False (no
baseline has a [CLS] token or head, so white-box attacks search its weights without one);
``has_classifier`` says whether ``classify`` works (the probe's).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from safety_align import calls
from safety_align.api import SCHEDULES, GateConfig, check_arg, load
from safety_align.data import json_files

SETTINGS_FILE = "settings.json"


class Defended:
  """A baseline around ``source`` (a ``SafetyModel``); subclasses set ``name`` and override
  ``generate`` (and ``classify`` with ``has_cls_head = True``)."""

  name = ""
  has_cls_head = False
  has_classifier = False

  def __init__(self, source):
    self.source = source

  @property
  def tokenizer(self):
    return self.source.tokenizer

  @property
  def template(self):
    return self.source.template

  @property
  def max_length(self):
    return self.source.max_length

  @property
  def eos_ids(self):
    return self.source.eos_ids

  @property
  def config(self):
    return self.source.config

  @property
  def params(self):
    return self.source.params

  @property
  def gate_defaults(self):
    return self.source.gate_defaults

  @property
  def batch_size(self):
    return self.source.batch_size

  def lm_logits(self, token_ids) -> np.ndarray:
    return self.source.lm_logits(token_ids)

  def score(self, prompts: Sequence[str], continuations: Sequence[str], **kwargs):
    """``SafetyModel.score`` under the weights the baseline decodes with: the source's (a
    defence that acts in ``generate``, as the probe and SafeDecoding do, leaves them as they
    are; deep alignment overrides this with its tuned model)."""
    return self.source.score(prompts, continuations, **kwargs)

  def classify(self, prompts: Sequence[str]) -> np.ndarray:
    raise ValueError(f"The {self.name} baseline has no classifier (has_classifier is "
                     "False): evaluate it without the classifier step.")


def defence_on(gate: str | GateConfig) -> bool:
  """Whether ``gate`` turns a baseline's defence on (module doc)."""
  if isinstance(gate, GateConfig):
    return gate.enabled
  if not isinstance(gate, str):
    raise TypeError(f"gate must be a schedule name {SCHEDULES} or a GateConfig, got "
                    f"{type(gate).__name__}.")
  if gate not in SCHEDULES:
    raise ValueError(f"Unknown gate {gate!r}: expected one of {SCHEDULES} ('off': the "
                     "undefended source model; any other: the baseline's defence on).")
  return gate != "off"


def samplers(sampling: Sequence[Any] | None, n: int, temperature: float, top_k: int,
             top_p: float) -> Callable[[Sequence[int]], Any]:
  """``rows -> sampler`` for decoder calls over prompt indices ``rows``: the shared settings'
  sampler, or each prompt's own (``sampling``), checked and built as ``SafetyModel.generate``
  does."""
  for name, value in dict(temperature=temperature, top_k=top_k, top_p=top_p).items():
    check_arg(name, value)
  return calls.sampler_of(sampling, n, (temperature, top_k, top_p))


def temperatures(sampling: Sequence[Any] | None, n: int, temperature: float) -> np.ndarray:
  """[n] each prompt's temperature (0: greedy)."""
  if sampling is None:
    return np.full(n, float(temperature))
  return np.array([float(s.temperature) for s in sampling])


def decode(model, prompts: Sequence[str], forced: Sequence[Sequence[int]], *,
           max_new_tokens: int | Sequence[int], seed: int, sampler_of=None,
           rows: Sequence[int] | None = None, system: str | None = None,
           return_logits: bool = False) -> list[tuple[list[int], np.ndarray | None]]:
  """Per prompt, (response tokens, forced ones included; the [N, V] logits each response
  token was chosen from, if asked) of ``model`` (a ``SafetyModel``) decoding gate off after
  the token-level prefix ``forced[i]`` (no text round trip), through ``SafetyModel.decode``.
  ``rows``: each prompt's index for the sampling keys (and ``sampler_of``), so a continuation
  draws what the uncut decode would have; ``max_new_tokens``: shared or per prompt (tokens
  after the prefix); ``sampler_of``: ``samplers``' (None: greedy)."""
  rows = list(range(len(prompts))) if rows is None else list(rows)
  gens = model.decode(list(prompts), system=system, max_new_tokens=max_new_tokens, gate="off",
                      sampler_of=None if sampler_of is None
                      else lambda chunk: sampler_of([rows[i] for i in chunk]), seed=seed,
                      prefill_ids=forced, row_ids=rows, return_logits=return_logits)
  return [(g.tokens, g.logits) for g in gens]


def check_settings(folder: str, settings: dict) -> None:
  """Record the settings a folder's artefacts are made with (creating the folder); raise if
  it holds artefacts of other settings (never mixing two)."""
  path = os.path.join(folder, SETTINGS_FILE)
  settings = json.loads(json.dumps(settings))
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != settings:
      diffs = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
      raise ValueError(f"{folder} holds artefacts made with other settings ({', '.join(diffs)} "
                       "differ): give the baseline another folder, or delete this one.")
    return
  os.makedirs(folder, exist_ok=True)
  json_files.write_json(path, settings, indent=2, sort_keys=True)


def load_source(source, **kwargs):
  """``source`` as a ``SafetyModel``: a path (a workdir or import dir, through ``sa.load``
  with ``kwargs``) or a model already loaded."""
  if isinstance(source, str):
    return load(source, **kwargs)
  if not all(hasattr(source, a) for a in ("generate", "decode", "params", "template")):
    raise TypeError(f"source must be a workdir path or a SafetyModel, got "
                    f"{type(source).__name__}.")
  return source


def source_id(source):
  """What names ``source`` in a folder's settings: its absolute path, or what a loaded model
  was loaded from (None for a model built in memory: its folder is then trusted as is)."""
  if isinstance(source, str):
    return os.path.abspath(source)
  return getattr(source, "loaded_from", None)
