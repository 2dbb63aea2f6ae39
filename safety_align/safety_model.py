"""The model object, ``SafetyModel``: the one door to a model's decoding (whole generations,
slots for serving, generations from prompt embeddings), classification, teacher-forced
scoring, the plain forward and the gate as a stream guard (``load`` in ``api`` builds it).

Prompts are processed in chunks of ``batch_size``; the decoder pads each chunk to power-of-two
batch and length buckets, so repeated calls reuse compiled programs (a new bucket, the gate
switched on or off, or greedy vs sampling compile once each).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from safety_align import calls, moderation, scoring, sharding
from safety_align.calls import Generation, Rendered
from safety_align.data.tokenizer import Tokenizer, check_vocab
from safety_align.decode import Decoder, GateConfig, Prompts, bucket, make_sampler
from safety_align.decode.cache import check_context
from safety_align.decode.slots import SlotDecoder, SlotRequest
from safety_align.model import ModelConfig, plain_forward, unroll_layers

CLS_PARAMS = ("cls_embed", "cls_head")
# The default context of a decode slot (``SafetyModel.slots``) when the model allows more.
DEFAULT_SLOT_LEN = 2048


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
    self._decoder = Decoder(self.config, eos_ids=[tokenizer.eos_id] if eos_ids is None
                           else eos_ids, max_length=max_length, pad_id=tokenizer.pad_id,
                           mesh=self.mesh)
    self.loaded_from: dict | None = None  # set by ``load``: path, phase, step, steps
    self.calibration: dict | None = None  # set by ``load``: the calibration.json in use

  def _prompts(self, prompts: Sequence[str], system: str | None = None,
               budget: Sequence[int] | int = 0) -> Prompts:
    """The encoded prompts, checked to fit the context with ``budget`` response tokens."""
    prompts = calls.texts("prompts", prompts)
    if system is not None and not isinstance(system, str):
      raise TypeError(f"system must be a string or None, got {type(system).__name__}.")
    for i, p in enumerate(prompts):
      if not p:
        raise ValueError(f"Prompt {i} is empty: there is no query to classify or answer.")
    encoded = Prompts.from_pieces([self.template.prompt_pieces(self.tokenizer, p, system=system)
                                   for p in prompts])
    check_context(encoded.lengths, budget, self.max_length)
    return encoded

  def classify(self, prompts: Sequence[str]) -> np.ndarray:
    """[N] float: P(malicious) of each query (the SFT-phase [CLS], as in training)."""
    self._require_cls("classify")
    encoded = self._prompts(prompts)
    return np.concatenate([self._decoder.classify(self.params, calls.select(encoded, rows))
                           for rows in calls.chunks(encoded.lengths, self.batch_size)])

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
    in smaller calls, ``chunks``). Sampling is reproducible: prompt i draws from
    (seed, i, step), whatever the batching.
    """
    for name, value in dict(max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed).items():
      calls.check_arg(name, value)
    gate = calls.resolve_gate(gate, self.gate_defaults, self.has_cls_head)
    prompts = calls.texts("prompts", prompts)
    n_prompts = len(prompts)
    sampler = calls.sampler_of(sampling, n_prompts, (temperature, top_k, top_p))
    if batch_size is not None and (not calls.is_int(batch_size) or batch_size < 1):
      raise ValueError(f"batch_size must be an integer >= 1 (or None), got {batch_size!r}.")
    prefill = None if prefill is None else calls.texts("prefill", prefill)
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
             return_logits: bool = False,
             prompt_embeds: Sequence[np.ndarray] | None = None) -> list[Generation]:
    """Whole generations for ``prompts`` (texts, rendered with ``system`` as ``generate``
    renders them, or already rendered ``Prompts``; ``generate`` checks its arguments, then
    calls this): the gate resolved (``resolve_gate``), its refusal encoded,
    each prompt checked to fit the context with its ``prefill_ids`` (forced response tokens)
    and ``max_new_tokens`` (shared or per prompt) after them, decoded in chunks of
    ``batch_size``. ``sampler_of``: prompt indices -> their sampler (``sampler_of``; default
    greedy); prompt i draws from (seed, ``row_ids[i]`` (default i), step).
    ``return_logits``: ``Generation.logits`` [N, V], the distribution each response token
    was chosen from. ``prompt_embeds``: per prompt, [L, D] input embeddings of its L tokens,
    decoded from instead of the tokens' own (a soft prompt: the embedding attack); the
    ``[CLS]`` keeps its embedding."""
    gate = calls.resolve_gate(gate, self.gate_defaults, self.has_cls_head)
    if not isinstance(prompts, Prompts):
      prompts = self._prompts(prompts, system)
    n = len(prompts)
    forced = [list(f) for f in prefill_ids] if prefill_ids is not None else [[]] * n
    if len(forced) != n:
      raise ValueError(f"{len(forced)} prefills for {n} prompts: give one per prompt.")
    new = np.broadcast_to(np.asarray(max_new_tokens), (n,))
    budget = new + np.array([len(f) for f in forced], np.int64)
    check_context(prompts.lengths, budget, self.max_length)
    rows_of = np.arange(n) if row_ids is None else np.asarray(row_ids)
    if prompt_embeds is not None and len(prompt_embeds) != n:
      raise ValueError(f"{len(prompt_embeds)} prompt embeddings for {n} prompts: give one "
                       "[L, D] array per prompt.")
    tok, out = self.tokenizer, []
    for rows in calls.chunks(prompts.lengths + budget, batch_size or self.batch_size):
      res = self._decoder(
          self.params, calls.select(prompts, rows), max_new_tokens=new[list(rows)], gate=gate,
          sampler=(sampler_of or (lambda r: make_sampler()))(rows), seed=seed,
          prefill=[forced[i] for i in rows], refusal_ids=tok.encode(gate.refusal_prefix),
          newline_ids=tok.encode("\n"), row_ids=rows_of[list(rows)],
          return_logits=return_logits,
          prompt_embeds=None if prompt_embeds is None else [prompt_embeds[i] for i in rows])
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
      max_len = (DEFAULT_SLOT_LEN if self.max_length is None
                 else min(self.max_length, DEFAULT_SLOT_LEN))
    if self.max_length is not None and max_len > self.max_length:
      raise ValueError(f"max_len={max_len} exceeds the model's maximum length of "
                       f"{self.max_length} tokens.")
    tok = self.tokenizer
    newline = tok.encode("\n")
    insertion = len(newline) + len(tok.encode(self.gate_defaults.refusal_prefix))
    return SlotDecoder(
        self.config, self.params, max_batch=max_batch, max_len=max_len, pad_id=tok.pad_id,
        eos_ids=[int(i) for i in self._decoder.eos_ids], with_cls=self.has_cls_head,
        resolve_gate=lambda gate: calls.resolve_gate(gate, self.gate_defaults, self.has_cls_head),
        refusal_ids=lambda gate: tok.encode(gate.refusal_prefix), newline_ids=newline,
        insertion_width=bucket(insertion), mesh=self.mesh)

  def slot_request(self, rendered: Rendered, *, max_new_tokens: int, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   gate: str | GateConfig | None = None, eos: bool = True) -> SlotRequest:
    """The ``SlotRequest`` of a ``render``ed chat (arguments checked as ``generate``'s)."""
    for name, value in dict(max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed).items():
      calls.check_arg(name, value)
    calls.resolve_gate(gate, self.gate_defaults, self.has_cls_head)  # fails early on a bad gate
    return SlotRequest(prompt_ids=list(rendered.ids), roles=list(rendered.roles),
                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, gate=gate, prefill_ids=list(rendered.prefill_ids),
                       eos=eos)

  def hidden_states(self, token_ids, layers: Sequence[int] | None = None) -> np.ndarray:
    """[B, T] int -> [len(layers), B, T, D] float32: the output of each block in ``layers``
    (default all) of the plain causal forward, no [CLS] (the one forward ``lm_logits``, the
    probe and ``convert``'s parity check read)."""
    ids = calls.token_ids(token_ids, self.config.vocab_size)
    layers = list(range(self.config.n_layers)) if layers is None else list(layers)
    if not layers or not all(calls.is_int(i) and 0 <= i < self.config.n_layers for i in layers):
      raise ValueError(f"layers must be block indices in [0, {self.config.n_layers}), got "
                       f"{layers}.")
    b, t = ids.shape
    _, states = plain_forward(self.config, self.params, calls.right_padded(ids), tuple(layers))
    return np.asarray(states, np.float32)[:, :b, :t]

  def lm_logits(self, token_ids) -> np.ndarray:
    """[B, T] int -> [B, T, V] float32: plain causal LM logits, no [CLS] (parity with the
    source model)."""
    ids = calls.token_ids(token_ids, self.config.vocab_size)
    b, t = ids.shape
    logits, _ = plain_forward(self.config, self.params, calls.right_padded(ids))
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
                         calls.texts("prompts", prompts),
                         calls.texts("continuations", continuations),
                         with_cls=self.has_cls_head, batch_size=batch_size or self.batch_size,
                         max_length=self.max_length, system=system, chat=chat,
                         truncate=truncate)

  def gate_stream(self, prompt: str | tuple[Sequence[int], Sequence[int]], *,
                  gate: str | GateConfig = "every",
                  system: str | None = None) -> moderation.GateStream:
    """The gate as a guard over a response written elsewhere: ``.extend(text)`` appends a
    piece of the response and returns the ``moderation.Verdict`` so far (P(malicious) at each
    evaluated window, whether and where the gate would have fired). ``prompt``: the query
    (through the chat template, as ``generate``), or already rendered (ids, roles)."""
    self._require_cls("gate_stream")
    gate = calls.resolve_gate(gate, self.gate_defaults, True)
    if isinstance(prompt, str):
      encoded = self._prompts([prompt], system)
      prompt = (encoded.ids[0], encoded.roles[0])
    return moderation.GateStream(self.config, self.params, self.tokenizer, *prompt, gate,
                                 self.max_length)

  @property
  def max_length(self) -> int | None:
    """The context: the most prompt + response tokens (``None``: no limit)."""
    return self._decoder.max_length

  @property
  def has_classifier(self) -> bool:
    """Whether ``classify`` works (a [CLS] head; ``defence.Defence``)."""
    return self.has_cls_head

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """The tokens that end a response (none: responses run to their budget)."""
    return tuple(int(i) for i in self._decoder.eos_ids if i >= 0)

  def check_length(self, n_prompt: int, n_response: int, limit: int | None = None) -> None:
    """Raise ValueError unless ``n_prompt`` + ``n_response`` tokens fit the context
    (``limit``: a shorter one than the model's, e.g. a server's slots)."""
    check_context(np.array([n_prompt]), n_response,
                  self.max_length if limit is None else limit)

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
      raise ValueError(f"{what} {calls.NO_CLS}")
