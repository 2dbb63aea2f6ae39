"""The gated decoding program over per-row arrays (METHOD.md 5): the prompt pass
(``start_rows``) and the step loop (``run_steps``), which ``decoder.Decoder`` runs over whole
batches and ``slots.SlotDecoder`` over slots that requests enter and leave.

Prompt pass: ``[CLS]`` + the left-padded prompts in one forward under the SFT-phase mask
(exactly the training mask), giving the first classification, the first response token and
the ``LoopState`` (the cache is ``cache.py``'s). A row may bring its prompt's input
embeddings (``DecodeInputs.embeds``, e.g. a soft prompt) in place of its tokens' own; the
``[CLS]`` slot keeps the ``[CLS]`` embedding.

Step ``t`` feeds response token ``t`` (forced prefill, inserted refusal, or sampled) and yields
the logits of token ``t + 1``. When some row re-evaluates at this step (``gate.py``), the same
forward carries a second query row, ``[CLS]`` restricted to that row's window; it writes the
``[CLS]`` slot of re-evaluating rows (so token ``t`` and all later tokens read the new signal)
and the scratch slot of the others. A row stops at EOS, its budget (forced tokens +
``max_new_tokens``) or, at ``high`` reliance, the end of the refusal prefix.

Everything a row decodes with is a per-row array (``RowSettings``: step, budget, forced tokens,
sampler settings, seed, gate settings and schedule, refusal), so rows at different steps with
different settings share one program. The static settings are a hashable ``DecodeSpec``.

``cls_override`` (tests only): a [B, N+1] table of P(malicious) by evaluation step that
replaces the [CLS] head's output inside the compiled loop (NaN: the model's own), so the gate's
wiring in this loop can be tested on scripted signals; it is traced, one program serves every
script.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp

from safety_align import sharding
from safety_align.decode import gate as gate_lib
from safety_align.decode import sampling
from safety_align.decode.cache import (CLS_SLOT, PROMPT_SLOT, SCRATCH_SLOT, DecodeState,
                                       prompt_pass_inputs, response_mask, window_mask)
from safety_align.masks import Role
from safety_align.model import KVCache, ModelConfig, Transformer


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """The static settings of a decode program (hashable: one program per spec and shapes).

  ``cfg``: the architecture; ``pad_id``: filler of unused token slots; ``eos_ids``: tokens
  that end a response (none: decode to the budget); ``with_cls``: [CLS] in the prompt pass
  and re-evaluations (the gate's schedule is not ``off``); ``n_newline``: tokens before the
  refusal prefix in each row's insertion; ``return_logits``: record the logits each response
  token was chosen from; ``layout``: hold the cache and the per-row state to it (sharded
  decoding), ``None`` on one device."""

  cfg: ModelConfig
  pad_id: int = 0
  eos_ids: tuple[int, ...] = ()
  with_cls: bool = True
  n_newline: int = 0
  return_logits: bool = False
  layout: sharding.DecodeLayout | None = None


@flax.struct.dataclass
class RowSettings:
  """What each row decodes with, all [B, ...] (rows with different settings share a program).

  ``length`` prompt tokens; ``forced`` [B, N] response tokens forced first (``n_forced`` of
  them: the prefill attack); ``budget``: response tokens allowed (forced ones included);
  ``row_id``, ``seed``: the sampling key stream (``sampling.row_keys``); ``insertion`` [B, Q]:
  newline tokens then the refusal prefix (``n_insert`` of them); ``sampler``: ``Greedy`` or
  ``sampling.PerRow``; ``gate``: per-row ``GateArrays`` (schedule table [B, N+1]);
  ``stop_at_eos``: whether EOS ends the row's response; ``cls_override``: tests only,
  [B, N+1] P(malicious) by evaluation step (NaN: the head's)."""

  length: jax.Array
  forced: jax.Array
  n_forced: jax.Array
  budget: jax.Array
  row_id: jax.Array
  seed: jax.Array
  insertion: jax.Array
  n_insert: jax.Array
  sampler: Any
  gate: gate_lib.GateArrays
  stop_at_eos: jax.Array
  cls_override: jax.Array | None = None


@flax.struct.dataclass
class DecodeInputs:
  """A decode's per-row inputs: the left-padded prompts ``tokens``, ``roles`` [B, P], each
  row's ``RowSettings`` and optionally ``embeds`` [B, P, D] float, the input embeddings of the
  prompt tokens (a soft prompt; ``None``: the tokens' own, as where ``roles`` is PAD)."""

  tokens: jax.Array
  roles: jax.Array
  rows: RowSettings
  embeds: jax.Array | None = None

  def shardings(self, layout: sharding.DecodeLayout) -> "DecodeInputs":
    """Where each field lives on ``layout``: every field is per row, so all go over the data
    axes (``layout.rows``)."""
    return jax.tree.map(lambda _: layout.rows, self)


@flax.struct.dataclass
class LoopState:
  """State of decoding, per row. ``step``: response index of ``token``, the token fed next."""

  step: jax.Array  # [B]
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
  rows: RowSettings


def prompt_pass(cfg: ModelConfig, params, tokens, roles, lengths, with_cls: bool,
                embeds=None):
  """``DecodeState`` of the prompt ([B, 2+P] slots, packed: the prompt at the front),
  next-token logits [B, V] and P(malicious) [B] after the prompt. ``embeds`` [B, P, D]: the
  input embeddings of the prompt's (non-PAD) tokens instead of their own."""
  b, p = tokens.shape
  toks, rls, positions, mask = prompt_pass_inputs(cfg.cls_id, tokens, roles, lengths, with_cls)
  t = p + 2
  model, variables = Transformer(cfg), {"params": params}
  args = (positions, mask, KVCache.zeros(cfg, b, t), jnp.broadcast_to(jnp.arange(t), (b, t)))
  if embeds is None:
    lm, cls, kv = model.apply(variables, toks, *args, lm_rows=slice(-1, None),
                              cls_keys=rls == Role.CLS)
  else:
    x = model.apply(variables, toks, method=Transformer.embed_tokens)
    real = (rls != Role.PAD)[:, PROMPT_SLOT:, None]
    x = x.at[:, PROMPT_SLOT:].set(jnp.where(real, embeds.astype(x.dtype), x[:, PROMPT_SLOT:]))
    lm, cls, kv = model.apply(variables, x, *args, lm_rows=slice(-1, None),
                              cls_queries=toks == cfg.cls_id, cls_keys=rls == Role.CLS,
                              method=Transformer.forward_embedded)
  cache = DecodeState(kv=kv, roles=rls, positions=positions).packed(lengths)
  return cache, lm[:, 0], jax.nn.softmax(cls[:, CLS_SLOT])[:, 1]


def _token_step(cfg: ModelConfig, params, cache: DecodeState, token, q_pos, slot):
  """One RESPONSE token per row, written at ``slot`` [B]: logits [B, V], new K/V."""
  lm, _, kv = Transformer(cfg).apply(
      {"params": params}, token[:, None], q_pos[:, None], response_mask(cache, q_pos)[:, None],
      cache.kv, slot[:, None], cls_keys=cache.roles == Role.CLS)
  return lm[:, 0], kv


def _token_cls_step(cfg: ModelConfig, params, cache: DecodeState, token, q_pos, slot, due,
                    sees_query, lo, hi):
  """The token row (written at ``slot`` [B]) and a window [CLS] row in one forward: (logits
  [B, V], P(malicious) [B], K/V, [CLS] positions [B]). Rows not ``due`` write their [CLS] row
  to the scratch slot. Row 0 is the token, row 1 the [CLS]: only row 0 goes through the LM
  head (``lm_rows``)."""
  b = token.shape[0]
  self_slot = jnp.where(due, CLS_SLOT, SCRATCH_SLOT)
  cls_mask, cls_pos = window_mask(cache, sees_query, lo, hi, self_slot)
  lm, cls, kv = Transformer(cfg).apply(
      {"params": params},
      jnp.stack([token, jnp.full((b,), cfg.cls_id, jnp.int32)], axis=1),
      jnp.stack([q_pos, cls_pos], axis=1),
      jnp.stack([response_mask(cache, q_pos), cls_mask], axis=1),
      cache.kv, jnp.stack([slot, self_slot], axis=1), lm_rows=slice(0, 1),
      cls_keys=cache.roles == Role.CLS)
  return lm[:, 0], jax.nn.softmax(cls[:, 1])[:, 1], kv, cls_pos


def _scripted(rows: RowSettings, prob, n):
  """The gate's P(malicious) at evaluation step n (scalar or [B]): ``cls_override``'s where
  it has one."""
  if rows.cls_override is None:
    return prob
  n = jnp.broadcast_to(n, prob.shape)
  script = jnp.take_along_axis(rows.cls_override, n[:, None], axis=1)[:, 0]
  return jnp.where(jnp.isnan(script), prob, script)


def _choose(spec: DecodeSpec, rows: RowSettings, gstate, lm, n, active):
  """Token at response index n (scalar or [B]) from the logits ``lm`` [B, V]: (token, eos
  [B], finished [B], gate state)."""
  sampled = rows.sampler(lm, sampling.row_keys(rows.seed, rows.row_id, n))
  n = jnp.broadcast_to(n, active.shape)
  forced = jnp.take_along_axis(rows.forced, jnp.minimum(n, rows.forced.shape[1] - 1)[:, None],
                               axis=1)[:, 0]
  token, was_sampled, finished, gstate = gate_lib.emit(
      rows.gate, gstate, j=n, sampled=sampled, forced=forced, is_forced=n < rows.n_forced,
      active=active, insertion=rows.insertion, n_newline=spec.n_newline, n_insert=rows.n_insert)
  eos = (was_sampled & rows.stop_at_eos
         & jnp.isin(token, jnp.array(spec.eos_ids or (-1,), jnp.int32)))
  return token, eos, finished, gstate


def start_rows(spec: DecodeSpec, params, inputs: DecodeInputs,
               s_len: int | None = None) -> LoopState:
  """The prompt pass of ``inputs``' rows and their first response token: the ``LoopState``
  at step 0, its cache [B, 2+P] slots (padded to ``s_len`` when given). ``params`` unrolled
  (``unroll_layers``)."""
  rows = inputs.rows
  chex.assert_rank([inputs.tokens, inputs.roles, rows.length, rows.forced, rows.n_forced,
                    rows.budget, rows.row_id, rows.seed], [2, 2, 1, 2, 1, 1, 1, 1])
  chex.assert_type([inputs.tokens, inputs.roles, rows.length, rows.forced, rows.n_forced,
                    rows.budget, rows.row_id], jnp.int32)
  chex.assert_equal_shape([inputs.tokens, inputs.roles])
  chex.assert_equal_shape_prefix([inputs.tokens, rows.length, rows.forced, rows.budget], 1)
  b = inputs.tokens.shape[0]
  n_max = rows.forced.shape[1]
  if rows.cls_override is not None:
    chex.assert_shape(rows.cls_override, (b, n_max + 1))
  if inputs.embeds is not None:
    chex.assert_shape(inputs.embeds, inputs.tokens.shape + (spec.cfg.d_model,))
  cache, lm, p0 = prompt_pass(spec.cfg, params, inputs.tokens, inputs.roles, rows.length,
                              spec.with_cls, inputs.embeds)
  if s_len is not None:
    cache = cache.padded(s_len)
  p0 = _scripted(rows, p0, 0)
  gstate = gate_lib.init(rows.gate, p0)
  token, eos, finished, gstate = _choose(spec, rows, gstate, lm, 0, jnp.ones((b,), bool))
  return _laid_out(spec.layout, LoopState(
      step=jnp.zeros((b,), jnp.int32), cache=cache, token=token,
      done=eos | finished | (rows.budget <= 1),
      tokens=jnp.full((b, n_max), spec.pad_id, jnp.int32).at[:, 0].set(
          jnp.where(eos, spec.pad_id, token)),
      length=jnp.where(eos, 0, 1).astype(jnp.int32), gate=gstate,
      probs=jnp.zeros((b, n_max + 1), jnp.float32).at[:, 0].set(p0),
      eval_steps=jnp.zeros((b, n_max + 1), jnp.int32),
      n_evals=jnp.full((b,), int(spec.with_cls), jnp.int32),
      logits=jnp.zeros((b, n_max, lm.shape[-1]), jnp.float32).at[:, 0].set(lm)
      if spec.return_logits else None, rows=rows))


def run_steps(spec: DecodeSpec, params, state: LoopState, n_steps) -> LoopState:
  """Advance every row that is not done by up to ``n_steps`` (traced) steps, or until all
  are done. ``params`` unrolled (``unroll_layers``). Every running row's keys must fit the
  cache (``PROMPT_SLOT + rows.length + step + n_steps`` key slots: decode slots keep their
  cache that long); writes past it, by rows that are done, are dropped.

  Steps run in two nested loops rather than one loop with a ``lax.cond`` between the two
  forwards (a conditional would copy the whole KV cache in and out of its branches on every
  step): plain one-row steps while no row is due, and a two-row step (token + [CLS]) where
  some row re-evaluates. So a step without re-evaluation runs exactly the plain decoder's
  step."""
  cfg, rows = spec.cfg, state.rows
  b, n_max = state.tokens.shape
  idx = jnp.arange(b)

  def step_inputs(st: LoopState):
    """Response index n of the token to choose, active rows, slot and position of the token
    fed, and the cache with that slot's role and position set."""
    active = ~st.done
    q_pos = rows.length + st.step
    slot = PROMPT_SLOT + q_pos
    cache = st.cache.set_keys(slot, jnp.where(active, Role.RESPONSE, Role.PAD), q_pos)
    return st.step + 1, active, slot, q_pos, cache

  def record(st: LoopState, n, active, cache, lm, gstate, **evals) -> LoopState:
    """Choose token n from the logits ``lm`` and record it (``evals``: updated traces)."""
    token, eos, finished, gstate = _choose(spec, rows, gstate, lm, n, active)
    write = active & ~eos
    col = jnp.minimum(n, n_max - 1)
    return _laid_out(spec.layout, st.replace(
        step=jnp.where(active, n, st.step), cache=cache, token=token,
        done=st.done | (active & (eos | finished | (n + 1 >= rows.budget))),
        tokens=st.tokens.at[idx, col].set(jnp.where(write, token, st.tokens[idx, col])),
        length=jnp.where(write, n + 1, st.length), gate=gstate,
        logits=st.logits.at[idx, col].set(jnp.where(active[:, None], lm, st.logits[idx, col]))
        if spec.return_logits else None, **evals))

  def token_step(carry):
    st, k = carry
    n, active, slot, q_pos, cache = step_inputs(st)
    lm, kv = _token_step(cfg, params, cache, st.token, q_pos, slot)
    return record(st, n, active, cache.replace(kv=kv), lm, st.gate), k + 1

  def token_cls_step(carry):
    """A step with the [CLS] row: rows due re-evaluate, the others write the scratch slot."""
    st, k = carry
    n, active, slot, q_pos, cache = step_inputs(st)
    due = gate_lib.due(rows.gate, st.gate, n, active)
    sees_query, lo, hi = gate_lib.window(rows.gate, st.gate, n)
    lm, prob, kv, cls_pos = _token_cls_step(cfg, params, cache, st.token, q_pos, slot, due,
                                            sees_query, lo + rows.length, hi + rows.length)
    prob = _scripted(rows, prob, n)
    cache = cache.replace(kv=kv, positions=cache.positions.at[:, CLS_SLOT].set(
        jnp.where(due, cls_pos, cache.positions[:, CLS_SLOT])))
    e = jnp.minimum(st.n_evals, n_max)
    return record(
        st, n, active, cache, lm, gate_lib.update(rows.gate, st.gate, due, prob, n),
        probs=st.probs.at[idx, e].set(jnp.where(due, prob, st.probs[idx, e])),
        eval_steps=st.eval_steps.at[idx, e].set(jnp.where(due, n, st.eval_steps[idx, e])),
        n_evals=st.n_evals + due), k + 1

  def running(carry):
    st, k = carry
    return (k < n_steps) & ~jnp.all(st.done)

  carry = (state, jnp.int32(0))
  if not spec.with_cls:
    return jax.lax.while_loop(running, token_step, carry)[0]

  def token_steps_until_due(carry):
    def none_due(c):
      st = c[0]
      return running(c) & ~jnp.any(gate_lib.due(rows.gate, st.gate, st.step + 1, ~st.done))
    return jax.lax.while_loop(none_due, token_step, carry)

  carry = token_steps_until_due(carry)  # then a row is due, or the chunk is over
  return jax.lax.while_loop(running, lambda c: token_steps_until_due(token_cls_step(c)),
                            carry)[0]


def _laid_out(layout: sharding.DecodeLayout | None, st: LoopState) -> LoopState:
  """``st`` held to ``layout``: the cache's K/V on ``layout.kv``, every other array (all have
  a row axis) on ``layout.rows``. Unchanged without a layout."""
  if layout is None:
    return st
  kv = jax.lax.with_sharding_constraint(st.cache.kv, layout.kv)
  rest = jax.lax.with_sharding_constraint(st.replace(cache=st.cache.replace(kv=None)),
                                          layout.rows)
  return rest.replace(cache=rest.cache.replace(kv=kv))
