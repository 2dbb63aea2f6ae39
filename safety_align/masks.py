"""Token roles and every attention-mask rule (METHOD.md sections 3 and 5), in one place.

A sequence (or a packed row of several segments) is described per token by:

* ``roles``       [B, T] int: a :class:`Role` value;
* ``segment_ids`` [B, T] int: which packed example the token belongs to (0 = padding);
* ``positions``   [B, T] int: RoPE position of each *text* token inside its segment, exactly
  as it would be without ``[CLS]`` (the value at CLS tokens is ignored and recomputed);
* ``cls_window``  [B, T, 2] int: for CLS tokens only, an inclusive ``[lo, hi]`` range of
  RESPONSE positions that this ``[CLS]`` row reads. An *empty* window (``lo > hi``) marks the
  segment's main ``[CLS]``, which reads what its phase prescribes; a non-empty window marks a
  window ``[CLS]`` row (the SFT window augmentation, and the decoder's gate windows), which
  reads only RESPONSE tokens in the window and is read by nobody.

Rules (``True`` = query row may attend to key column):

* text -> text: same segment, causal by position (unchanged by ``[CLS]``);
* main CLS, ``pretrain``: every non-pad text token of its segment;
* main CLS, ``sft``: the QUERY tokens of its segment;
* window CLS: RESPONSE tokens of its segment whose position is in ``[lo, hi]``;
* every CLS row attends to itself; PAD rows attend only to themselves (keeps softmax finite);
* text -> CLS: only in ``sft``, RESPONSE tokens read their segment's main CLS.

The ``[CLS]`` RoPE position is one past the last position it attends to (the positions rule), so
its relative geometry is the same in training and at inference.

Each rule is one function over query-side arrays ``[...]`` and key-side arrays ``[..., S]``
(broadcastable), returning ``[..., S]`` bool: the dense training mask, the structured attention
of ``attention.py`` (key blocks, [CLS] rows) and the decoder's rows (in absolute cache
coordinates: one segment, PAD keys excluded) are all built from them.
"""

from __future__ import annotations

import enum

import chex
import flax.struct
import jax
import jax.numpy as jnp

PHASES = ("pretrain", "sft")
EMPTY_WINDOW = (1, 0)  # lo > hi: the segment's main [CLS]


class Role(enum.IntEnum):
  PAD = 0
  CLS = 1
  BOS = 2
  TEMPLATE = 3
  QUERY = 4
  RESPONSE = 5


def check_phase(phase: str) -> None:
  if phase not in PHASES:
    raise ValueError(f"Unknown phase {phase!r}: expected one of {PHASES}.")


def is_text(roles):
  return (roles != Role.CLS) & (roles != Role.PAD)


def _q(x):
  """A query-side array against key-side ``[..., S]`` ones."""
  return jnp.asarray(x)[..., None]


def _same_segment(q_segments, key_segments):
  return (_q(q_segments) == key_segments) & (_q(q_segments) > 0)


def text_visible(q_roles, q_segments, q_positions, key_roles, key_segments, key_positions):
  """text -> text: a text row reads the text keys of its segment at positions <= its own."""
  return (_q(is_text(q_roles)) & is_text(key_roles) & _same_segment(q_segments, key_segments)
          & (key_positions <= _q(q_positions)))


def window_visible(key_roles, key_positions, *, sees_query, lo, hi):
  """Which keys a *window* [CLS] row reads (the gate's strategic-attention rules).

  Args:
    key_roles: [..., S] roles of the keys.
    key_positions: [..., S] positions of the keys.
    sees_query: [...] bool, whether the QUERY tokens are in the window (rule 1).
    lo, hi: [...] inclusive RESPONSE-position range (rules 1-3); empty when lo > hi.

  Returns:
    [..., S] bool. PAD, BOS, TEMPLATE and CLS keys are never visible (rule 4).
  """
  query = _q(sees_query) & (key_roles == Role.QUERY)
  response = ((key_roles == Role.RESPONSE) & (key_positions >= _q(lo))
              & (key_positions <= _q(hi)))
  return query | response


def cls_visible(q_segments, lo, hi, key_roles, key_segments, key_positions, phase: str):
  """The text keys a training [CLS] row reads (besides itself): a main row (``lo > hi``)
  its phase's keys (every text token / the QUERY), a window row ``window_visible``'s."""
  main = key_roles == Role.QUERY if phase == "sft" else is_text(key_roles)
  window = window_visible(key_roles, key_positions, sees_query=False, lo=lo, hi=hi)
  return _same_segment(q_segments, key_segments) & jnp.where(_q(lo > hi), main, window)


def reads_cls(q_roles, q_segments, key_roles, key_segments, key_main, phase: str):
  """text -> [CLS]: in ``sft`` a RESPONSE row reads its segment's main [CLS] (``key_main``:
  [..., S] bool, the key is a main [CLS]); in ``pretrain`` nobody does."""
  if phase != "sft":
    return jnp.zeros(jnp.broadcast_shapes(jnp.shape(_q(q_roles)), jnp.shape(key_roles)), bool)
  return (_q(q_roles == Role.RESPONSE) & (key_roles == Role.CLS) & key_main
          & _same_segment(q_segments, key_segments))


def _check_layout(roles, segment_ids, positions, cls_window):
  chex.assert_rank([roles, segment_ids, positions, cls_window], [2, 2, 2, 3])
  chex.assert_type([roles, segment_ids, positions, cls_window], int)
  chex.assert_equal_shape([roles, segment_ids, positions])
  chex.assert_equal_shape_prefix([roles, cls_window], 2)


def attention_mask(roles, segment_ids, positions, cls_window, phase: str):
  """The [B, T, T] boolean attention mask of ``phase`` (see the module docstring)."""
  check_phase(phase)
  _check_layout(roles, segment_ids, positions, cls_window)
  keys = lambda x: x[:, None, :]
  lo, hi = cls_window[..., 0], cls_window[..., 1]
  q_cls = roles == Role.CLS
  text = text_visible(roles, segment_ids, positions, keys(roles), keys(segment_ids),
                      keys(positions))
  cls = _q(q_cls) & cls_visible(segment_ids, lo, hi, keys(roles), keys(segment_ids),
                                keys(positions), phase)
  to_cls = reads_cls(roles, segment_ids, keys(roles), keys(segment_ids), keys(lo > hi), phase)
  diagonal = jnp.eye(roles.shape[1], dtype=bool)[None]
  self_only = _q(q_cls | (roles == Role.PAD)) & diagonal
  return text | cls | to_cls | self_only


def cls_positions(mask, roles, positions):
  """Positions with each [CLS] placed one past the last position it attends to.

  Args:
    mask: [B, T, T] attention mask.
    roles, positions: [B, T].
  Returns:
    [B, T] int32 positions; text tokens unchanged.
  """
  seen = mask & is_text(roles)[:, None, :]
  last = jnp.max(jnp.where(seen, positions[:, None, :], -1), axis=-1)
  return jnp.where(roles == Role.CLS, last + 1, positions).astype(jnp.int32)


@flax.struct.dataclass
class MaskSpec:
  """The structured description of a training mask: the layout arrays (module docstring),
  all [B, T] (``cls_window`` [B, T, 2]) int, and the phase. ``Transformer`` takes it in place
  of a dense mask; ``model.attention`` then picks how the rules are computed."""

  roles: jax.Array
  segment_ids: jax.Array
  positions: jax.Array
  cls_window: jax.Array
  phase: str = flax.struct.field(pytree_node=False)

  @classmethod
  def from_batch(cls, batch, phase: str) -> "MaskSpec":
    """From a packed batch dict (``data/packing.py``), checked."""
    check_phase(phase)
    _check_layout(*(batch[k] for k in ("roles", "segment_ids", "positions", "cls_window")))
    return cls(roles=batch["roles"], segment_ids=batch["segment_ids"],
               positions=batch["positions"], cls_window=batch["cls_window"], phase=phase)

  def dense(self):
    """The [B, T, T] mask (``attention_mask``)."""
    return attention_mask(self.roles, self.segment_ids, self.positions, self.cls_window,
                          self.phase)

  def cls_row_chunks(self, chunk: int):
    """The [CLS] rows of each packed row, ``chunk`` at a time: [n, B, chunk] int32 row
    indices in order, ``T`` where a chunk has no more [CLS] rows, ``n = ceil(T / chunk)``.
    The static bound on [CLS] rows is ``T`` itself, so no layout can exceed it; callers skip
    the chunks that hold no [CLS] row, so the work follows the rows there are."""
    b, t = self.roles.shape
    is_cls = self.roles == Role.CLS
    order = jnp.argsort(~is_cls, axis=1, stable=True).astype(jnp.int32)  # [CLS] rows first
    rows = jnp.where(jnp.arange(t) < is_cls.sum(1, keepdims=True), order, t)
    n = -(-t // chunk)
    rows = jnp.pad(rows, ((0, 0), (0, n * chunk - t)), constant_values=t)
    return rows.reshape(b, n, chunk).transpose(1, 0, 2)

  def cls_rows_visible(self, rows):
    """[B, n, T]: the text keys the [CLS] rows ``rows`` [B, n] read (``cls_visible``; rows
    equal to ``T`` are unused and read nothing)."""
    take = lambda x: jnp.take_along_axis(x, jnp.minimum(rows, x.shape[1] - 1), axis=1)
    lo, hi = take(self.cls_window[..., 0]), take(self.cls_window[..., 1])
    keys = lambda x: x[:, None, :]
    seen = cls_visible(take(self.segment_ids), lo, hi, keys(self.roles),
                       keys(self.segment_ids), keys(self.positions), self.phase)
    return seen & _q(rows < self.roles.shape[1])

  def main_cls(self):
    """The text -> [CLS] edges: (key [B, T] int32, the row's segment's main [CLS] index,
    edge [B, T] bool, whether the row reads it; ``reads_cls``). One main [CLS] per segment
    (``build_segment``'s layout), found by a segment reduction over the metadata."""
    b, t = self.roles.shape
    lo, hi = self.cls_window[..., 0], self.cls_window[..., 1]
    main = (self.roles == Role.CLS) & (lo > hi)
    index = jnp.where(main, jnp.arange(t, dtype=jnp.int32), -1)
    per_segment = jax.vmap(lambda i, s: jax.ops.segment_max(i, s, num_segments=t + 1))(
        index, jnp.clip(self.segment_ids, 0, t))
    key = jnp.take_along_axis(per_segment, jnp.clip(self.segment_ids, 0, t), axis=1)
    found = key >= 0
    key = jnp.where(found, key, 0).astype(jnp.int32)
    at = lambda x: jnp.take_along_axis(x, key, axis=1)[..., None]
    edge = reads_cls(self.roles, self.segment_ids, at(self.roles), at(self.segment_ids),
                     at(main), self.phase)[..., 0]
    return key, edge & found


def structured_cls_positions(spec: MaskSpec, chunk: int):
  """``cls_positions`` without the dense mask: each [CLS] row's keys from ``cls_visible``,
  ``chunk`` rows at a time ([chunk, T] at once). [B, T] int32."""
  t = spec.roles.shape[1]
  rows = spec.cls_row_chunks(min(chunk, t))

  def last(rows):
    seen = spec.cls_rows_visible(rows)
    return jnp.max(jnp.where(seen, spec.positions[:, None, :], -1), axis=-1) + 1

  lasts = jax.lax.map(last, rows)  # [n, B, chunk]
  b_idx = jnp.broadcast_to(jnp.arange(spec.roles.shape[0])[None, :, None], rows.shape)
  positions = spec.positions.astype(jnp.int32).at[b_idx, rows].set(lasts, mode="drop")
  return positions


# Decoding rows, in absolute cache coordinates: the cache row is one segment (its non-PAD
# keys), its [CLS] slot holds the newest main [CLS] (``decode/cache.py``).

def decode_token_row(key_roles, key_positions, q_positions):
  """[B, S] keys a RESPONSE token at ``q_positions`` [B] reads: causal text, and [CLS]."""
  segments = (key_roles != Role.PAD).astype(jnp.int32)
  q_roles = jnp.full(jnp.shape(q_positions), Role.RESPONSE, jnp.int32)
  ones = jnp.ones(jnp.shape(q_positions), jnp.int32)
  return (text_visible(q_roles, ones, q_positions, key_roles, segments, key_positions)
          | reads_cls(q_roles, ones, key_roles, segments, key_roles == Role.CLS, "sft"))


def window_row(key_roles, key_positions, sees_query, lo, hi, self_slot):
  """The row of a re-evaluating ``[CLS]`` (rules 1-4): (mask [B, S], position [B]).

  ``lo``, ``hi`` [B] are inclusive RESPONSE *positions*; the row reads what
  ``window_visible`` allows (rule 4: never PAD, BOS, TEMPLATE, CLS) and its own slot
  ``self_slot`` [B]; its position is one past the last position it reads.
  """
  seen = window_visible(key_roles, key_positions, sees_query=sees_query, lo=lo, hi=hi)
  position = jnp.max(jnp.where(seen, key_positions, -1), axis=-1) + 1
  slots = jnp.arange(key_roles.shape[-1])
  return seen | (slots == _q(self_slot)), position.astype(jnp.int32)


def prompt_mask(roles, positions):
  """The prompt pass (one segment per row, [CLS] rows main): the SFT training mask [B, T, T]
  and the positions with [CLS] placed (``attention_mask``, ``cls_positions``)."""
  chex.assert_rank([roles, positions], 2)
  segment_ids = (roles != Role.PAD).astype(jnp.int32)
  window = jnp.broadcast_to(jnp.array(EMPTY_WINDOW, jnp.int32), roles.shape + (2,))
  mask = attention_mask(roles, segment_ids, positions, window, "sft")
  return mask, cls_positions(mask, roles, positions)
