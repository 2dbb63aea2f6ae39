"""Decode slots: a fixed set of rows that requests enter and leave while the others decode.

A ``SlotDecoder`` holds ``max_batch`` rows (slots) of one ``LoopState``: each slot its row of
the KV cache (``cache.py``'s layout), its gate state and its ``RowSettings`` (budget, forced
prefill, sampler settings, seed, gate settings and schedule, refusal). ``start`` runs one
request's prompt pass (``loop.start_rows``; the prompt padded to a power-of-two bucket, so
lengths share programs) and writes its row; ``advance(n)`` moves every live slot ``n`` steps
in one compiled call (``loop.run_steps``: the same steps as a whole ``Decoder`` call, the
[CLS] row riding in the token's forward when some slot re-evaluates), the state's buffers
donated; ``free`` releases a slot. Settings are arrays, so slots with different settings
share the one ``advance`` program: nothing recompiles as requests come and go (``advance``
compiles once per chunk size and key bucket, the prompt pass once per prompt bucket; writing
a started row and resizing the cache are copies that compile in milliseconds).

The cache holds the key slots the running slots can reach by the end of the next chunk (the
longest prompt + response + chunk among them, rounded up to a power of two of at least
``MIN_KEYS``, at most ``2 + max_len``), not the whole context: with 16 slots of 2,048 tokens,
SmolLM2-135M read ~1.5 GB of K/V per step over the full context against 0.54 GB of weights.
It is resized (one copy) only when that bucket changes, so a chunk neither cuts its keys out
of a larger cache nor puts them back (at 8 steps a chunk that round trip cost SmolLM2-135M at
16 slots ~28 ms, 10% of the chunk).

A slot's tokens do not depend on what shares the batch (rows are independent; a row draws its
samples from its own ``(seed, row, step)`` keys), so a request decodes as
``SafetyModel.generate`` decodes it alone. A slot's response stops at EOS (``eos``), its
budget, or the end of the slot's context.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from safety_align import sharding
from safety_align.decode import gate as gate_lib
from safety_align.decode import sampling
from safety_align.decode.cache import PROMPT_SLOT, Prompts, bucket, check_context
from safety_align.decode.loop import (DecodeInputs, DecodeSpec, LoopState, RowSettings,
                                      run_steps, start_rows)
from safety_align.model import ModelConfig, unroll_layers

MIN_KEYS = 64  # the smallest key bucket a chunk attends over


@dataclasses.dataclass(frozen=True)
class SlotRequest:
  """One request: the rendered prompt (``prompt_ids`` and their ``roles``, as
  ``SafetyModel.render`` gives them), ``max_new_tokens`` after the forced ``prefill_ids``,
  sampling settings (temperature 0: greedy) drawn from ``(seed, row, step)`` keys, the ``gate``
  (a schedule name, ``None`` for the model's defaults, or a ``GateConfig``; resolved as
  ``SafetyModel.generate`` resolves it) and whether EOS ends the response."""

  prompt_ids: Sequence[int]
  roles: Sequence[int]
  max_new_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  gate: str | gate_lib.GateConfig | None = "annealing"
  prefill_ids: Sequence[int] = ()
  eos: bool = True
  row: int = 0


@dataclasses.dataclass
class SlotEvents:
  """What one ``start`` or ``advance`` produced for one slot: the new response ``tokens``
  (forced and inserted refusal tokens included, EOS excluded), each new evaluation as
  (response step, P(malicious)) in ``cls`` (step 0: the query's classification), whether the
  gate has inserted its refusal (``refused``, from ``refusal_step`` on) and whether the slot is
  ``done`` (EOS, budget or the context's end)."""

  slot: int
  tokens: list[int]
  cls: list[tuple[int, float]]
  refused: bool
  refusal_step: int | None
  done: bool


class SlotDecoder:
  """``max_batch`` decode slots of ``max_len`` tokens (prompt + response) each.

  Args:
    cfg, params: the model (parameters unrolled, as ``SafetyModel`` holds them).
    max_batch: slots; max_len: each slot's context.
    pad_id, eos_ids: the tokenizer's filler and end-of-response tokens.
    with_cls: [CLS] in the prompt pass and re-evaluations (a model trained with it).
    resolve_gate: a request's ``gate`` -> ``GateConfig`` (``api.resolve_gate`` with the
      model's defaults).
    refusal_ids: a ``GateConfig`` -> the token ids of its refusal prefix.
    newline_ids: the tokens put before a refusal inserted mid-response.
    insertion_width: most newline + refusal tokens a request's gate may insert.
    mesh: slots sharded over this mesh (``sharding.DecodeLayout``: rows over the data axes
      when ``max_batch`` divides them, KV heads over ``tensor``); ``None``: one device.
  """

  def __init__(self, cfg: ModelConfig, params, *, max_batch: int, max_len: int, pad_id: int,
               eos_ids: Sequence[int], with_cls: bool,
               resolve_gate: Callable[[object], gate_lib.GateConfig],
               refusal_ids: Callable[[gate_lib.GateConfig], Sequence[int]],
               newline_ids: Sequence[int], insertion_width: int, mesh: Mesh | None = None):
    for name, value, least in (("max_batch", max_batch, 1), ("max_len", max_len, 2)):
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}.")
    self.max_batch, self.max_len = int(max_batch), int(max_len)
    self.params = params
    self._resolve, self._refusal_ids, self._newline = resolve_gate, refusal_ids, list(newline_ids)
    layout = None if mesh is None else sharding.DecodeLayout.of(cfg, mesh, self.max_batch)
    self._spec = DecodeSpec(cfg=cfg, pad_id=pad_id, eos_ids=tuple(int(i) for i in eos_ids),
                            with_cls=with_cls, n_newline=len(newline_ids), layout=layout)
    self._width = int(insertion_width)
    self._full = PROMPT_SLOT + self.max_len  # key slots of a whole context
    self._state = _empty_state(self._spec, params, self.max_batch, self.max_len, self._width,
                               keys=min(MIN_KEYS, self._full))
    if layout is not None:
      self._state = jax.device_put(self._state, _state_shardings(layout, self._state))
    self._live: dict[int, tuple[int, int, bool]] = {}  # slot -> (tokens, evaluations, done)
    self._prompt_len: dict[int, int] = {}  # live slot -> its prompt's tokens

  @property
  def keys(self) -> int:
    """The key slots the cache holds now (see the module doc)."""
    return int(self._state.cache.roles.shape[1])

  def live(self) -> list[int]:
    """The started slots not yet freed (a done slot stays live until ``free``)."""
    return sorted(self._live)

  def start(self, slot: int, request: SlotRequest) -> SlotEvents:
    """Run ``request``'s prompt pass into ``slot`` (free): its events so far (the first
    classification, the first response token)."""
    if not 0 <= slot < self.max_batch or slot in self._live:
      raise ValueError(f"Slot {slot} is not a free slot of 0..{self.max_batch - 1}: free it "
                       "first, or pick one not in live().")
    inputs = self._inputs(request)
    self._resize(max(self.keys, self._bucket(PROMPT_SLOT + len(request.prompt_ids))))
    row, view = _prompt_row(self._spec, self.params, inputs)
    self._state = _insert(self._spec, self._state, np.int32(slot), row)
    tokens, length, prob, n_evals, refusal_step, done = jax.device_get(view)
    self._live[slot] = (int(length), int(n_evals), bool(done))
    self._prompt_len[slot] = len(request.prompt_ids)
    return SlotEvents(slot=slot, tokens=[int(tokens)] if length else [],
                      cls=[(0, float(prob))] if n_evals else [],
                      refused=bool(refusal_step >= 0),
                      refusal_step=int(refusal_step) if refusal_step >= 0 else None,
                      done=bool(done))

  def advance(self, n: int) -> list[SlotEvents]:
    """Advance every live slot that is not done by ``n`` steps (one compiled call): the
    events of those slots."""
    if not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"advance takes a number of steps >= 1, got {n!r}.")
    running = [s for s in self.live() if not self._live[s][2]]
    if not running:
      return []
    self._resize(self._keys(running, int(n)))
    self._state, view = _advance(self._spec, self.params, self._state, int(n))
    view = jax.device_get(view)
    events = []
    for s in running:
      tokens0, evals0, _ = self._live[s]
      new_tokens = int(view["length"][s]) - tokens0
      new_evals = int(view["n_evals"][s]) - evals0
      self._live[s] = (int(view["length"][s]), int(view["n_evals"][s]), bool(view["done"][s]))
      step = int(view["refusal_step"][s])
      events.append(SlotEvents(
          slot=s, tokens=view["tokens"][s, :new_tokens].tolist(),
          cls=[(int(a), float(p)) for a, p in zip(view["eval_steps"][s, :new_evals],
                                                   view["probs"][s, :new_evals])],
          refused=step >= 0, refusal_step=step if step >= 0 else None,
          done=bool(view["done"][s])))
    return events

  def _keys(self, running: list[int], n: int) -> int:
    """The key slots ``n`` steps of the ``running`` slots read and write: the bucket of
    ``PROMPT_SLOT`` + prompt + tokens so far + ``n`` (one ``advance`` program per bucket)."""
    return self._bucket(max(PROMPT_SLOT + self._prompt_len[s] + self._live[s][0] + n
                            for s in running))

  def _bucket(self, need: int) -> int:
    """A power-of-two number of key slots >= ``need`` and ``MIN_KEYS``, at most a context."""
    return min(bucket(need, minimum=MIN_KEYS), self._full)

  def _resize(self, keys: int) -> None:
    """Cut or pad the cache to ``keys`` key slots (no copy when it holds that many)."""
    if keys != self.keys:
      self._state = _resized(self._spec, self._state, keys)

  def free(self, slot: int) -> None:
    """Release ``slot`` (live or not); its row is overwritten by the next ``start``."""
    self._prompt_len.pop(slot, None)
    if self._live.pop(slot, None) is not None:
      self._state = _stop(self._state, np.int32(slot))

  def _inputs(self, request: SlotRequest) -> DecodeInputs:
    """The one-row ``DecodeInputs`` of ``request`` (checked), at the slots' widths."""
    ids, roles = list(request.prompt_ids), list(request.roles)
    prompt = Prompts.from_arrays([ids], [roles])  # checks roles
    check_context([len(ids)], 1, self.max_len)
    forced = list(request.prefill_ids)
    if request.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}.")
    gate = self._resolve(request.gate)
    insertion = self._newline + list(self._refusal_ids(gate))
    if len(insertion) > self._width:
      raise ValueError(f"The gate's refusal ({len(insertion)} tokens with the newline) is "
                       f"longer than these slots' {self._width}: make the slots with a larger "
                       "insertion_width.")
    n = self.max_len
    budget = min(len(forced) + request.max_new_tokens, n - len(ids))
    tokens, prompt_roles = prompt.left_padded(min(bucket(len(ids)), n), self._spec.pad_id)
    row = np.full((1, n), self._spec.pad_id, np.int32)
    row[0, :min(len(forced), n)] = forced[:n]
    padded_insertion = np.full((1, self._width), self._spec.pad_id, np.int32)
    padded_insertion[0, :len(insertion)] = insertion
    return DecodeInputs(tokens=tokens, roles=prompt_roles, rows=RowSettings(
        length=np.array([len(ids)], np.int32), forced=row,
        n_forced=np.array([len(forced)], np.int32), budget=np.array([budget], np.int32),
        row_id=np.array([request.row], np.int32), seed=np.array([request.seed], np.int32),
        insertion=padded_insertion, n_insert=np.array([max(len(insertion), 1)], np.int32),
        sampler=sampling.PerRow.of([request]), gate=gate.arrays(n).rows(1),
        stop_at_eos=np.array([request.eos])))


def _empty_state(spec: DecodeSpec, params, b: int, n: int, width: int, keys: int) -> LoopState:
  """A state of ``b`` done slots: zeros of the shapes ``start_rows`` gives ``b`` rows with a
  ``keys``-slot key cache and ``n``-token responses."""
  rows = RowSettings(
      length=np.ones(b, np.int32), forced=np.zeros((b, n), np.int32),
      n_forced=np.zeros(b, np.int32), budget=np.ones(b, np.int32),
      row_id=np.zeros(b, np.int32), seed=np.zeros(b, np.int32),
      insertion=np.zeros((b, width), np.int32), n_insert=np.ones(b, np.int32),
      sampler=sampling.PerRow.of([sampling.Sampling(0.0, 0, 1.0)] * b),
      gate=gate_lib.GateConfig().arrays(n).rows(b), stop_at_eos=np.ones(b, bool))
  inputs = DecodeInputs(tokens=np.zeros((b, 1), np.int32), roles=np.zeros((b, 1), np.int32),
                        rows=rows)
  shapes = jax.eval_shape(functools.partial(start_rows, dataclasses.replace(spec, layout=None),
                                            s_len=keys),
                          params, inputs)
  state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return state.replace(done=jnp.ones((b,), bool), rows=jax.tree.map(jnp.asarray, rows))


def _state_shardings(layout: sharding.DecodeLayout, state: LoopState):
  """Where each part of the slots' state lives: the cache's K/V on ``layout.kv``, everything
  else (every array has a row axis) on ``layout.rows``."""
  rest = jax.tree.map(lambda _: layout.rows, state.replace(cache=state.cache.replace(kv=None)))
  return rest.replace(cache=rest.cache.replace(kv=jax.tree.map(lambda _: layout.kv,
                                                               state.cache.kv)))


@functools.partial(jax.jit, static_argnums=0)
def _prompt_row(spec: DecodeSpec, params, inputs: DecodeInputs):
  """The started request ``inputs`` (one row: its prompt pass, ``loop.start_rows``) and its
  (first token, length, P(malicious), evaluations, refusal step, done)."""
  cfg, params = unroll_layers(spec.cfg, params)
  one = start_rows(dataclasses.replace(spec, cfg=cfg, layout=None), params, inputs)
  return one, (one.tokens[0, 0], one.length[0], one.probs[0, 0], one.n_evals[0],
               one.gate.refusal_step[0], one.done[0])


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _insert(spec: DecodeSpec, state: LoopState, slot, one: LoopState) -> LoopState:
  """``state`` with row ``slot`` replaced by the started row ``one``, its cache cut or padded
  to the state's key slots (its prompt is packed at the front: ``loop.prompt_pass``)."""
  row = one.cache.fitted(state.cache.roles.shape[1])
  kv = jax.tree.map(lambda big, small: jax.lax.dynamic_update_slice(
      big, small.astype(big.dtype), (slot,) + (0,) * (big.ndim - 1)), state.cache.kv, row.kv)
  cache = state.cache.replace(kv=kv, roles=state.cache.roles.at[slot].set(row.roles[0]),
                              positions=state.cache.positions.at[slot].set(row.positions[0]))
  rest = jax.tree.map(lambda big, small: big.at[slot].set(small[0]),
                      state.replace(cache=None), one.replace(cache=None))
  return _laid_out_slots(spec, rest.replace(cache=cache))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _resized(spec: DecodeSpec, state: LoopState, keys: int) -> LoopState:
  """``state`` with its cache cut or padded (PAD key slots) to ``keys`` key slots."""
  return _laid_out_slots(spec, state.replace(cache=state.cache.fitted(keys)))


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=2)
def _advance(spec: DecodeSpec, params, state: LoopState, n: int):
  """``state`` advanced ``n`` steps (``run_steps``), and per row its new tokens, new
  evaluations (steps, P(malicious)) [B, n] and its length, evaluations, refusal step and done
  flag."""
  cfg, params = unroll_layers(spec.cfg, params)
  length, n_evals = state.length, state.n_evals
  st = run_steps(dataclasses.replace(spec, cfg=cfg), params, state, n)

  def window(x, start):  # [B, n] of x [B, M] from each row's start
    at = jnp.minimum(start[:, None] + jnp.arange(n)[None], x.shape[1] - 1)
    return jnp.take_along_axis(x, at, axis=1)
  return st, dict(tokens=window(st.tokens, length), probs=window(st.probs, n_evals),
                  eval_steps=window(st.eval_steps, n_evals), length=st.length,
                  n_evals=st.n_evals, refusal_step=st.gate.refusal_step, done=st.done)


@functools.partial(jax.jit, donate_argnums=0)
def _stop(state: LoopState, slot) -> LoopState:
  """``state`` with row ``slot`` done (a freed slot is never advanced)."""
  return state.replace(done=state.done.at[slot].set(True))


def _laid_out_slots(spec: DecodeSpec, state: LoopState) -> LoopState:
  if spec.layout is None:
    return state
  return jax.lax.with_sharding_constraint(state, _state_shardings(spec.layout, state))
