"""The Python API of API.md: ``load`` a checkpoint, ``classify`` queries, ``generate`` with the
safety gate, and plain ``lm_logits``.

Prompts are processed in chunks of ``batch_size``; the decoder pads each chunk to power-of-two
batch and length buckets, so repeated calls reuse compiled programs (a new bucket, the gate
switched on or off, or greedy vs sampling compile once each).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from safety_align import checkpoint
from safety_align.data import templates
from safety_align.data.tokenizer import Tokenizer, check_vocab
from safety_align.decode import Decoder, GateConfig, Prompts, bucket, make_sampler
from safety_align.model import ModelConfig, Transformer, unroll_layers

CLS_PARAMS = ("cls_embed", "cls_head")


@dataclasses.dataclass(frozen=True)
class Generation:
  """One response. ``text``/``tokens``: the response only (forced prefill included, EOS
  excluded). ``refusal_step``: token index in the response where the inserted refusal prefix
  starts. ``cls_probs``/``cls_steps``: P(malicious) at each evaluation and its step (the number
  of response tokens it could read; 0 is the first classification of the query)."""

  text: str
  tokens: list[int]
  refused: bool
  refusal_step: int | None
  cls_probs: list[float]
  cls_steps: list[int]


class SafetyModel:
  """A model with its tokenizer and chat template.

  Args:
    model_config: the architecture.
    params: parameters (boxed or not). Without ``cls_embed``/``cls_head`` (a plain LM) only
      ``gate="off"`` works.
    tokenizer: ``data.tokenizer.Tokenizer`` (or any object with ``encode``, ``decode``,
      ``eos_id``, ``pad_id``, ``vocab_size``).
    template: a chat template (``prompt_pieces(tokenizer, prompt)``).
    gate_defaults: gate settings that ``generate(gate=<schedule name>)`` starts from.
    max_length: the longest prompt + response in tokens (``None``: no limit).
    batch_size: prompts per decoding batch.
    eos_ids: tokens that end a response (default: the tokenizer's EOS).
    uses_cls: whether the model was trained with [CLS] (``False``: the implicit-alignment
      baseline, a plain LM). ``gate="off"`` keeps [CLS] at prefill for a model trained with
      it (the implicit path it was trained with; no re-evaluation, no insertion) and drops it
      for a plain LM.
  """

  def __init__(self, model_config: ModelConfig, params, tokenizer: Tokenizer, template,
               gate_defaults: GateConfig = GateConfig(), *, max_length: int | None = None,
               batch_size: int = 32, eos_ids: Sequence[int] | None = None,
               uses_cls: bool | None = None):
    check_vocab(tokenizer, model_config.vocab_size)
    params = nn.meta.unbox(params)
    self.has_cls_head = all(k in params for k in CLS_PARAMS) and uses_cls is not False
    if not self.has_cls_head:  # inert [CLS] parameters so the forward runs; never used
      d, dtype = model_config.d_model, model_config.weight_dtype
      params = {**params, "cls_embed": jnp.zeros((d,), dtype),
                "cls_head": {"kernel": jnp.zeros((d, 2), dtype), "bias": jnp.zeros((2,), dtype)}}
    # Inference runs the layers unrolled: slice a scanned stack into per-layer weights once
    # here rather than in every decode call.
    self.config, self.params = unroll_layers(model_config, params)
    self.tokenizer = tokenizer
    self.template = template
    self.gate_defaults = gate_defaults
    self.batch_size = batch_size
    self.decoder = Decoder(self.config, eos_ids=[tokenizer.eos_id] if eos_ids is None
                           else eos_ids, max_length=max_length, pad_id=tokenizer.pad_id)

  def _prompts(self, prompts: Sequence[str], system: str | None = None) -> Prompts:
    if isinstance(prompts, str):
      raise TypeError("prompts must be a list of strings, not one string.")
    for i, p in enumerate(prompts):
      if not p:
        raise ValueError(f"Prompt {i} is empty: there is no query to classify or answer.")
    return Prompts.from_pieces([self.template.prompt_pieces(self.tokenizer, p, system=system)
                                for p in prompts])

  def _chunks(self, n: int):
    return [range(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]

  def classify(self, prompts: Sequence[str]) -> np.ndarray:
    """[N] float: P(malicious) of each query (the SFT-phase [CLS], as in training)."""
    self._require_cls("classify")
    encoded = self._prompts(prompts)
    return np.concatenate([self.decoder.classify(self.params, _select(encoded, rows))
                           for rows in self._chunks(len(encoded))])

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               gate: str | GateConfig = "annealing",
               prefill: Sequence[str] | None = None,
               system: str | None = None) -> list[Generation]:
    """Responses to ``prompts``.

    ``gate``: a schedule name (``off``, ``first``, ``periodic``, ``every``, ``annealing``)
    applied to ``gate_defaults``, or a full ``GateConfig``. ``prefill``: per prompt, text
    forced at the start of the response (the prefill attack). ``system``: a system message,
    rendered by the chat template as TEMPLATE tokens ([CLS] reads only the QUERY). Sampling is
    reproducible: prompt i draws from (seed, i, step), whatever the batching.
    """
    if gate == "off" and self.has_cls_head:
      gate = dataclasses.replace(self.gate_defaults, schedule="first", reliance="low")
    elif not isinstance(gate, GateConfig):
      gate = dataclasses.replace(self.gate_defaults, schedule=gate)
    if gate.enabled:
      self._require_cls(f"gate={gate.schedule!r}")
    sampler = make_sampler(temperature, top_k, top_p)
    encoded = self._prompts(prompts, system)
    if prefill is not None and len(prefill) != len(encoded):
      raise ValueError(f"{len(prefill)} prefills for {len(encoded)} prompts.")
    forced = [self.tokenizer.encode(p) for p in prefill] if prefill else None
    tok = self.tokenizer
    out = []
    for rows in self._chunks(len(encoded)):
      res = self.decoder(
          self.params, _select(encoded, rows), max_new_tokens=max_new_tokens, gate=gate,
          sampler=sampler, seed=seed, prefill=[forced[i] for i in rows] if forced else None,
          refusal_ids=tok.encode(gate.refusal_prefix), newline_ids=tok.encode("\n"),
          row_ids=list(rows))
      for i in range(len(rows)):
        tokens = res.response(i)
        steps, probs = res.trace(i)
        out.append(Generation(
            text=tok.decode(tokens), tokens=tokens, refused=bool(res.refused[i]),
            refusal_step=int(res.refusal_step[i]) if res.refused[i] else None,
            cls_probs=probs, cls_steps=steps))
    return out

  def lm_logits(self, token_ids) -> np.ndarray:
    """[B, T] int -> [B, T, V] float32: plain causal LM logits, no [CLS] (parity with the
    source model)."""
    ids = np.asarray(token_ids, np.int32)
    if ids.ndim != 2 or ids.shape[1] == 0:
      raise ValueError(f"token_ids must be [B, T] with T > 0, got shape {ids.shape}.")
    if ids.min() < 0 or ids.max() >= self.config.vocab_size:
      raise ValueError(f"token ids must be in [0, {self.config.vocab_size}).")
    b, t = ids.shape
    padded = np.zeros((bucket(b, minimum=1), bucket(t)), np.int32)
    padded[:b, :t] = ids  # right padding: causal, so it changes nothing before it
    return np.asarray(_plain_logits(self.config, self.params, padded))[:b, :t]

  def _require_cls(self, what: str):
    if not self.has_cls_head:
      raise ValueError(f"{what} needs the [CLS] embedding and head, which this checkpoint "
                       "lacks; use gate='off', or import it with "
                       "`python -m safety_align.convert import_hf` and train it.")


def _select(prompts: Prompts, rows) -> Prompts:
  return Prompts(ids=tuple(prompts.ids[i] for i in rows),
                 roles=tuple(prompts.roles[i] for i in rows))


@functools.partial(jax.jit, static_argnums=0)
def _plain_logits(cfg: ModelConfig, params, tokens):
  t = tokens.shape[1]
  positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (tokens.shape[0], t, t))
  logits, _, _ = Transformer(cfg).apply({"params": params}, tokens, positions, mask)
  return logits


def _max_length(config: dict[str, Any]) -> int | None:
  """The context a checkpoint was trained for: the training ``data.seq_len``, or an imported
  model's ``max_position_embeddings``."""
  return (config.get("data", {}).get("seq_len")
          or config.get("hf_config", {}).get("max_position_embeddings"))


def load(path: str, **kwargs) -> SafetyModel:
  """A training workdir (its latest checkpoint) or an ``import_hf`` directory, with its
  tokenizer and chat template. ``kwargs`` go to ``SafetyModel`` (e.g. ``gate_defaults``)."""
  model_config, params, extra = checkpoint.load_for_inference(path)
  tokenizer = Tokenizer.load(extra["tokenizer_path"])
  eos_ids = extra.get("special_tokens", {}).get("eos_ids") or [tokenizer.eos_id]
  kwargs.setdefault("max_length", _max_length(extra.get("config", {})))
  kwargs.setdefault("eos_ids", eos_ids)
  kwargs.setdefault("uses_cls", extra.get("config", {}).get("use_cls", True))
  return SafetyModel(model_config, params, tokenizer,
                     templates.get_template(extra["chat_template"]), **kwargs)
