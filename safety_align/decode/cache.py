"""The decoder's state (``DecodeState``): K/V of every layer plus the key-side metadata every
mask is built from.

Slot layout of a row (``S = 2 + P + N`` slots):

* slot 0: the ``[CLS]`` slot (the prompt-pass classification; each re-evaluation overwrites it,
  so later RESPONSE tokens read the newest signal);
* slot 1: scratch, where the ``[CLS]`` query row of a row that does not re-evaluate writes (a
  PAD key: nobody reads it);
* slots ``2 .. 2+L-1``: the prompt's ``L`` tokens (the prompt pass runs them left-padded to a
  bucketed length ``P``, then ``DecodeState.packed`` moves them to the front);
* slots ``2+L+j``: response token ``j`` (forced, inserted or sampled alike), over the
  prompt's padding first. A row's layout depends only on its own prompt, so rows of any
  bucket share one cache (the decode slots of ``slots.py``).

Text tokens keep the positions they would have without ``[CLS]`` (0 at the first real prompt
token); a ``[CLS]`` row takes the position one past the last position it reads.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from safety_align import masks
from safety_align.masks import Role
from safety_align.model import KVCache

CLS_SLOT, SCRATCH_SLOT, PROMPT_SLOT = 0, 1, 2
PROMPT_ROLES = (Role.BOS, Role.TEMPLATE, Role.QUERY)


def bucket(n: int, minimum: int = 8) -> int:
  """The power of two >= max(n, minimum): prompt and response lengths compile per bucket."""
  return max(minimum, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class Prompts:
  """A batch of encoded prompts: per row token ids and roles (BOS, TEMPLATE, QUERY)."""

  ids: tuple[tuple[int, ...], ...]
  roles: tuple[tuple[int, ...], ...]

  def __post_init__(self):
    if not self.ids:
      raise ValueError("No prompts given.")
    for i, (ids, roles) in enumerate(zip(self.ids, self.roles, strict=True)):
      if not ids:
        raise ValueError(f"Prompt {i} is empty.")
      if len(ids) != len(roles):
        raise ValueError(f"Prompt {i}: {len(ids)} tokens but {len(roles)} roles.")
      bad = sorted({Role(r).name for r in roles} - {r.name for r in PROMPT_ROLES})
      if bad:
        raise ValueError(f"Prompt {i} has tokens of role(s) {bad}; a prompt holds only "
                         f"{[r.name for r in PROMPT_ROLES]}.")

  @classmethod
  def from_pieces(cls, prompts: Sequence[Sequence[tuple[Sequence[int], Role]]]) -> "Prompts":
    """From per-prompt lists of (token ids, role) pieces, as the chat templates give them."""
    return cls(ids=tuple(tuple(int(t) for ids, _ in p for t in ids) for p in prompts),
               roles=tuple(tuple(int(r) for ids, r in p for _ in ids) for p in prompts))

  @classmethod
  def from_arrays(cls, ids: Sequence[Sequence[int]],
                  roles: Sequence[Sequence[int]]) -> "Prompts":
    return cls(ids=tuple(tuple(int(t) for t in row) for row in ids),
               roles=tuple(tuple(int(r) for r in row) for row in roles))

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def lengths(self) -> np.ndarray:
    return np.array([len(r) for r in self.ids], np.int32)

  def left_padded(self, length: int, pad_id: int = 0):
    """(tokens [B, length], roles [B, length]) int32, each prompt at the right end."""
    tokens = np.full((len(self), length), pad_id, np.int32)
    roles = np.full((len(self), length), int(Role.PAD), np.int32)
    for i, (ids, rs) in enumerate(zip(self.ids, self.roles)):
      tokens[i, length - len(ids):] = ids
      roles[i, length - len(ids):] = rs
    return tokens, roles


@flax.struct.dataclass
class DecodeState:
  """``kv`` (the model's ``KVCache``: per-layer [B, Hkv, S, Dh] buffers as the decoder runs) and
  the key metadata ``roles``, ``positions`` [B, S]."""

  kv: KVCache
  roles: jax.Array
  positions: jax.Array

  def set_keys(self, slot, roles, positions) -> "DecodeState":
    """Metadata of the keys written at ``slot`` (scalar or [B]): roles, positions [B]."""
    rows = jnp.arange(self.roles.shape[0])
    return self.replace(roles=self.roles.at[rows, slot].set(roles),
                        positions=self.positions.at[rows, slot].set(positions))


  def packed(self, lengths) -> "DecodeState":
    """The left-padded prompt (slots ``2 .. S-1``, ``lengths`` [B] real tokens at the right
    end) moved to the front, its padding after it: slots ``2+L ..`` are PAD keys."""
    b, s = self.roles.shape
    p = s - PROMPT_SLOT
    slots = jnp.arange(s)[None]
    src = jnp.where(slots < PROMPT_SLOT, slots,
                    PROMPT_SLOT + (slots - PROMPT_SLOT + p - lengths[:, None]) % p)  # [B, S]
    kv = jax.tree.map(lambda c: jnp.take_along_axis(
        c, src.reshape((1,) * (c.ndim - 4) + (b, 1, s, 1)), axis=-2), self.kv)
    return DecodeState(kv=kv, roles=jnp.take_along_axis(self.roles, src, axis=1),
                       positions=jnp.take_along_axis(self.positions, src, axis=1))

  def prefix(self, n: int) -> "DecodeState":
    """The state of the first ``n`` key slots (a copy: [B, Hkv, n, Dh] K/V, [B, n] roles and
    positions)."""
    return DecodeState(kv=jax.tree.map(lambda c: c[..., :n, :], self.kv),
                       roles=self.roles[:, :n], positions=self.positions[:, :n])

  def fitted(self, s_len: int) -> "DecodeState":
    """The state cut (``prefix``) or padded (``padded``) to ``s_len`` key slots."""
    return self.prefix(s_len) if s_len < self.roles.shape[1] else self.padded(s_len)

  def padded(self, s_len: int) -> "DecodeState":
    """The state with PAD key slots appended up to ``s_len``."""
    extra = s_len - self.roles.shape[1]
    pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis % x.ndim else 0)  # noqa: E731
                                      for a in range(x.ndim)])
    return DecodeState(kv=jax.tree.map(lambda c: pad(c, -2), self.kv),
                       roles=pad(self.roles, 1), positions=pad(self.positions, 1))


def check_context(lengths, budgets, limit: int | None) -> None:
  """The one context-length check: raise unless each prompt (``lengths`` [B] tokens) with its
  response budget (``budgets``, [B] or shared) fits ``limit`` tokens (``None``: no limit)."""
  if limit is None:
    return
  lengths = np.asarray(lengths)
  budgets = np.broadcast_to(np.asarray(budgets), lengths.shape)
  over = np.nonzero(lengths + budgets > limit)[0]
  if len(over):
    i = over[0]
    response = f" + {budgets[i]} response tokens" if budgets[i] else ""
    raise ValueError(
        f"Prompt {i} ({lengths[i]} tokens){response} exceeds the model's maximum length of "
        f"{limit} tokens; shorten the prompt" + (" or lower max_new_tokens." if budgets[i]
                                                  else "."))


def prompt_pass_inputs(cls_id: int, tokens, roles, lengths, with_cls: bool):
  """The prompt-pass rows ``[CLS] scratch prompt``: tokens, roles, positions [B, 2+P] and the
  SFT-phase mask [B, 2+P, 2+P] (``masks.prompt_mask``, as in training) with ``[CLS]``
  placed one past the last token it reads. Without ``with_cls`` slot 0 is padding."""
  b, p = tokens.shape
  head_tokens = jnp.tile(jnp.array([cls_id if with_cls else 0, 0], jnp.int32), (b, 1))
  head_roles = jnp.tile(jnp.array([Role.CLS if with_cls else Role.PAD, Role.PAD], jnp.int32),
                        (b, 1))
  tokens = jnp.concatenate([head_tokens, tokens], axis=1)
  roles = jnp.concatenate([head_roles, roles], axis=1)
  first = p - lengths[:, None]  # column of the first real prompt token
  positions = jnp.concatenate(
      [jnp.zeros((b, 2), jnp.int32), jnp.maximum(jnp.arange(p)[None] - first, 0)], axis=1)
  mask, positions = masks.prompt_mask(roles, positions)
  return tokens, roles, positions, mask


def response_mask(cache: DecodeState, q_positions):
  """[B, S] keys a RESPONSE token at ``q_positions`` [B] reads (``masks.decode_token_row``)."""
  return masks.decode_token_row(cache.roles, cache.positions, q_positions)


def window_mask(cache: DecodeState, sees_query, lo, hi, self_slot):
  """The row of a re-evaluating ``[CLS]`` writing ``self_slot`` [B]: (mask [B, S], position
  [B]) (``masks.window_row``; ``lo``, ``hi`` [B] inclusive RESPONSE positions)."""
  return masks.window_row(cache.roles, cache.positions, sees_query, lo, hi, self_slot)
