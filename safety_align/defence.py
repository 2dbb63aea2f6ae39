"""``Defence``: what a defended model provides to the attacks and the evaluation.

``SafetyModel`` (the [CLS] model) provides it, and so does each competitor defence
(``defences.common.Defended`` and its subclasses, which declare it): the attacks generate
through it (``generate``, with ``gate`` "off" the undefended model and any other schedule the
defence on), read the prompt layout (``tokenizer``, ``template``, ``max_length``, ``eos_ids``),
search white-box against its weights (``config``, ``params``, ``has_cls_head``,
``gate_defaults``), and the evaluation classifies (where ``has_classifier``), scores
teacher-forced continuations (``score``) and reads plain logits (``lm_logits``).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from safety_align.calls import Generation
from safety_align.decode import GateConfig
from safety_align.model import ModelConfig
from safety_align.scoring import Scores


@runtime_checkable
class Defence(Protocol):
  """A defended model, as the attacks and the evaluation use it (module doc)."""

  has_cls_head: bool  # a [CLS] token and head (white-box attacks add the [CLS] terms)
  has_classifier: bool  # ``classify`` works
  tokenizer: Any
  template: Any
  gate_defaults: GateConfig
  config: ModelConfig
  params: Any
  batch_size: int

  @property
  def max_length(self) -> int | None:
    """The most prompt + response tokens (``None``: no limit)."""

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """The tokens that end a response."""

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               gate: str | GateConfig | None = None, prefill: Sequence[str] | None = None,
               system: str | None = None, sampling: Sequence[Any] | None = None,
               batch_size: int | None = None) -> list[Generation]:
    """Responses to ``prompts`` (``SafetyModel.generate``'s arguments)."""

  def classify(self, prompts: Sequence[str]) -> np.ndarray:
    """[N] P(malicious) of each query (where ``has_classifier``)."""

  def score(self, prompts: Sequence[str], continuations: Sequence[str], **kwargs) -> Scores:
    """Teacher-forced scores of each continuation after its prompt (``SafetyModel.score``)."""

  def lm_logits(self, token_ids) -> np.ndarray:
    """[B, T] int -> [B, T, V] plain causal LM logits."""
