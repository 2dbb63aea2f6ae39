"""Batched, gated decoding: one prompt pass, then compiled ``lax.while_loop``s (METHOD.md 5).

Prompt pass: ``[CLS]`` + the left-padded prompts in one forward under the SFT-phase mask
(exactly the training mask), giving the first classification and the ``DecodeState``
(``cache.py``).

Step ``t`` feeds response token ``t`` (forced prefill, inserted refusal, or sampled) and yields
the logits of token ``t + 1``. When some row re-evaluates at this step (``gate.py``), the same
forward carries a second query row, ``[CLS]`` restricted to that row's window; it writes the
``[CLS]`` slot of re-evaluating rows (so token ``t`` and all later tokens read the new signal)
and the scratch slot of the others. The loop is two nested loops rather than one loop with a
``lax.cond`` between the two forwards: the outer one takes a two-row step (at step 1 even when
no row is due: its [CLS] row then only writes the scratch slot), then the inner one takes plain
one-row steps until some row is due again (a conditional would copy the whole KV
cache in and out of its branches on every step). So a step without re-evaluation runs exactly
the plain decoder's step. The loop stops when every row has hit EOS, its budget (forced
tokens + ``max_new_tokens``) or, at ``high`` reliance, the end of the refusal prefix.

Programs compile per (batch, prompt, response) power-of-two bucket, gate on/off, refusal
length and sampler kind (greedy or not); gate settings and schedules, sampler settings and
seeds are traced, so sweeps over them reuse one program.

Sharded (``Decoder(mesh=...)``): the program is jitted with in/out shardings of a
``sharding.DecodeLayout``: parameters by the training rules (heads, MLP and vocabulary over
``tensor``), rows over the data axes when the batch bucket divides them, the KV cache with KV
heads over ``tensor``; the loop state is held to that layout on every step, and no weight
matrix is ever gathered whole onto one device.

``cls_override`` (tests only): a [B, N+1] table of P(malicious) by evaluation step that
replaces the [CLS] head's output inside the compiled loop (NaN: the model's own), so the gate's
wiring in this loop can be tested on scripted signals; it is traced, one program serves every
script.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from safety_align import sharding
from safety_align.decode import gate as gate_lib
from safety_align.decode import sampling
from safety_align.decode.cache import (CLS_SLOT, PROMPT_SLOT, SCRATCH_SLOT, DecodeState,
                                       Prompts, bucket, prompt_pass_inputs, response_mask,
                                       window_mask)
from safety_align.masks import Role
from safety_align.model import KVCache, ModelConfig, Transformer, unroll_layers


@flax.struct.dataclass
class LoopState:
  """State of the decoding loop. ``step`` t: response index of ``token``, the token fed next."""

  step: jax.Array
  cache: DecodeState
  token: jax.Array  # [B]
  done: jax.Array  # [B] bool
  tokens: jax.Array  # [B, N] response tokens
  length: jax.Array  # [B]
  gate: gate_lib.GateState
  probs: jax.Array  # [B, N+1] P(malicious) of each evaluation
  eval_steps: jax.Array  # [B, N+1] step of each evaluation (0 = prompt pass)
  n_evals: jax.Array  # [B]
  logits: jax.Array | None  # [B, N, V] when requested


@dataclasses.dataclass(frozen=True)
class DecodeOutput:
  """Host-side results, per row: ``tokens`` [B, N] (valid up to ``lengths``; EOS excluded),
  ``refused`` / ``refusal_step`` (response index of the refusal prefix's first token, -1), the
  evaluations ``cls_probs`` / ``cls_steps`` [B, N+1] (valid up to ``n_evals``), and ``logits``
  [B, N, V] (the distribution each response token was chosen from) when requested."""

  tokens: np.ndarray
  lengths: np.ndarray
  refused: np.ndarray
  refusal_step: np.ndarray
  cls_probs: np.ndarray
  cls_steps: np.ndarray
  n_evals: np.ndarray
  logits: np.ndarray | None

  def response(self, i: int) -> list[int]:
    return self.tokens[i, :self.lengths[i]].tolist()

  def trace(self, i: int) -> tuple[list[int], list[float]]:
    """(steps, P(malicious)) of row i's evaluations."""
    n = self.n_evals[i]
    return self.cls_steps[i, :n].tolist(), self.cls_probs[i, :n].tolist()


class Decoder:
  """Gated decoding for one model architecture.

  Args:
    cfg: the model's architecture.
    eos_ids: the end-of-sequence token(s) (none: decode to the budget).
    max_length: the longest prompt + response (in tokens) allowed; ``None`` for no limit.
    pad_id: filler for unused token slots.
    mesh: decode sharded over this mesh (``sharding.DecodeLayout``); the parameters passed
      should already be placed by ``sharding.param_shardings`` (else they are moved there on
      every call). ``None``: one device.
  """

  def __init__(self, cfg: ModelConfig, *, eos_ids: Sequence[int] = (),
               max_length: int | None = None, pad_id: int = 0, mesh: Mesh | None = None):
    self.cfg = cfg
    self.eos_ids = np.array(list(eos_ids) or [-1], np.int32)
    self.max_length = max_length
    self.pad_id = pad_id
    self.mesh = sharding.as_mesh(mesh)
    self._sharded = {}  # (layout, parameter tree, static settings) -> (jitted, shardings)

  def classify(self, params, prompts: Prompts) -> np.ndarray:
    """[B] P(malicious) of each query: the prompt-pass classification."""
    tokens, roles, lengths, _ = self._pad_prompts(prompts)
    return np.asarray(_classify(self.cfg, params, tokens, roles, lengths))[:len(prompts)]

  def __call__(self, params, prompts: Prompts, *, max_new_tokens: int,
               gate: gate_lib.GateConfig, sampler=sampling.Greedy(), seed: int = 0,
               prefill: Sequence[Sequence[int]] | None = None, refusal_ids: Sequence[int] = (),
               newline_ids: Sequence[int] = (), row_ids: Sequence[int] | None = None,
               return_logits: bool = False, cls_override=None) -> DecodeOutput:
    """Decode a batch.

    Args:
      params: unboxed model parameters.
      prompts: the encoded prompts.
      max_new_tokens: tokens each row may add after its forced ``prefill``.
      gate: the gate (``schedule="off"``: no [CLS] at all).
      sampler: ``sampling.Greedy()`` or ``sampling.Sampling`` (see ``make_sampler``).
      seed: sampling seed; row i draws from (seed, row_ids[i], step).
      prefill: per row, response tokens forced at the start (the prefill attack).
      refusal_ids, newline_ids: token ids of the refusal prefix and of the newline put before
        it mid-response.
      row_ids: per-row indices for the sampling keys (default 0..B-1).
      return_logits: also return the logits each response token was chosen from.
      cls_override: tests only: [B, k] P(malicious) the gate uses at evaluation step n (column
        n; 0 is the prompt pass) instead of the [CLS] head's; NaN, or a step past column k-1: the
        head's own. ``cls_probs`` then records the values the gate used.
    """
    b = len(prompts)
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    prefill = [[]] * b if prefill is None else [list(p) for p in prefill]
    if len(prefill) != b:
      raise ValueError(f"{len(prefill)} prefills for {b} prompts.")
    if gate.enabled and gate.reliance != "low" and not refusal_ids:
      raise ValueError(f"reliance={gate.reliance!r} inserts a refusal: give refusal_ids.")
    n_forced = np.array([len(p) for p in prefill], np.int32)
    budget = n_forced + max_new_tokens
    lengths = prompts.lengths
    if self.max_length is not None:
      over = np.nonzero(lengths + budget > self.max_length)[0]
      if len(over):
        i = over[0]
        raise ValueError(
            f"Prompt {i} ({lengths[i]} tokens) + {budget[i]} response tokens exceeds the "
            f"model's maximum length of {self.max_length} tokens; shorten the prompt or "
            "lower max_new_tokens.")
    n = bucket(int(budget.max()))
    forced = np.full((b, n), self.pad_id, np.int32)
    for i, p in enumerate(prefill):
      forced[i, :len(p)] = p
    rows = np.arange(b) if row_ids is None else np.asarray(row_ids)
    insertion = np.array(list(newline_ids) + list(refusal_ids) or [self.pad_id], np.int32)

    override = None if cls_override is None else _override_table(cls_override, b, n)

    tokens, roles, plens, pad = self._pad_prompts(prompts)
    args = (params, tokens, roles, plens, _pad_rows(forced, pad), _pad_rows(n_forced, pad),
            _pad_rows(budget, pad), _pad_rows(rows.astype(np.int32), pad), np.int32(seed),
            insertion, sampler, self.eos_ids, gate.arrays(n),
            None if override is None else _pad_rows(override, pad))
    static = dict(cfg=self.cfg, pad_id=self.pad_id, with_cls=gate.enabled,
                  n_newline=len(newline_ids), return_logits=return_logits)
    if self.mesh is None:
      out = _decode(*args, **static)
    else:
      layout = sharding.DecodeLayout.of(self.cfg, self.mesh, tokens.shape[0])
      run, shardings = self._sharded_decode(layout, params, static)
      out = run(jax.device_put(params, shardings), *args[1:])
    out = jax.tree.map(lambda x: np.asarray(x)[:b], jax.device_get(out))
    return DecodeOutput(refused=out["refusal_step"] >= 0, **out)

  def _sharded_decode(self, layout: sharding.DecodeLayout, params, static: dict):
    """(``_decode`` with the ``static`` settings, jitted with ``layout``'s shardings for
    ``params``' tree, the parameters' shardings)."""
    key = (layout, jax.tree.structure(params), tuple(static.items()))
    if key not in self._sharded:
      shardings = sharding.param_shardings(self.cfg, layout.mesh, params, layout.rules)
      rows, rep = layout.rows, layout.replicated
      self._sharded[key] = jax.jit(
          functools.partial(_decode_impl, **static, layout=layout),
          in_shardings=(shardings,) + (rows,) * 7 + (rep,) * 5 + (rows,),
          out_shardings=rows), shardings
    return self._sharded[key]

  def _pad_prompts(self, prompts: Prompts):
    """Prompts padded to the batch and length buckets: (tokens, roles, lengths, added rows)."""
    b = len(prompts)
    tokens, roles = prompts.left_padded(bucket(int(prompts.lengths.max())), self.pad_id)
    pad = bucket(b, minimum=1) - b
    return (_pad_rows(tokens, pad), _pad_rows(roles, pad), _pad_rows(prompts.lengths, pad),
            pad)


@functools.partial(jax.jit, static_argnums=0)
def _classify(cfg: ModelConfig, params, tokens, roles, lengths):
  """[B] P(malicious) of the prompt-pass [CLS] (no cache needed)."""
  toks, _, positions, mask = prompt_pass_inputs(cfg.cls_id, tokens, roles, lengths, True)
  _, cls_logits, _ = Transformer(cfg).apply({"params": params}, toks, positions, mask)
  return jax.nn.softmax(cls_logits[:, CLS_SLOT])[:, 1]


def _prompt_pass(cfg: ModelConfig, params, tokens, roles, lengths, s_len: int, with_cls: bool):
  """``DecodeState``, next-token logits [B, V] and P(malicious) [B] after the prompt."""
  b, p = tokens.shape
  toks, rls, positions, mask = prompt_pass_inputs(cfg.cls_id, tokens, roles, lengths, with_cls)
  t = p + 2
  write = jnp.broadcast_to(jnp.arange(t), (b, t))
  pad = ((0, 0), (0, s_len - t))
  key_roles = jnp.pad(rls, pad)
  lm, cls, kv = Transformer(cfg).apply(
      {"params": params}, toks, positions, jnp.pad(mask, ((0, 0), (0, 0), (0, s_len - t))),
      KVCache.zeros(cfg, b, s_len), write, lm_rows=slice(-1, None),
      cls_keys=key_roles == Role.CLS)
  cache = DecodeState(kv=kv, roles=key_roles, positions=jnp.pad(positions, pad))
  return cache, lm[:, 0], jax.nn.softmax(cls[:, CLS_SLOT])[:, 1]


def _token_step(cfg: ModelConfig, params, cache: DecodeState, token, q_pos, slot):
  """One RESPONSE token per row: logits [B, V], new K/V."""
  b = token.shape[0]
  lm, _, kv = Transformer(cfg).apply(
      {"params": params}, token[:, None], q_pos[:, None], response_mask(cache, q_pos)[:, None],
      cache.kv, jnp.full((b, 1), slot), cls_keys=cache.roles == Role.CLS)
  return lm[:, 0], kv


def _token_cls_step(cfg: ModelConfig, params, cache: DecodeState, token, q_pos, slot, due,
                    sees_query, lo, hi):
  """The token row and a window [CLS] row in one forward: (logits [B, V], P(malicious) [B],
  K/V, [CLS] positions [B]). Rows not ``due`` write their [CLS] row to the scratch slot. Row 0
  is the token, row 1 the [CLS]: only row 0 goes through the LM head (``lm_rows``)."""
  b = token.shape[0]
  self_slot = jnp.where(due, CLS_SLOT, SCRATCH_SLOT)
  cls_mask, cls_pos = window_mask(cache, sees_query, lo, hi, self_slot)
  lm, cls, kv = Transformer(cfg).apply(
      {"params": params},
      jnp.stack([token, jnp.full((b,), cfg.cls_id, jnp.int32)], axis=1),
      jnp.stack([q_pos, cls_pos], axis=1),
      jnp.stack([response_mask(cache, q_pos), cls_mask], axis=1),
      cache.kv, jnp.stack([jnp.full((b,), slot), self_slot], axis=1), lm_rows=slice(0, 1),
      cls_keys=cache.roles == Role.CLS)
  return lm[:, 0], jax.nn.softmax(cls[:, 1])[:, 1], kv, cls_pos


def _decode_impl(params, tokens, roles, lengths, forced, n_forced, budget, row_ids, seed,
                 insertion, sampler, eos_ids, gate: gate_lib.GateArrays, cls_override=None, *,
                 cfg: ModelConfig, pad_id: int, with_cls: bool, n_newline: int,
                 return_logits: bool, layout: sharding.DecodeLayout | None = None):
  """The whole decode (prompt pass + loop) of a bucketed batch; see ``Decoder.__call__``.

  Shapes: tokens, roles [B, P] int32 (left-padded prompts), lengths, n_forced, budget, row_ids
  [B] int32, forced [B, N] int32, cls_override None or [B, N+1] float32. ``layout``: hold the
  cache and the per-row state to it (sharded decoding), None on one device.

  The layers run unrolled (``unroll_layers``): a scanned model's weights are sliced out of the
  stack once here, before the loops, not at every step. That slice is a transient copy of the
  weights; ``SafetyModel`` passes weights unrolled at load, so it makes none."""
  chex.assert_rank([tokens, roles, lengths, forced, n_forced, budget, row_ids],
                   [2, 2, 1, 2, 1, 1, 1])
  chex.assert_type([tokens, roles, lengths, forced, n_forced, budget, row_ids], jnp.int32)
  chex.assert_equal_shape([tokens, roles])
  chex.assert_equal_shape_prefix([tokens, lengths, forced, n_forced, budget, row_ids], 1)
  if cls_override is not None:
    chex.assert_shape(cls_override, (tokens.shape[0], forced.shape[1] + 1))
    chex.assert_type(cls_override, jnp.float32)
  cfg, params = unroll_layers(cfg, params)
  b, p = tokens.shape
  n_max = forced.shape[1]
  rows = jnp.arange(b)
  cache, lm, p0 = _prompt_pass(cfg, params, tokens, roles, lengths, PROMPT_SLOT + p + n_max,
                               with_cls)

  def scripted(prob, n):
    """The gate's P(malicious) at evaluation step n: ``cls_override``'s where it has one."""
    if cls_override is None:
      return prob
    return jnp.where(jnp.isnan(cls_override[:, n]), prob, cls_override[:, n])

  p0 = scripted(p0, 0)
  gstate = gate_lib.init(gate, p0)

  def choose(gstate, lm, n, active):
    """Token at response index n: (token, eos [B], finished [B], gate state)."""
    sampled = sampler(lm, sampling.row_keys(seed, row_ids, n))
    token, was_sampled, finished, gstate = gate_lib.emit(
        gate, gstate, j=n, sampled=sampled, forced=forced[:, n], is_forced=n < n_forced,
        active=active, insertion=insertion, n_newline=n_newline)
    return token, was_sampled & jnp.isin(token, eos_ids), finished, gstate

  token, eos, finished, gstate = choose(gstate, lm, 0, jnp.ones((b,), bool))
  trace = jnp.zeros((b, n_max + 1), jnp.float32)
  state = LoopState(
      step=jnp.int32(0), cache=cache, token=token, done=eos | finished | (budget <= 1),
      tokens=jnp.full((b, n_max), pad_id, jnp.int32).at[:, 0].set(
          jnp.where(eos, pad_id, token)),
      length=jnp.where(eos, 0, 1).astype(jnp.int32), gate=gstate,
      probs=trace.at[:, 0].set(p0), eval_steps=jnp.zeros((b, n_max + 1), jnp.int32),
      n_evals=jnp.full((b,), int(with_cls), jnp.int32),
      logits=jnp.zeros((b, n_max, lm.shape[-1]), jnp.float32).at[:, 0].set(lm)
      if return_logits else None)
  state = _laid_out(layout, state)

  def step_inputs(st: LoopState):
    """Response index n of the token to choose, active rows, slot and position of the token
    fed, and the cache with that slot's role and position set."""
    active = ~st.done
    slot = PROMPT_SLOT + p + st.step
    q_pos = lengths + st.step
    cache = st.cache.set_keys(slot, jnp.where(active, Role.RESPONSE, Role.PAD), q_pos)
    return st.step + 1, active, slot, q_pos, cache

  def advance(st: LoopState, n, active, cache, lm, gstate, **evals) -> LoopState:
    """Choose token n from the logits ``lm`` and record it (``evals``: updated traces)."""
    token, eos, finished, gstate = choose(gstate, lm, n, active)
    write = active & ~eos
    return _laid_out(layout, st.replace(
        step=n, cache=cache, token=token,
        done=st.done | (active & (eos | finished | (n + 1 >= budget))),
        tokens=st.tokens.at[:, n].set(jnp.where(write, token, st.tokens[:, n])),
        length=jnp.where(write, n + 1, st.length), gate=gstate,
        logits=st.logits.at[:, n].set(lm) if return_logits else None, **evals))

  def token_step(st: LoopState) -> LoopState:
    n, active, slot, q_pos, cache = step_inputs(st)
    lm, kv = _token_step(cfg, params, cache, st.token, q_pos, slot)
    return advance(st, n, active, cache.replace(kv=kv), lm, st.gate)

  def token_cls_step(st: LoopState) -> LoopState:
    """A step with the [CLS] row: rows due re-evaluate, the others write the scratch slot."""
    n, active, slot, q_pos, cache = step_inputs(st)
    due = gate_lib.due(gate, st.gate, n, active)
    sees_query, lo, hi = gate_lib.window(gate, st.gate, n)
    lm, prob, kv, cls_pos = _token_cls_step(cfg, params, cache, st.token, q_pos, slot, due,
                                            sees_query, lo + lengths, hi + lengths)
    prob = scripted(prob, n)
    cache = cache.replace(kv=kv, positions=cache.positions.at[:, CLS_SLOT].set(
        jnp.where(due, cls_pos, cache.positions[:, CLS_SLOT])))
    k = jnp.minimum(st.n_evals, n_max)
    return advance(
        st, n, active, cache, lm, gate_lib.update(gate, st.gate, due, prob, n),
        probs=st.probs.at[rows, k].set(jnp.where(due, prob, st.probs[rows, k])),
        eval_steps=st.eval_steps.at[rows, k].set(jnp.where(due, n, st.eval_steps[rows, k])),
        n_evals=st.n_evals + due)

  def running(st: LoopState):
    return (st.step < n_max - 1) & ~jnp.all(st.done)

  if with_cls:
    def due_next(st: LoopState):
      return jnp.any(gate_lib.due(gate, st.gate, st.step + 1, ~st.done))

    def token_steps_until_due(st: LoopState) -> LoopState:
      return jax.lax.while_loop(lambda s: running(s) & ~due_next(s), token_step, st)

    st = jax.lax.while_loop(running, lambda s: token_steps_until_due(token_cls_step(s)), state)
  else:
    st = jax.lax.while_loop(running, token_step, state)
  return dict(tokens=st.tokens, lengths=st.length, refusal_step=st.gate.refusal_step,
              cls_probs=st.probs, cls_steps=st.eval_steps, n_evals=st.n_evals,
              logits=st.logits)


_STATIC = ("cfg", "pad_id", "with_cls", "n_newline", "return_logits")
_decode = jax.jit(_decode_impl, static_argnames=_STATIC + ("layout",))


def _laid_out(layout: sharding.DecodeLayout | None, st: LoopState) -> LoopState:
  """``st`` held to ``layout``: the cache's K/V on ``layout.kv``, every other array with a
  row axis on ``layout.rows`` (the scalar step replicated). Unchanged without a layout."""
  if layout is None:
    return st
  kv = jax.lax.with_sharding_constraint(st.cache.kv, layout.kv)
  rest = jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(x, layout.rows if x.ndim else
                                                 layout.replicated),
      st.replace(cache=st.cache.replace(kv=None)))
  return rest.replace(cache=rest.cache.replace(kv=kv))


def _override_table(table, b: int, n: int) -> np.ndarray:
  """``cls_override`` as [b, n+1] float32, NaN past its columns; a clear error if malformed."""
  table = np.asarray(table, np.float32)
  if table.ndim != 2 or table.shape[0] != b or not 1 <= table.shape[1] <= n + 1:
    raise ValueError(f"cls_override must be [{b}, k] with 1 <= k <= {n + 1} (one column per "
                     f"evaluation step, 0 = the prompt pass), got shape {table.shape}.")
  if np.any((table < 0) | (table > 1)):
    raise ValueError("cls_override holds probabilities: values in [0, 1], or NaN for the "
                     "model's own.")
  return np.pad(table, ((0, 0), (0, n + 1 - table.shape[1])), constant_values=np.nan)


def _pad_rows(x: np.ndarray, pad: int) -> np.ndarray:
  """Append ``pad`` copies of row 0 (batch bucketing; the copies are dropped afterwards)."""
  return np.concatenate([x, np.repeat(x[:1], pad, axis=0)])
