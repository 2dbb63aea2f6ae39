"""Whole-batch gated decoding: ``Decoder`` checks and buckets a batch of prompts into the
``DecodeSpec`` and ``DecodeInputs`` of ``loop.py``'s program, runs the prompt pass and the step
loop until every row is done in one compiled call, and returns host-side ``DecodeOutput``.
Programs compile per spec and per (batch, prompt, response) power-of-two bucket, gate on/off,
refusal length and sampler kind (greedy or not).

Sharded (``Decoder(mesh=...)``): the program is jitted with in/out shardings of a
``sharding.DecodeLayout``: parameters by the training rules (heads, MLP and vocabulary over
``tensor``), rows over the data axes when the batch bucket divides them, the KV cache with KV
heads over ``tensor``; the loop state is held to that layout on every step, and no weight
matrix is ever gathered whole onto one device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from safety_align import sharding
from safety_align.decode import gate as gate_lib
from safety_align.decode import sampling
from safety_align.decode.cache import (CLS_SLOT, PROMPT_SLOT, Prompts, bucket, check_context,
                                       prompt_pass_inputs)
from safety_align.decode.loop import DecodeInputs, DecodeSpec, RowSettings, run_steps, start_rows
from safety_align.model import ModelConfig, Transformer, unroll_layers


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
    self._sharded = {}  # (parameter tree, inputs tree, spec) -> (jitted, shardings)

  def classify(self, params, prompts: Prompts) -> np.ndarray:
    """[B] P(malicious) of each query: the prompt-pass classification."""
    tokens, roles, lengths, _ = self._pad_prompts(prompts)
    return np.asarray(_classify(self.cfg, params, tokens, roles, lengths))[:len(prompts)]

  def prepare(self, prompts: Prompts, *, max_new_tokens: int | Sequence[int],
              gate: gate_lib.GateConfig, sampler=sampling.Greedy(), seed: int = 0,
              prefill: Sequence[Sequence[int]] | None = None, refusal_ids: Sequence[int] = (),
              newline_ids: Sequence[int] = (), row_ids: Sequence[int] | None = None,
              return_logits: bool = False, prompt_embeds: Sequence[np.ndarray] | None = None,
              cls_override=None) -> tuple[DecodeSpec, DecodeInputs]:
    """The ``DecodeSpec`` and the batch-bucketed ``DecodeInputs`` of a decode (checked).

    Args:
      prompts: the encoded prompts (``__call__`` also takes ``params``, the unboxed model
        parameters).
      max_new_tokens: tokens each row may add after its forced ``prefill`` (shared or per
        row).
      gate: the gate (``schedule="off"``: no [CLS] at all).
      sampler: ``sampling.Greedy()``, ``sampling.Sampling`` (see ``make_sampler``) or
        ``sampling.PerRow`` (each row's own settings, [B]).
      seed: sampling seed; row i draws from (seed, row_ids[i], step).
      prefill: per row, response tokens forced at the start (the prefill attack).
      refusal_ids, newline_ids: token ids of the refusal prefix and of the newline put before
        it mid-response.
      row_ids: per-row indices for the sampling keys (default 0..B-1).
      return_logits: also return the logits each response token was chosen from.
      prompt_embeds: per row, [L, D] input embeddings of its L prompt tokens, read instead of
        the tokens' own (a soft prompt; the token ids then only fix the length).
      cls_override: tests only: [B, k] P(malicious) the gate uses at evaluation step n (column
        n; 0 is the prompt pass) instead of the [CLS] head's; NaN, or a step past column k-1: the
        head's own. ``cls_probs`` then records the values the gate used.
    """
    b = len(prompts)
    new = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (b,))
    if new.min() < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {new.min()}.")
    prefill = [[]] * b if prefill is None else [list(p) for p in prefill]
    if len(prefill) != b:
      raise ValueError(f"{len(prefill)} prefills for {b} prompts.")
    if gate.enabled and gate.reliance != "low" and not refusal_ids:
      raise ValueError(f"reliance={gate.reliance!r} inserts a refusal: give refusal_ids.")
    n_forced = np.array([len(p) for p in prefill], np.int32)
    budget = n_forced + new
    check_context(prompts.lengths, budget, self.max_length)
    n = bucket(int(budget.max()))
    forced = np.full((b, n), self.pad_id, np.int32)
    for i, p in enumerate(prefill):
      forced[i, :len(p)] = p
    insertion = np.array(list(newline_ids) + list(refusal_ids) or [self.pad_id], np.int32)
    tokens, roles = prompts.left_padded(bucket(int(prompts.lengths.max())), self.pad_id)
    rows = RowSettings(
        length=prompts.lengths, forced=forced, n_forced=n_forced, budget=budget,
        row_id=np.arange(b, dtype=np.int32) if row_ids is None else np.asarray(row_ids, np.int32),
        seed=np.full(b, seed, np.int32), insertion=np.tile(insertion, (b, 1)),
        n_insert=np.full(b, len(insertion), np.int32),
        sampler=sampling.PerRow.broadcast(sampler, b), gate=gate.arrays(n).rows(b),
        stop_at_eos=np.ones(b, bool),
        cls_override=None if cls_override is None else _override_table(cls_override, b, n))
    pad = bucket(b, minimum=1) - b
    inputs = jax.tree.map(lambda x: _pad_rows(np.asarray(x), pad), DecodeInputs(
        tokens=tokens, roles=roles, rows=rows,
        embeds=None if prompt_embeds is None else self._embeds(prompts, prompt_embeds)))
    spec = DecodeSpec(cfg=self.cfg, pad_id=self.pad_id,
                      eos_ids=tuple(int(i) for i in self.eos_ids),
                      with_cls=gate.enabled, n_newline=len(newline_ids),
                      return_logits=return_logits)
    return spec, inputs

  def __call__(self, params, prompts: Prompts, **kwargs) -> DecodeOutput:
    """Decode a batch: ``prepare``'s arguments."""
    b = len(prompts)
    spec, inputs = self.prepare(prompts, **kwargs)
    if self.mesh is None:
      out = _decode(spec, params, inputs)
    else:
      layout = sharding.DecodeLayout.of(self.cfg, self.mesh, inputs.tokens.shape[0])
      run, shardings = self._sharded_decode(layout, params, spec, inputs)
      out = run(jax.device_put(params, shardings), inputs)
    out = jax.tree.map(lambda x: np.asarray(x)[:b], jax.device_get(out))
    return DecodeOutput(refused=out["refusal_step"] >= 0, **out)

  def _sharded_decode(self, layout: sharding.DecodeLayout, params, spec: DecodeSpec,
                      inputs: DecodeInputs):
    """(``_decode`` of ``spec`` laid out by ``layout``, jitted with the shardings of
    ``params``' tree and of ``inputs``' fields (``DecodeInputs.shardings``), the parameters'
    shardings)."""
    spec = dataclasses.replace(spec, layout=layout)
    key = (jax.tree.structure(params), jax.tree.structure(inputs), spec)
    if key not in self._sharded:
      shardings = sharding.param_shardings(self.cfg, layout.mesh, params, layout.rules)
      self._sharded[key] = jax.jit(
          functools.partial(_decode_impl, spec),
          in_shardings=(shardings, inputs.shardings(layout)), out_shardings=layout.rows
      ), shardings
    return self._sharded[key]

  def _embeds(self, prompts: Prompts, prompt_embeds: Sequence[np.ndarray]) -> np.ndarray:
    """[B, P, D] float32: each row's ``prompt_embeds`` left-padded as its tokens (checked)."""
    d, p = self.cfg.d_model, bucket(int(prompts.lengths.max()))
    if len(prompt_embeds) != len(prompts):
      raise ValueError(f"{len(prompt_embeds)} prompt embeddings for {len(prompts)} prompts: "
                       "give one [L, D] array per prompt.")
    out = np.zeros((len(prompts), p, d), np.float32)
    for i, (x, n) in enumerate(zip(prompt_embeds, prompts.lengths)):
      x = np.asarray(x, np.float32)
      if x.shape != (n, d):
        raise ValueError(f"prompt_embeds[{i}] has shape {x.shape}; prompt {i} needs ({n}, {d}): "
                         "one embedding per prompt token.")
      out[i, p - n:] = x
    return out

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


def _decode_impl(spec: DecodeSpec, params, inputs: DecodeInputs):
  """The whole decode (prompt pass + steps until every row is done) of a bucketed batch; see
  ``Decoder.__call__``. Shapes: ``inputs.tokens``, ``roles`` [B, P], ``rows.forced`` [B, N].

  The layers run unrolled (``unroll_layers``): a scanned model's weights are sliced out of the
  stack once here, before the loops, not at every step. That slice is a transient copy of the
  weights; ``SafetyModel`` passes weights unrolled at load, so it makes none."""
  cfg, params = unroll_layers(spec.cfg, params)
  spec = dataclasses.replace(spec, cfg=cfg)
  n_max = inputs.rows.forced.shape[1]
  st = start_rows(spec, params, inputs, PROMPT_SLOT + inputs.tokens.shape[1] + n_max)
  st = run_steps(spec, params, st, n_max)
  return dict(tokens=st.tokens, lengths=st.length, refusal_step=st.gate.refusal_step,
              cls_probs=st.probs, cls_steps=st.eval_steps, n_evals=st.n_evals,
              logits=st.logits)


_decode = jax.jit(_decode_impl, static_argnums=0)


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
