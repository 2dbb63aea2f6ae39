"""SafeDecoding (Xu et al., 2024) as a baseline: the first ``first_m`` response tokens come
from a reweighting of the source (base) model and a safety expert, the rest from the base.

At each of the first ``m`` steps (m = 2): the sample space is the intersection of the base's
and the expert's top-``k`` tokens, for the smallest ``k >= top_k`` (10) giving at least
``min_common`` (c = 5) common tokens; each token gets ``p_base + alpha (p_expert - p_base)``
(alpha = 3), floored at 1e-8 and normalised over the space (``reweight``, the paper's defaults
and flooring). Greedy picks the best; a sampled decode (temperature > 0) draws from that
distribution at the row's temperature, with the row's (seed, prompt, step) key (the attack's
top-k / top-p are not applied: the space is SafeDecoding's). Then the base decodes on from the
prompt, any forced prefill and the ``m`` chosen tokens, as its ordinary decoding (they are the
model's own tokens, not an attack's forced ones). With a prefill attack the ``m`` steps are the
first ones after the forced text, where the model starts to write.

The expert: the deep-alignment model of the source (``deep_alignment.build``, into
``FOLDER/expert``), or any model with the same tokenizer (``section.expert``, a path).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import ml_collections
import numpy as np

from safety_align import calls
from safety_align.api import Generation, check_arg
from safety_align.defences import common, deep_alignment


def reweight(p_base: np.ndarray, p_expert: np.ndarray, *, alpha: float, top_k: int,
             min_common: int) -> tuple[np.ndarray, np.ndarray]:
  """SafeDecoding's distribution at one step: (token ids [c'], probabilities [c']) over the
  sample space (module doc), in the base's order. p_base, p_expert: [V] probabilities."""
  base_order, expert_order = np.argsort(-p_base, kind="stable"), np.argsort(-p_expert,
                                                                            kind="stable")
  need = min(min_common, len(p_base))
  for k in range(min(top_k, len(p_base)), len(p_base) + 1):
    ids = base_order[:k][np.isin(base_order[:k], expert_order[:k])]
    if len(ids) >= need:
      break
  scores = np.maximum(p_base[ids] + alpha * (p_expert[ids] - p_base[ids]), 1e-8)
  return ids, scores / scores.sum()


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits.astype(np.float64) - logits.max())
  return z / z.sum()


class SafeDecodingModel(common.Defended):
  """The source with SafeDecoding (module doc) when the gate is on."""

  name = "safedecoding"

  def __init__(self, source, expert, *, first_m: int = 2, alpha: float = 3.0, top_k: int = 10,
               min_common: int = 5):
    super().__init__(source)
    if expert.config.vocab_size != source.config.vocab_size:
      raise ValueError(f"The SafeDecoding expert's vocabulary ({expert.config.vocab_size}) is "
                       f"not the source's ({source.config.vocab_size}): the expert must be a "
                       "fine-tune of the source, with its tokenizer.")
    for name, value in dict(first_m=first_m, top_k=top_k, min_common=min_common).items():
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"safedecoding.{name} must be an integer >= 1, got {value!r}.")
    self.expert, self.first_m, self.alpha = expert, first_m, alpha
    self.top_k, self.min_common = top_k, min_common

  def next_probs(self, model, prompts, prefixes, rows, system) -> list[np.ndarray]:
    """Per prompt, ``model``'s [V] next-token distribution after its token ``prefixes``."""
    out = common.decode(model, prompts, prefixes, max_new_tokens=1, seed=0, rows=rows,
                        system=system, return_logits=True)
    return [_softmax(logits[len(p)]) for (_, logits), p in zip(out, prefixes)]

  def choose(self, p_base, p_expert, temperature: float, seed: int, row: int, step: int) -> int:
    """The token of one reweighted step (module doc)."""
    ids, probs = reweight(p_base, p_expert, alpha=self.alpha, top_k=self.top_k,
                          min_common=self.min_common)
    if temperature == 0:
      return int(ids[np.argmax(probs)])
    key = calls.sampling_key(seed, row, step)
    return int(ids[int(jax.random.categorical(key, np.log(probs) / temperature))])

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               gate="annealing", prefill: Sequence[str] | None = None,
               system: str | None = None, sampling=None, batch_size: int | None = None):
    """``SafetyModel.generate``'s arguments; ``gate`` off: the source, else SafeDecoding."""
    if not common.defence_on(gate):
      return self.source.generate(
          prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
          top_p=top_p, seed=seed, gate="off", prefill=prefill, system=system,
          sampling=sampling, batch_size=batch_size)
    check_arg("max_new_tokens", max_new_tokens)
    check_arg("seed", seed)
    prompts, tok = list(prompts), self.tokenizer
    n = len(prompts)
    sampler_of = common.samplers(sampling, n, temperature, top_k, top_p)
    temps = common.temperatures(sampling, n, temperature)
    if prefill is not None and len(prefill) != n:
      raise ValueError(f"{len(prefill)} prefills for {n} prompts: give one string per prompt "
                       "('' for none).")
    forced = [tok.encode(p) for p in prefill] if prefill else [[] for _ in prompts]
    eos = set(self.source.eos_ids)
    chosen, ended = [[] for _ in prompts], [False] * n
    for _ in range(min(self.first_m, max_new_tokens)):
      live = [i for i in range(n) if not ended[i]]
      if not live:
        break
      prefixes = [forced[i] + chosen[i] for i in live]
      args = ([prompts[i] for i in live], prefixes, live, system)
      for i, pb, pe, prefix in zip(live, self.next_probs(self.source, *args),
                                   self.next_probs(self.expert, *args), prefixes):
        token = self.choose(pb, pe, temps[i], seed, i, len(prefix))
        if token in eos:
          ended[i] = True
        else:
          chosen[i].append(token)
    tokens = [forced[i] + chosen[i] for i in range(n)]
    go_on = [i for i in range(n) if not ended[i] and len(chosen[i]) < max_new_tokens]
    if go_on:
      decoded = common.decode(self.source, [prompts[i] for i in go_on],
                              [tokens[i] for i in go_on],
                              max_new_tokens=[max_new_tokens - len(chosen[i]) for i in go_on],
                              sampler_of=sampler_of, seed=seed, rows=go_on, system=system)
      for i, (t, _) in zip(go_on, decoded):
        tokens[i] = t
    return [Generation(text=tok.decode(t), tokens=t, refused=False, refusal_step=None,
                       cls_probs=[], cls_steps=[]) for t in tokens]


def build(source, section: ml_collections.ConfigDict, train_data, log, folder: str,
          expert=None) -> SafeDecodingModel:
  """SafeDecoding over ``source`` (a path or a ``SafetyModel``). ``expert``: a model (or a
  built ``DeepAlignedModel``, whose aligned model is used), else ``section.expert`` (a path),
  else the deep-alignment model trained (or reused) in ``folder/expert`` on ``train_data``."""
  model = common.load_source(source)
  if expert is None and section.expert:
    expert = common.load_source(section.expert, max_length=model.max_length)
  elif expert is None:
    expert = deep_alignment.build(source, section.expert_training, train_data, log,
                                  os.path.join(folder, "expert"))
  expert = getattr(expert, "aligned", expert)
  log(f"safedecoding: first {section.first_m} tokens reweighted (alpha {section.alpha})")
  return SafeDecodingModel(model, expert, first_m=section.first_m, alpha=section.alpha,
                           top_k=section.top_k, min_common=section.min_common)
