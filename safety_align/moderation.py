"""The gate as a stream guard: its ``[CLS]`` windows over a response written by any model.

``GateStream`` runs the gate (``decode/gate.py``'s rules: schedule, windows, rules 1-3) over
response text that arrives in pieces, teacher-forced in the model's own KV cache: the
decoder's prompt pass first (``decode.loop.prompt_pass``: the query's classification, step 0,
the prompt packed at the cache's front), then the response tokens, each reading the ``[CLS]``
slot as the gate left it, and each due step ``n`` adds the window ``[CLS]`` row to the forward
of token ``n - 1``, as the decoder does. So its trace and firing step are the ones
``SafetyModel.generate(prefill=[response])`` records over the same tokens (to float tolerance:
the tokens between two due steps go through one forward).

Pieces: appending text can change the tokenization of the text's last pre-tokens (BPE merges
cross piece boundaries), never of those before (a tokenizer with a pre-tokenizer never merges
across its boundaries). So each new piece re-encodes only the text from the start of the last
two pre-tokens on; the stream rolls back to the newest snapshot (taken after every due step)
at or before the first re-encoded token and feeds the new tail from there (the boundaries are
found by pre-tokenizing the text's last ``_PRE_WINDOW`` characters). A tokenizer without a
pre-tokenizer re-encodes the whole text (still correct, only slower).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from safety_align.decode import gate as gate_lib
from safety_align.decode import loop
from safety_align.decode.cache import (CLS_SLOT, PROMPT_SLOT, DecodeState, bucket,
                                       response_mask, window_mask)
from safety_align.masks import Role
from safety_align.model import KVCache, ModelConfig, Transformer

_PRE_WINDOW = 256  # characters pre-tokenized to find the text's last pre-token boundaries


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The gate over a response so far. ``tokens``: response tokens read; ``steps``/``probs``:
  each evaluation's step (0 = the query's classification; step n reads tokens < n) and
  P(malicious); ``fired``: whether the gate decided to insert its refusal, ``fire_step`` the
  response token it would have replaced (the refusal starts there) and ``fire_char`` where that
  token starts in the response text."""

  tokens: int
  steps: list[int]
  probs: list[float]
  fired: bool
  fire_step: int | None
  fire_char: int | None


@dataclasses.dataclass(frozen=True)
class _Snapshot:
  """The stream after the evaluation at ``step``: gate state, the ``[CLS]`` slot's keys and
  values (per layer [1, Hkv, 1, Dh]) and position, and how many evaluations the trace held."""

  step: int
  gate: gate_lib.GateState
  cls_k: tuple
  cls_v: tuple
  cls_position: jax.Array
  n_evals: int


class GateStream:
  """The gate over one prompt's response, extended piece by piece (``extend``).

  Args:
    cfg, params: the model (layers unrolled, as ``SafetyModel`` holds them).
    tokenizer: the model's tokenizer.
    prompt_ids, prompt_roles: the chat-rendered prompt (BOS, TEMPLATE, QUERY roles).
    gate: the resolved gate; its schedule decides the steps evaluated.
    max_length: the model's context (prompt + response tokens), ``None`` for no limit.
  """

  def __init__(self, cfg: ModelConfig, params, tokenizer, prompt_ids, prompt_roles,
               gate: gate_lib.GateConfig, max_length: int | None):
    self.cfg, self.params, self.tok, self.gate = cfg, params, tokenizer, gate
    self.max_length = max_length
    self.n_prompt = len(prompt_ids)
    self._p = bucket(self.n_prompt)
    tokens = np.full((1, self._p), tokenizer.pad_id, np.int32)
    roles = np.full((1, self._p), int(Role.PAD), np.int32)
    tokens[0, self._p - self.n_prompt:] = prompt_ids
    roles[0, self._p - self.n_prompt:] = prompt_roles
    self._capacity = bucket(1)
    self.cache, p0 = _prompt_pass(cfg, params, tokens, roles, np.int32([self.n_prompt]),
                                  self._slots(self._capacity))
    self._arrays = gate.arrays(self._capacity)
    self._table = gate_lib.schedule_steps(gate, self._capacity)
    self._state = gate_lib.init(self._arrays, p0)
    self.text = ""
    self.ids: list[int] = []
    self._starts: list[int] = []  # character offset where each response token starts
    self._fed = 0  # response tokens in the cache
    self.steps, self.probs = [0], [float(p0[0])]
    self.fire_step = 0 if bool(self._state.triggered[0]) else None
    self._snapshots = [self._snapshot(0)]

  def _slots(self, capacity: int) -> int:
    return PROMPT_SLOT + self._p + capacity

  def extend(self, piece: str) -> Verdict:
    """Append ``piece`` to the response and run the gate over the new tokens."""
    text = self.text + piece
    start = self._stable_prefix()
    tail = self.tok.hf.encode(text[start:], add_special_tokens=False)
    keep = int(np.searchsorted(self._starts, start)) if start else 0
    ids = self.ids[:keep] + list(tail.ids)
    if self.max_length is not None and self.n_prompt + len(ids) > self.max_length:
      raise ValueError(f"The response is {len(ids)} tokens after a {self.n_prompt}-token "
                       f"prompt, over the model's context of {self.max_length}: the gate "
                       "cannot read past it.")
    self.text, self.ids = text, ids
    self._starts = self._starts[:keep] + [start + s for s, _ in tail.offsets]
    self._rollback(min(keep, self._fed))
    self._feed(len(ids))
    return self.verdict()

  def verdict(self) -> Verdict:
    step = self.fire_step
    char = None if step is None else (self._starts[step] if step < len(self._starts)
                                      else len(self.text))
    return Verdict(tokens=len(self.ids), steps=list(self.steps), probs=list(self.probs),
                   fired=step is not None, fire_step=step, fire_char=char)

  def _stable_prefix(self) -> int:
    """Characters of the text whose tokens no appended text can change: up to the start of
    its last two pre-tokens (0 without a pre-tokenizer)."""
    pre = self.tok.hf.pre_tokenizer
    if pre is None or not self.text:
      return 0
    start = max(0, len(self.text) - _PRE_WINDOW)  # the window's first split may be cut
    splits = pre.pre_tokenize_str(self.text[start:])
    if start and len(splits) < 3:
      start, splits = 0, pre.pre_tokenize_str(self.text)
    return start + splits[-2][1][0] if len(splits) >= 2 else 0

  def _snapshot(self, step: int) -> _Snapshot:
    kv = self.cache.kv
    return _Snapshot(step=step, gate=self._state,
                     cls_k=tuple(k[:, :, CLS_SLOT:CLS_SLOT + 1] for k in kv.k),
                     cls_v=tuple(v[:, :, CLS_SLOT:CLS_SLOT + 1] for v in kv.v),
                     cls_position=self.cache.positions[:, CLS_SLOT], n_evals=len(self.steps))

  def _rollback(self, n: int) -> None:
    """Back to the state after ``n`` response tokens (and the evaluation at step ``n``)."""
    if n == self._fed:
      return
    while self._snapshots[-1].step > n:
      self._snapshots.pop()
    snap = self._snapshots[-1]
    kv = self.cache.kv
    at = lambda a, new: a.at[:, :, CLS_SLOT:CLS_SLOT + 1].set(new)  # noqa: E731
    self.cache = self.cache.replace(
        kv=KVCache(k=tuple(map(at, kv.k, snap.cls_k)), v=tuple(map(at, kv.v, snap.cls_v))),
        roles=self.cache.roles.at[:, self._slot(n):].set(Role.PAD),
        positions=self.cache.positions.at[:, CLS_SLOT].set(snap.cls_position))
    self._state = snap.gate
    del self.steps[snap.n_evals:], self.probs[snap.n_evals:]
    if not bool(self._state.triggered[0]):
      self.fire_step = None
    self._fed = n

  def _grow(self, n: int) -> None:
    """Room in the cache (and the schedule table) for ``n`` response tokens."""
    if n <= self._capacity:
      return
    new = bucket(n)
    pad = new - self._capacity
    widen = lambda a, fill=0: jnp.pad(a, ((0, 0), (0, pad)), constant_values=fill)  # noqa: E731
    slots = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0)))  # noqa: E731
    kv = self.cache.kv
    self.cache = DecodeState(kv=KVCache(k=tuple(map(slots, kv.k)), v=tuple(map(slots, kv.v))),
                             roles=widen(self.cache.roles, int(Role.PAD)),
                             positions=widen(self.cache.positions))
    self._capacity = new
    self._arrays = self.gate.arrays(new)
    self._table = gate_lib.schedule_steps(self.gate, new)

  def _next_due(self, n: int) -> int | None:
    """The next step after ``n`` the gate evaluates at (state changes only at evaluations)."""
    if int(self._state.mode[0]) == gate_lib.SUSPECT:
      return n + 1
    later = np.flatnonzero(self._table[n + 1:])
    return n + 1 + int(later[0]) if len(later) else None

  def _feed(self, end: int) -> None:
    """Feed response tokens ``self._fed .. end - 1``, evaluating every due step <= ``end``."""
    self._grow(end)
    lengths = np.int32([self.n_prompt])
    while self._fed < end:
      n = self._fed
      m = self._next_due(n)
      last = end if m is None or m > end else m - 1  # tokens n .. last-1 read the old [CLS]
      if last > n:
        self.cache = _tokens(self.cfg, self.params, self.cache, self._padded(n, last),
                             np.int32(self._slot(n)), np.int32(self.n_prompt + n),
                             np.int32(last - n))
      if last == end:
        self._fed = end
        break
      sees_query, lo, hi = gate_lib.window(self._arrays, self._state, m)
      self.cache, prob = _token_cls(self.cfg, self.params, self.cache,
                                    np.int32([self.ids[m - 1]]), np.int32(self._slot(m - 1)),
                                    np.int32([self.n_prompt + m - 1]), sees_query,
                                    lo + lengths, hi + lengths)
      triggered = bool(self._state.triggered[0])
      self._state = gate_lib.update(self._arrays, self._state, jnp.ones((1,), bool), prob, m)
      if not triggered and bool(self._state.triggered[0]):
        self.fire_step = m
      self.steps.append(m)
      self.probs.append(float(prob[0]))
      self._fed = m
      self._snapshots.append(self._snapshot(m))

  def _slot(self, j: int) -> int:
    """Cache slot of response token ``j`` (the prompt packed at the front, as the decoder's)."""
    return PROMPT_SLOT + self.n_prompt + j

  def _padded(self, a: int, b: int) -> np.ndarray:
    """[1, bucket(b - a)] response tokens a .. b-1, padded (one compiled program a bucket)."""
    out = np.full((1, bucket(b - a, minimum=1)), self.tok.pad_id, np.int32)
    out[0, :b - a] = self.ids[a:b]
    return out


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prompt_pass(cfg: ModelConfig, params, tokens, roles, lengths, s_len: int):
  """The decoder's prompt pass (``loop.prompt_pass``) of one left-padded row, its cache padded
  to ``s_len`` slots: (``DecodeState``, P(malicious) [1])."""
  cache, _, p0 = loop.prompt_pass(cfg, params, tokens, roles, lengths, True)
  return cache.padded(s_len), p0


@functools.partial(jax.jit, static_argnums=0)
def _tokens(cfg: ModelConfig, params, cache: DecodeState, tokens, first_slot, first_position,
            n):
  """Write response tokens [1, K] (the first ``n`` real) at consecutive slots and positions,
  each reading causal text and the ``[CLS]`` slot: the new ``DecodeState``."""
  k = tokens.shape[1]
  offsets = jnp.arange(k)
  slots, positions = first_slot + offsets, first_position + offsets
  real = offsets < n
  cache = cache.replace(
      roles=cache.roles.at[0, slots].set(jnp.where(real, Role.RESPONSE, Role.PAD), mode="drop"),
      positions=cache.positions.at[0, slots].set(positions, mode="drop"))
  mask = response_mask(cache, positions[None])  # [1, K, S]
  _, _, kv = Transformer(cfg).apply(
      {"params": params}, tokens, positions[None], mask, cache.kv, slots[None],
      lm_rows=slice(0, 0), cls_keys=cache.roles == Role.CLS)
  return cache.replace(kv=kv)


@functools.partial(jax.jit, static_argnums=0)
def _token_cls(cfg: ModelConfig, params, cache: DecodeState, token, slot, position,
               sees_query, lo, hi):
  """Response token [1] at ``slot`` and the window ``[CLS]`` row (``lo``, ``hi`` [1]
  inclusive positions) in one forward, as the decoder's due step: (``DecodeState``,
  P(malicious) [1])."""
  cache = cache.set_keys(slot, jnp.full((1,), Role.RESPONSE, jnp.int32), position)
  cls_mask, cls_pos = window_mask(cache, sees_query, lo, hi, jnp.full((1,), CLS_SLOT))
  _, cls, kv = Transformer(cfg).apply(
      {"params": params}, jnp.stack([token, jnp.full((1,), cfg.cls_id, jnp.int32)], axis=1),
      jnp.stack([position, cls_pos], axis=1),
      jnp.stack([response_mask(cache, position), cls_mask], axis=1), cache.kv,
      jnp.stack([jnp.full((1,), slot), jnp.full((1,), CLS_SLOT)], axis=1),
      lm_rows=slice(0, 0), cls_keys=cache.roles == Role.CLS)
  cache = cache.replace(kv=kv, positions=cache.positions.at[:, CLS_SLOT].set(cls_pos))
  return cache, jax.nn.softmax(cls[:, 1])[:, 1]
