"""The Python API of API.md: ``load`` a checkpoint, ``classify`` queries, ``generate`` with the
safety gate, and plain ``lm_logits``.

Prompts are processed in chunks of ``batch_size``; the decoder pads each chunk to power-of-two
batch and length buckets, so repeated calls reuse compiled programs (a new bucket, the gate
switched on or off, or greedy vs sampling compile once each).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from safety_align import calibrate, moderation, scoring, sharding, workdir
from safety_align.data import templates
from safety_align.data.tokenizer import Tokenizer, check_vocab
from safety_align.decode import SCHEDULES, Decoder, GateConfig, Prompts, bucket, make_sampler
from safety_align.decode.cache import check_context
from safety_align.decode.sampling import PerRow
from safety_align.decode.slots import SlotDecoder, SlotRequest
from safety_align.model import ModelConfig, plain_forward, unroll_layers

CLS_PARAMS = ("cls_embed", "cls_head")
SHORT_TOKENS = 512  # prompt + response length up to which a decoder call takes a whole batch
_NO_CLS = ("needs the [CLS] embedding and head, which this checkpoint lacks; use gate='off', "
           "or import it with `python -m safety_align.convert import_hf` and train it.")


# The default context of a decode slot (``SafetyModel.slots``) when the model allows more.
DEFAULT_SLOT_LEN = 2048


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


class SafetyModel:
  """A model with its tokenizer and chat template.

  Args:
    model_config: the architecture.
    params: parameters (boxed or not). Without ``cls_embed``/``cls_head`` (a plain LM) only
      ``gate="off"`` works.
    tokenizer: ``data.tokenizer.Tokenizer`` (or any object with ``encode``, ``decode``,
      ``eos_id``, ``pad_id``, ``vocab_size``).
    template: a chat template (``prompt_pieces(tokenizer, prompt)``).
    gate_defaults: the gate of ``generate(gate=None)``, and the settings that
      ``generate(gate=<schedule name>)`` starts from (``load``: the workdir's calibration).
    max_length: the longest prompt + response in tokens, the context the model serves
      (``None``: no limit).
    batch_size: prompts per decoding batch.
    eos_ids: tokens that end a response (default: the tokenizer's EOS).
    uses_cls: whether the model was trained with [CLS] (``False``: the implicit-alignment
      baseline, a plain LM). ``gate="off"`` keeps [CLS] in the prompt pass for a model trained
      with it (the implicit path it was trained with; no re-evaluation, no insertion) and drops
      it for a plain LM.
    mesh: serve across devices (a ``Mesh`` or axis sizes: see ``load``); ``None``: one device.
  """

  def __init__(self, model_config: ModelConfig, params, tokenizer: Tokenizer, template,
               gate_defaults: GateConfig = GateConfig(), *, max_length: int | None = None,
               batch_size: int = 32, eos_ids: Sequence[int] | None = None,
               uses_cls: bool | None = None, mesh: Mesh | dict[str, int] | None = None):
    check_vocab(tokenizer, model_config.vocab_size)
    params = nn.meta.unbox(params)
    self.has_cls_head = all(k in params for k in CLS_PARAMS) and uses_cls is not False
    if not self.has_cls_head:  # inert [CLS] parameters so the forward runs; never used
      d, dtype = model_config.d_model, model_config.weight_dtype
      params = {**params, "cls_embed": jnp.zeros((d,), dtype),
                "cls_head": {"kernel": jnp.zeros((d, 2), dtype), "bias": jnp.zeros((2,), dtype)}}
    self.mesh = sharding.as_mesh(mesh)
    if self.mesh is not None:  # each device gets its slices; unrolling keeps them there
      params = jax.device_put(params, sharding.param_shardings(model_config, self.mesh, params))
    # Inference runs the layers unrolled: slice a scanned stack into per-layer weights once
    # here rather than in every decode call.
    self.config, self.params = unroll_layers(model_config, params)
    if self.mesh is not None:
      self.params = jax.device_put(
          self.params, sharding.param_shardings(self.config, self.mesh, self.params))
    self.tokenizer = tokenizer
    self.template = template
    self.gate_defaults = gate_defaults
    self.batch_size = batch_size
    self.decoder = Decoder(self.config, eos_ids=[tokenizer.eos_id] if eos_ids is None
                           else eos_ids, max_length=max_length, pad_id=tokenizer.pad_id,
                           mesh=self.mesh)
    self.loaded_from: dict | None = None  # set by ``load``: path, phase, step, steps
    self.calibration: dict | None = None  # set by ``load``: the calibration.json in use

  def _prompts(self, prompts: Sequence[str], system: str | None = None,
               budget: Sequence[int] | int = 0) -> Prompts:
    """The encoded prompts, checked to fit the context with ``budget`` response tokens."""
    prompts = _texts("prompts", prompts)
    if system is not None and not isinstance(system, str):
      raise TypeError(f"system must be a string or None, got {type(system).__name__}.")
    for i, p in enumerate(prompts):
      if not p:
        raise ValueError(f"Prompt {i} is empty: there is no query to classify or answer.")
    encoded = Prompts.from_pieces([self.template.prompt_pieces(self.tokenizer, p, system=system)
                                   for p in prompts])
    check_context(encoded.lengths, budget, self.decoder.max_length)
    return encoded

  def classify(self, prompts: Sequence[str]) -> np.ndarray:
    """[N] float: P(malicious) of each query (the SFT-phase [CLS], as in training)."""
    self._require_cls("classify")
    encoded = self._prompts(prompts)
    return np.concatenate([self.decoder.classify(self.params, _select(encoded, rows))
                           for rows in _chunks(encoded.lengths, self.batch_size)])

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               gate: str | GateConfig | None = None,
               prefill: Sequence[str] | None = None,
               system: str | None = None, sampling: Sequence[Any] | None = None,
               batch_size: int | None = None) -> list[Generation]:
    """Responses to ``prompts``.

    ``gate``: ``None`` for ``gate_defaults`` (a loaded workdir's calibrated gate, else
    annealing at θ 0.5, τ 3), a schedule name (``off``, ``first``, ``periodic``, ``every``,
    ``annealing``) applied to ``gate_defaults``, or a full ``GateConfig``; each is resolved by
    ``resolve_gate`` (``off``: the gate never acts); ``Generation.gate`` records it.
    ``prefill``: per prompt, text forced at the start of the response (the prefill attack).
    ``system``: a system message, rendered by the chat template as TEMPLATE tokens ([CLS]
    reads only the QUERY). ``sampling``: per prompt, its own settings (any object with
    ``temperature``, ``top_k``, ``top_p``, e.g. ``attacks.decoding.Setting``) instead of the
    shared ``temperature``/``top_k``/``top_p``; the rows of a sweep then share one compiled
    program. ``batch_size``: prompts per decoder call (default: the model's; long prompts go
    in smaller calls, ``_chunks``). Sampling is reproducible: prompt i draws from
    (seed, i, step), whatever the batching.
    """
    for name, value in dict(max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed).items():
      check_arg(name, value)
    gate = resolve_gate(gate, self.gate_defaults, self.has_cls_head)
    prompts = _texts("prompts", prompts)
    n_prompts = len(prompts)
    sampler = _sampler(sampling, n_prompts, (temperature, top_k, top_p))
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
      raise ValueError(f"batch_size must be an integer >= 1 (or None), got {batch_size!r}.")
    prefill = None if prefill is None else _texts("prefill", prefill)
    if prefill is not None and len(prefill) != n_prompts:
      raise ValueError(f"{len(prefill)} prefills for {n_prompts} prompts: give one string per "
                       "prompt ('' for none).")
    forced = [self.tokenizer.encode(p) for p in prefill] if prefill else None
    encoded = self._prompts(prompts, system)
    return self.decode(encoded, max_new_tokens=max_new_tokens, gate=gate, sampler_of=sampler,
                       seed=seed, prefill_ids=forced, batch_size=batch_size)

  def decode(self, prompts: Sequence[str] | Prompts, *, max_new_tokens: int | Sequence[int],
             gate: str | GateConfig | None = None, system: str | None = None, sampler_of=None,
             seed: int = 0, prefill_ids: Sequence[Sequence[int]] | None = None,
             row_ids: Sequence[int] | None = None, batch_size: int | None = None,
             return_logits: bool = False) -> list[Generation]:
    """Whole generations for ``prompts`` (texts, rendered with ``system`` as ``generate``
    renders them, or already rendered ``Prompts``; ``generate`` checks its arguments, then
    calls this): the gate resolved (``resolve_gate``), its refusal encoded,
    each prompt checked to fit the context with its ``prefill_ids`` (forced response tokens)
    and ``max_new_tokens`` (shared or per prompt) after them, decoded in chunks of
    ``batch_size``. ``sampler_of``: prompt indices -> their sampler (``_sampler``; default
    greedy); prompt i draws from (seed, ``row_ids[i]`` (default i), step).
    ``return_logits``: ``Generation.logits`` [N, V], the distribution each response token
    was chosen from."""
    gate = resolve_gate(gate, self.gate_defaults, self.has_cls_head)
    if not isinstance(prompts, Prompts):
      prompts = self._prompts(prompts, system)
    n = len(prompts)
    forced = [list(f) for f in prefill_ids] if prefill_ids is not None else [[]] * n
    if len(forced) != n:
      raise ValueError(f"{len(forced)} prefills for {n} prompts: give one per prompt.")
    new = np.broadcast_to(np.asarray(max_new_tokens), (n,))
    budget = new + np.array([len(f) for f in forced], np.int64)
    check_context(prompts.lengths, budget, self.decoder.max_length)
    rows_of = np.arange(n) if row_ids is None else np.asarray(row_ids)
    tok, out = self.tokenizer, []
    for rows in _chunks(prompts.lengths + budget, batch_size or self.batch_size):
      res = self.decoder(
          self.params, _select(prompts, rows), max_new_tokens=new[list(rows)], gate=gate,
          sampler=(sampler_of or (lambda r: make_sampler()))(rows), seed=seed,
          prefill=[forced[i] for i in rows], refusal_ids=tok.encode(gate.refusal_prefix),
          newline_ids=tok.encode("\n"), row_ids=rows_of[list(rows)],
          return_logits=return_logits)
      for i in range(len(rows)):
        tokens = res.response(i)
        steps, probs = res.trace(i)
        out.append(Generation(
            text=tok.decode(tokens), tokens=tokens, refused=bool(res.refused[i]),
            refusal_step=int(res.refusal_step[i]) if res.refused[i] else None,
            cls_probs=probs, cls_steps=steps, gate=gate,
            logits=res.logits[i] if return_logits else None))
    return out

  def slots(self, max_batch: int, max_len: int | None = None) -> SlotDecoder:
    """``max_batch`` decode slots (``decode.slots``: requests start and finish while the others
    decode, ``advance`` moves all of them in one compiled call) of ``max_len`` tokens each
    (default: the model's context, at most ``DEFAULT_SLOT_LEN``: every slot holds a KV-cache
    row of that length and each step attends over it, so an 8k context would cost 16 slots
    ~6 GB of cache for a 135M model; pass ``max_len`` for longer requests)."""
    if max_len is None:
      max_len = (DEFAULT_SLOT_LEN if self.decoder.max_length is None
                 else min(self.decoder.max_length, DEFAULT_SLOT_LEN))
    if self.decoder.max_length is not None and max_len > self.decoder.max_length:
      raise ValueError(f"max_len={max_len} exceeds the model's maximum length of "
                       f"{self.decoder.max_length} tokens.")
    tok = self.tokenizer
    newline = tok.encode("\n")
    insertion = len(newline) + len(tok.encode(self.gate_defaults.refusal_prefix))
    return SlotDecoder(
        self.config, self.params, max_batch=max_batch, max_len=max_len, pad_id=tok.pad_id,
        eos_ids=[int(i) for i in self.decoder.eos_ids], with_cls=self.has_cls_head,
        resolve_gate=lambda gate: resolve_gate(gate, self.gate_defaults, self.has_cls_head),
        refusal_ids=lambda gate: tok.encode(gate.refusal_prefix), newline_ids=newline,
        insertion_width=bucket(insertion), mesh=self.mesh)

  def slot_request(self, rendered: Rendered, *, max_new_tokens: int, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   gate: str | GateConfig | None = None, eos: bool = True) -> SlotRequest:
    """The ``SlotRequest`` of a ``render``ed chat (arguments checked as ``generate``'s)."""
    for name, value in dict(max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed).items():
      check_arg(name, value)
    resolve_gate(gate, self.gate_defaults, self.has_cls_head)  # fails early on a bad gate
    return SlotRequest(prompt_ids=list(rendered.ids), roles=list(rendered.roles),
                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, gate=gate, prefill_ids=list(rendered.prefill_ids),
                       eos=eos)

  def hidden_states(self, token_ids, layers: Sequence[int] | None = None) -> np.ndarray:
    """[B, T] int -> [len(layers), B, T, D] float32: the output of each block in ``layers``
    (default all) of the plain causal forward, no [CLS] (the one forward ``lm_logits``, the
    probe and ``convert``'s parity check read)."""
    ids = _token_ids(token_ids, self.config.vocab_size)
    layers = list(range(self.config.n_layers)) if layers is None else list(layers)
    if not layers or not all(_is_int(i) and 0 <= i < self.config.n_layers for i in layers):
      raise ValueError(f"layers must be block indices in [0, {self.config.n_layers}), got "
                       f"{layers}.")
    b, t = ids.shape
    _, states = plain_forward(self.config, self.params, _right_padded(ids), tuple(layers))
    return np.asarray(states, np.float32)[:, :b, :t]

  def lm_logits(self, token_ids) -> np.ndarray:
    """[B, T] int -> [B, T, V] float32: plain causal LM logits, no [CLS] (parity with the
    source model)."""
    ids = _token_ids(token_ids, self.config.vocab_size)
    b, t = ids.shape
    logits, _ = plain_forward(self.config, self.params, _right_padded(ids))
    return np.asarray(logits)[:b, :t]

  def score(self, prompts: Sequence[str], continuations: Sequence[str], *,
            system: str | None = None, chat: bool = True, truncate: bool = False,
            batch_size: int | None = None) -> scoring.Scores:
    """Teacher-forced ``scoring.Scores`` (summed log-probability, tokens, characters) of each
    continuation after its prompt, as this model is deployed: a [CLS] model through its
    query -> [CLS] -> answer layout (gate off), a plain LM without [CLS]. ``chat``: the prompt
    through the chat template, as ``generate`` renders it (else bare QUERY text);
    ``truncate``: cut continuations to the maximum length (else a row too long is an error)."""
    return scoring.score(self.config, self.params, self.tokenizer, self.template,
                         _texts("prompts", prompts), _texts("continuations", continuations),
                         with_cls=self.has_cls_head, batch_size=batch_size or self.batch_size,
                         max_length=self.decoder.max_length, system=system, chat=chat,
                         truncate=truncate)

  def gate_stream(self, prompt: str | tuple[Sequence[int], Sequence[int]], *,
                  gate: str | GateConfig = "every",
                  system: str | None = None) -> moderation.GateStream:
    """The gate as a guard over a response written elsewhere: ``.extend(text)`` appends a
    piece of the response and returns the ``moderation.Verdict`` so far (P(malicious) at each
    evaluated window, whether and where the gate would have fired). ``prompt``: the query
    (through the chat template, as ``generate``), or already rendered (ids, roles)."""
    self._require_cls("gate_stream")
    gate = resolve_gate(gate, self.gate_defaults, True)
    if isinstance(prompt, str):
      encoded = self._prompts([prompt], system)
      prompt = (encoded.ids[0], encoded.roles[0])
    return moderation.GateStream(self.config, self.params, self.tokenizer, *prompt, gate,
                                 self.decoder.max_length)

  @property
  def max_length(self) -> int | None:
    """The context: the most prompt + response tokens (``None``: no limit)."""
    return self.decoder.max_length

  def check_length(self, n_prompt: int, n_response: int, limit: int | None = None) -> None:
    """Raise ValueError unless ``n_prompt`` + ``n_response`` tokens fit the context
    (``limit``: a shorter one than the model's, e.g. a server's slots)."""
    check_context(np.array([n_prompt]), n_response,
                  self.decoder.max_length if limit is None else limit)

  def render(self, messages: Sequence[dict], *, prefill: bool = True) -> Rendered:
    """A chat (dicts with ``role``, ``content``: ``[system | developer], user, [assistant,
    user, ...], [assistant]``) through the chat template, by METHOD.md 3's multi-turn rule
    (every user turn QUERY; system and earlier assistant turns TEMPLATE). With ``prefill``, a
    final assistant message is the forced start of the response."""
    messages = [dict(role="system" if m["role"] == "developer" else m["role"],
                     content=m["content"]) for m in messages]
    roles = [m["role"] for m in messages]
    forced = messages.pop()["content"] if prefill and len(messages) > 1 and roles[-1] == (
        "assistant") else ""
    body = [m["role"] for m in messages if m["role"] != "system"]
    if roles.count("system") > (roles[0] == "system") or not body or body[-1] != "user" or any(
        a == b for a, b in zip(body, body[1:])):
      raise ValueError(f"A chat is an optional system message, then user and assistant "
                       f"messages in turn ending with a user message (and optionally a final "
                       f"assistant message, continued); got roles {roles}.")
    if not messages[-1]["content"]:
      raise ValueError("The last user message is empty.")
    if len(messages) - (roles[0] == "system") == 1:  # one turn: as generate renders it
      pieces = self.template.prompt_pieces(
          self.tokenizer, messages[-1]["content"],
          system=messages[0]["content"] if roles[0] == "system" else None)
    else:
      pieces = self.template.chat_pieces(self.tokenizer, messages)
    encoded = Prompts.from_pieces([pieces])
    return Rendered(ids=list(encoded.ids[0]), roles=list(encoded.roles[0]),
                    prefill_ids=self.tokenizer.encode(forced) if forced else [])

  def _require_cls(self, what: str):
    if not self.has_cls_head:
      raise ValueError(f"{what} {_NO_CLS}")


def _texts(name: str, values) -> list[str]:
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


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# generate()'s numeric arguments: (type test, range test, what is expected).
_ARGS = {
    "max_new_tokens": (_is_int, lambda v: v >= 1, "an integer >= 1"),
    "temperature": (_is_number, lambda v: math.isfinite(v) and v >= 0,
                    "a finite number >= 0 (0 = greedy)"),
    "top_k": (_is_int, lambda v: v >= 0, "an integer >= 0 (0 = no limit)"),
    "top_p": (_is_number, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "seed": (_is_int, lambda v: True, "an integer"),
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
    raise ValueError(f"gate={gate.schedule!r} {_NO_CLS}")
  return gate


def _sampler(sampling: Sequence[Any] | None, n: int, shared: tuple[float, int, float]):
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


def _chunks(lengths: np.ndarray, size: int) -> list[range]:
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


def _select(prompts: Prompts, rows) -> Prompts:
  return Prompts(ids=tuple(prompts.ids[i] for i in rows),
                 roles=tuple(prompts.roles[i] for i in rows))


def _token_ids(token_ids, vocab_size: int) -> np.ndarray:
  """``token_ids`` as [B, T] int32, checked (T > 0, ids in the vocabulary: no [CLS])."""
  ids = np.asarray(token_ids, np.int32)
  if ids.ndim != 2 or ids.shape[1] == 0:
    raise ValueError(f"token_ids must be [B, T] with T > 0, got shape {ids.shape}.")
  if ids.min() < 0 or ids.max() >= vocab_size:
    raise ValueError(f"token ids must be in [0, {vocab_size}) (no [CLS]).")
  return ids


def _right_padded(ids: np.ndarray) -> np.ndarray:
  """[B, T] padded on the right to the batch and length buckets (causal: nothing before the
  padding changes)."""
  b, t = ids.shape
  padded = np.zeros((bucket(b, minimum=1), bucket(t)), np.int32)
  padded[:b, :t] = ids
  return padded


def _max_length(config: dict[str, Any], path: str) -> int | None:
  """The context a checkpoint serves: its source's ``max_position_embeddings`` (RoPE), as the
  training config records it (``context_length``, from the import) or an import directory
  holds it (``hf_config``), or the training ``data.seq_len`` if that is longer. A model
  trained from scratch serves its ``data.seq_len``; one fine-tuned from an import by an older
  version (no ``context_length``) falls back to it, with a warning saying how to fix it."""
  seq_len = config.get("data", {}).get("seq_len")
  context = (config.get("context_length")
             or config.get("hf_config", {}).get("max_position_embeddings"))
  if context:
    return max(int(context), seq_len or 0)
  if seq_len and config.get("init_from"):
    logging.warning(
        "%s records no context_length, so it serves its training data.seq_len=%d tokens as its "
        "context: add \"context_length\": N to %s (N: max_position_embeddings in the hf_config "
        "of %s/config.json), or pass max_length=N to sa.load.", path, seq_len,
        os.path.join(path, workdir.CONFIG_FILE), config["init_from"])
  return seq_len


def load(path: str, phase: str | None = None, *, calibrated: bool | None = None,
         **kwargs) -> SafetyModel:
  """A training workdir or an ``import_hf`` directory, with its tokenizer and chat template.

  ``phase``: whose newest intact checkpoint to load. ``None``: a workdir's last phase
  (``config.phases``; refused while it has no checkpoint, e.g. a pretraining model whose SFT
  phase has not run: ``phase="pretrain"`` asks for it), an import directory's "import".
  ``SafetyModel.loaded_from`` (and a log line) says what was loaded. ``kwargs`` go to
  ``SafetyModel`` (e.g. ``gate_defaults``, ``max_length``: default the context the source
  model supports, ``_max_length``).

  ``calibrated``: the gate defaults from ``path/calibration.json`` (``python -m
  safety_align.calibrate``: θ, τ and schedule for an over-refusal budget), recorded in
  ``SafetyModel.calibration``. None (default): when there is one for the loaded checkpoint;
  True: required; False: the uncalibrated ``GateConfig()``. An explicit ``gate_defaults``
  wins.

  ``mesh`` (a ``kwargs`` key): serve across devices. A ``jax.sharding.Mesh`` with axes
  ``data``, ``fsdp``, ``tensor`` (``sharding.make_mesh``), or their sizes, e.g.
  ``mesh=dict(tensor=-1)`` (missing axes 1, one may be -1: the remaining devices). Parameters
  are placed by the training rules (``sharding.RULES``: heads, MLP and vocabulary over
  ``tensor``, ``embed`` over ``fsdp``; a dimension an axis does not divide stays whole) and
  decoding runs sharded (``decode.Decoder``: KV cache heads over ``tensor``, rows over
  ``data``/``fsdp`` when the batch divides them); outputs are the same as on one device. Each
  parameter is restored straight onto its devices' slices. ``None`` (default): one device.
  """
  if phase is not None and (not isinstance(phase, str) or not phase):
    raise TypeError(f"phase must be a phase name such as 'sft' or 'pretrain', or None; got "
                    f"{phase!r}.")
  phase = workdir.serving_phase(path) if phase is None else phase
  kwargs["mesh"] = sharding.as_mesh(kwargs.get("mesh"))
  loaded = workdir.load_for_inference(path, phase, mesh=kwargs["mesh"])
  tokenizer = Tokenizer.load(loaded.tokenizer_path)
  eos_ids = loaded.special_tokens.get("eos_ids") or [tokenizer.eos_id]
  if "max_length" not in kwargs:
    kwargs["max_length"] = _max_length(loaded.config, path)
  kwargs.setdefault("eos_ids", eos_ids)
  kwargs.setdefault("uses_cls", loaded.config.get("use_cls", True))
  loaded_from, calibration = _loaded_from(path, loaded), None
  if "gate_defaults" not in kwargs:
    kwargs["gate_defaults"], calibration = calibrate.for_checkpoint(path, loaded_from,
                                                                    calibrated)
  model = SafetyModel(loaded.model_config, loaded.params, tokenizer,
                      templates.get_template(loaded.chat_template), **kwargs)
  model.loaded_from, model.calibration = loaded_from, calibration
  return model


def _loaded_from(path: str, loaded: workdir.Loaded) -> dict:
  """``{"path", "phase", "step", "steps"}`` (``steps``: the phase's configured length, None for
  an import); logs it, and warns if the phase is unfinished."""
  phase, step = loaded.phase, loaded.step
  phase_cfg = loaded.config.get(phase) or {}
  steps = phase_cfg.get("steps")  # optimiser steps, as checkpoints count them
  logging.info("Loaded %s: phase %s, step %s.", path, phase, step)
  if steps is not None and step < steps:
    logging.warning("%s: the %s phase is unfinished (step %d of %d): serving its latest "
                    "checkpoint.", path, phase, step, steps)
  return dict(path=os.path.abspath(path), phase=phase, step=step, steps=steps)
