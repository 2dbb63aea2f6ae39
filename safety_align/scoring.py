"""Teacher-forced scoring: the log-probability a model gives a continuation after a prompt, in
one batched forward pass, laid out as the model is deployed.

A row is ``[head] PAD... prompt continuation``: left-padded so every continuation ends at the
last column, the prompt with its own roles (BOS, TEMPLATE, QUERY: ``data.chat_templates``' pieces)
and the continuation as RESPONSE. With ``with_cls`` the head is the model's ``[CLS]`` and the
mask is the SFT-phase training mask of ``masks.prompt_mask`` (the decoder's prompt pass uses the
same one): ``[CLS]`` reads the QUERY and sits one past its last position, every RESPONSE token
reads ``[CLS]``, text reads text causally. So a ``[CLS]`` model is scored through the
query -> ``[CLS]`` -> answer path it generates with (gate off: no re-evaluation, no inserted
refusal). Without ``with_cls`` the head is padding and the row is the plain causal LM.

Only the last ``C`` rows go through the LM head (``C``: the longest continuation of the batch,
bucketed), so memory is ``[B, C, V]``, not ``[B, T, V]``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from safety_align import masks
from safety_align.decode.cache import bucket
from safety_align.masks import Role
from safety_align.model import ModelConfig, Transformer


@dataclasses.dataclass(frozen=True)
class Scores:
  """Per continuation: ``logprob`` [N] float64, the summed log-probability of its tokens;
  ``n_tokens`` [N] int, how many tokens it has; ``n_chars`` [N] int, its length in
  characters (lm-evaluation-harness' ``acc_norm`` divides by it)."""

  logprob: np.ndarray
  n_tokens: np.ndarray
  n_chars: np.ndarray


def layout(prompt_ids: Sequence[Sequence[int]], prompt_roles: Sequence[Sequence[int]],
           continuation_ids: Sequence[Sequence[int]], *, with_cls: bool, cls_id: int,
           pad_id: int, length: int, n_cont: int) -> tuple[np.ndarray, np.ndarray]:
  """The batch's rows (module doc): (tokens, roles) [B, 1 + length] int32, each row's prompt
  and continuation right-aligned; ``n_cont`` >= every continuation's length."""
  b = len(prompt_ids)
  tokens = np.full((b, 1 + length), pad_id, np.int32)
  roles = np.full((b, 1 + length), int(Role.PAD), np.int32)
  if with_cls:
    tokens[:, 0], roles[:, 0] = cls_id, int(Role.CLS)
  for i, (ids, rs, cont) in enumerate(zip(prompt_ids, prompt_roles, continuation_ids,
                                          strict=True)):
    if not cont:
      raise ValueError(f"Continuation {i} is empty: there is nothing to score.")
    if len(cont) > n_cont or len(ids) + len(cont) > length:
      raise ValueError(f"Row {i} ({len(ids)} + {len(cont)} tokens) does not fit the layout "
                       f"({length} tokens, {n_cont} for the continuation).")
    row = list(ids) + list(cont)
    tokens[i, 1 + length - len(row):] = row
    roles[i, 1 + length - len(row):] = list(rs) + [int(Role.RESPONSE)] * len(cont)
  return tokens, roles


@functools.partial(jax.jit, static_argnums=(0, 4))
def continuation_logprobs(cfg: ModelConfig, params, tokens, roles, n_cont: int):
  """[B, n_cont] float32: log p(token | everything it reads) of the last ``n_cont`` columns of
  ``tokens``/``roles`` [B, T] (``layout``), 0 where the column is not a RESPONSE token."""
  chex.assert_rank([tokens, roles], 2)
  chex.assert_equal_shape([tokens, roles])
  t = tokens.shape[1]
  text = masks.is_text(roles)
  positions = jnp.maximum(jnp.cumsum(text, axis=1) - 1, 0).astype(jnp.int32)
  mask, positions = masks.prompt_mask(roles, positions)
  logits, _, _ = Transformer(cfg).apply({"params": params}, tokens, positions, mask,
                                        lm_rows=slice(t - 1 - n_cont, t - 1))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  targets = tokens[:, t - n_cont:]
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.where(roles[:, t - n_cont:] == Role.RESPONSE, picked, 0.0)


def score_batch(cfg: ModelConfig, params, prompt_ids, prompt_roles, continuation_ids, *,
                with_cls: bool, pad_id: int, n_cont: int | None = None) -> np.ndarray:
  """[B] float64 summed continuation log-probabilities of one batch, padded to power-of-two
  batch, length and continuation buckets (so repeated calls reuse compiled programs);
  ``n_cont``: the continuation bucket (default: this batch's longest, bucketed)."""
  b = len(prompt_ids)
  n_cont = n_cont or bucket(max(len(c) for c in continuation_ids), minimum=1)
  length = bucket(max(len(p) + len(c) for p, c in zip(prompt_ids, continuation_ids)))
  length = max(length, n_cont + 1)
  rows = bucket(b, minimum=1)
  pad = rows - b  # padding rows copy row 0 and are dropped
  tokens, roles = layout(list(prompt_ids) + [prompt_ids[0]] * pad,
                         list(prompt_roles) + [prompt_roles[0]] * pad,
                         list(continuation_ids) + [continuation_ids[0]] * pad,
                         with_cls=with_cls, cls_id=cfg.cls_id, pad_id=pad_id, length=length,
                         n_cont=n_cont)
  logp = continuation_logprobs(cfg, params, tokens, roles, n_cont)
  return np.asarray(logp, np.float64)[:b].sum(axis=1)


def encode(tokenizer, template, prompts: Sequence[str], continuations: Sequence[str], *,
           system: str | None = None, chat: bool = True):
  """(prompt ids, prompt roles, continuation ids) per row: each prompt through ``template``
  as ``generate`` renders it (``chat``), or as bare QUERY text (``chat=False``: no template
  tokens, as lm-evaluation-harness feeds a context); each continuation as its own tokens."""
  if len(prompts) != len(continuations):
    raise ValueError(f"{len(prompts)} prompts for {len(continuations)} continuations: give "
                     "one prompt per continuation.")
  ids, roles = [], []
  for p in prompts:
    pieces = (template.prompt_pieces(tokenizer, p, system=system) if chat
              else [(tokenizer.encode(p), Role.QUERY)])
    ids.append([int(t) for piece, _ in pieces for t in piece])
    roles.append([int(r) for piece, r in pieces for _ in piece])
  return ids, roles, [tokenizer.encode(c) for c in continuations]


def score(cfg: ModelConfig, params, tokenizer, template, prompts: Sequence[str],
          continuations: Sequence[str], *, with_cls: bool, batch_size: int,
          max_length: int | None = None, system: str | None = None, chat: bool = True,
          truncate: bool = False) -> Scores:
  """``Scores`` of ``continuations`` after ``prompts`` (``encode``), ``batch_size`` rows per
  forward pass (rows sorted by length, so a pass holds rows of similar length; the result is
  in the order given). A row longer than ``max_length`` is an error, or with ``truncate`` its
  continuation is cut to fit (``n_tokens`` counts the tokens scored)."""
  p_ids, p_roles, c_ids = encode(tokenizer, template, prompts, continuations, system=system,
                                 chat=chat)
  if truncate and max_length is not None:
    c_ids = [c[:max(max_length - len(p), 0)] for p, c in zip(p_ids, c_ids)]
  for i, (p, c) in enumerate(zip(p_ids, c_ids)):
    if not p:
      raise ValueError(f"Prompt {i} is empty: give a prompt, or chat=True for the template.")
    if not c:
      raise ValueError(f"Continuation {i} ({continuations[i]!r}) has no tokens to score.")
    if max_length is not None and len(p) + len(c) > max_length:
      raise ValueError(f"Prompt {i} + continuation ({len(p)} + {len(c)} tokens) exceeds the "
                       f"model's maximum length of {max_length} tokens; shorten them.")
  order = np.argsort([len(p) + len(c) for p, c in zip(p_ids, c_ids)], kind="stable")
  n_cont = bucket(max(len(c) for c in c_ids), minimum=1)  # one per call: fewer programs
  logprob = np.zeros(len(order), np.float64)
  for s in range(0, len(order), batch_size):
    rows = order[s:s + batch_size]
    logprob[rows] = score_batch(cfg, params, [p_ids[i] for i in rows],
                                [p_roles[i] for i in rows], [c_ids[i] for i in rows],
                                with_cls=with_cls, pad_id=tokenizer.pad_id, n_cont=n_cont)
  return Scores(logprob=logprob, n_tokens=np.array([len(c) for c in c_ids]),
                n_chars=np.array([len(c) for c in continuations]))
