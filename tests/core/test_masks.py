"""Mask semantics, token by token, against a direct reading of METHOD.md section 3."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import chat_segment, packed
from safety_align import masks
from safety_align.decode.cache import prompt_pass_inputs
from safety_align.masks import Role
from safety_align.model import Transformer, init_params

TEXT = {Role.BOS, Role.TEMPLATE, Role.QUERY, Role.RESPONSE}


@dataclasses.dataclass
class Tok:
  """One token as METHOD.md describes it: its slot, role, segment, position, and for a
  [CLS] row its window (None: the segment's main [CLS]) and whether it sees the QUERY."""

  index: int
  role: Role
  seg: int
  pos: int
  window: tuple[int, int] | None = None
  sees_query: bool = False


def reads(q: Tok, k: Tok, phase: str) -> bool:
  """METHOD.md sections 3 and 5, stated once: does query token q attend to key token k?"""
  if q.index == k.index and q.role in (Role.CLS, Role.PAD):
    return True  # [CLS] reads itself; PAD only itself
  if q.seg == 0 or q.seg != k.seg:
    return False
  if q.role in TEXT and k.role in TEXT:
    return k.pos <= q.pos  # ordinary causal attention, as without [CLS]
  if q.role == Role.CLS and k.role in TEXT:
    if q.window is None:  # the main [CLS]: the document (pretrain), the query (SFT)
      return phase == "pretrain" or k.role == Role.QUERY
    lo, hi = q.window  # a window row (rules 1-3); never PAD, BOS, TEMPLATE (rule 4)
    return (k.role == Role.QUERY and q.sees_query) or (
        k.role == Role.RESPONSE and lo <= k.pos <= hi)
  if q.role == Role.RESPONSE and k.role == Role.CLS:
    return phase == "sft" and k.window is None  # the implicit path
  return False


def reference_position(q: Tok, keys, phase) -> int:
  """A [CLS] row's position: one past the last text position it reads."""
  seen = [k.pos for k in keys if k.role in TEXT and reads(q, k, phase)]
  return max(seen, default=-1) + 1


def batch_tokens(b, row=0):
  roles, seg, pos, win = (b[k][row] for k in ("roles", "segment_ids", "positions",
                                              "cls_window"))
  return [Tok(i, Role(int(roles[i])), int(seg[i]), int(pos[i]),
              None if win[i, 0] > win[i, 1] else (int(win[i, 0]), int(win[i, 1])))
          for i in range(len(roles))]


def reference_mask(b, phase):
  """The rules written as loops over (query, key) pairs."""
  toks = batch_tokens(b)
  return np.array([[reads(q, k, phase) for k in toks] for q in toks])


@pytest.mark.parametrize("phase", ["pretrain", "sft"])
def test_mask_matches_reference_token_by_token(phase):
  seg_a = chat_segment(windows=[(0, 1, 1), (2, 3, 0)])
  seg_b = chat_segment(query=(13, 14), response=(24, 25), label=0)
  b = packed([seg_a, seg_b], seq_len=32)
  got = masks.attention_mask(*(jnp.asarray(b[k]) for k in
                               ("roles", "segment_ids", "positions", "cls_window")), phase)
  np.testing.assert_array_equal(np.asarray(got[0]), reference_mask(b, phase))


def test_phase_rules_spelled_out():
  b = packed([chat_segment()])
  roles = b["roles"][0]
  args = [jnp.asarray(b[k]) for k in ("roles", "segment_ids", "positions", "cls_window")]
  sft = np.asarray(masks.attention_mask(*args, "sft")[0])
  pre = np.asarray(masks.attention_mask(*args, "pretrain")[0])
  cls = 0
  query = np.nonzero(roles == Role.QUERY)[0]
  response = np.nonzero(roles == Role.RESPONSE)[0]
  template = np.nonzero(roles == Role.TEMPLATE)[0]
  text = np.nonzero(np.isin(roles, list(TEXT)))[0]
  # SFT: [CLS] reads exactly the query (and itself); responses read [CLS]; nothing else does.
  assert set(np.nonzero(sft[cls])[0]) == set(query) | {cls}
  assert sft[response, cls].all() and not sft[query, cls].any() and not sft[template, cls].any()
  # Pretraining: [CLS] reads every text token; no token reads [CLS].
  assert set(np.nonzero(pre[cls])[0]) == set(text) | {cls}
  assert not pre[text, cls].any()
  # Text tokens are causal among themselves in both phases.
  for m in (sft, pre):
    np.testing.assert_array_equal(m[np.ix_(text, text)], np.tril(np.ones((len(text),) * 2, bool)))


def test_cls_position_is_one_past_the_last_token_it_sees():
  b = packed([chat_segment(windows=[(1, 2, 1)])])
  args = [jnp.asarray(b[k]) for k in ("roles", "segment_ids", "positions", "cls_window")]
  for phase, expected_main in (("sft", 6), ("pretrain", 11)):
    m = masks.attention_mask(*args, phase)
    pos = np.asarray(masks.cls_positions(m, args[0], args[2]))[0]
    # text: BOS 0, template 1-2, query 3-5, template 6, response 7-10
    assert pos[0] == expected_main
    assert pos[1] == 10  # window over response tokens 1..2 = positions 8..9
    np.testing.assert_array_equal(pos[2:12], np.arange(10))


def test_cls_positions_match_reference():
  b = packed([chat_segment(windows=[(0, 1, 1), (1, 3, 0)]), chat_segment(query=(13,))],
             seq_len=32)
  toks = batch_tokens(b)
  for phase in masks.PHASES:
    spec = masks.MaskSpec.from_batch({k: jnp.asarray(v) for k, v in b.items()}, phase)
    pos = np.asarray(masks.cls_positions(spec.dense(), spec.roles, spec.positions))[0]
    want = [reference_position(q, toks, phase) if q.role == Role.CLS else q.pos for q in toks]
    np.testing.assert_array_equal(pos, want)


def _decode_cache():
  """A decode-time cache row: ``[CLS]``, scratch, a left-padded prompt, 4 response tokens."""
  roles = np.array([[Role.PAD, Role.BOS, Role.TEMPLATE, Role.QUERY, Role.QUERY, Role.QUERY,
                     Role.TEMPLATE]], np.int32)
  ids = np.where(roles == Role.PAD, 0, 7).astype(np.int32)
  _, rls, pos, prompt = prompt_pass_inputs(64, jnp.asarray(ids), jnp.asarray(roles),
                                           jnp.array([6]), True)
  rls = np.concatenate([np.asarray(rls), np.full((1, 4), Role.RESPONSE, np.int32)], axis=1)
  pos = np.concatenate([np.asarray(pos), np.arange(6, 10, dtype=np.int32)[None]], axis=1)
  keys = [Tok(i, Role(int(r)), int(r != Role.PAD), int(p)) for i, (r, p) in
          enumerate(zip(rls[0], pos[0]))]
  return rls, pos, np.asarray(prompt[0]), keys


def test_prompt_pass_matches_reference():
  rls, pos, prompt, keys = _decode_cache()
  n = prompt.shape[0]
  np.testing.assert_array_equal(prompt, [[reads(q, k, "sft") for k in keys[:n]]
                                         for q in keys[:n]])
  assert pos[0, 0] == reference_position(keys[0], keys[:n], "sft") == 5


def test_decode_token_row_matches_reference():
  rls, pos, _, keys = _decode_cache()
  for slot in range(len(keys) - 4, len(keys)):  # each response token, fed at its slot
    q = Tok(slot, Role.RESPONSE, 1, int(pos[0, slot]))
    got = masks.decode_token_row(jnp.asarray(rls), jnp.asarray(pos), jnp.array([q.pos]))
    np.testing.assert_array_equal(np.asarray(got[0]), [reads(q, k, "sft") for k in keys])


@pytest.mark.parametrize("sees_query,lo,hi", [(False, 7, 8), (True, 6, 6), (True, 3, 2),
                                              (False, -100, 100)])
@pytest.mark.parametrize("self_slot", [0, 1])
def test_window_row_matches_reference(sees_query, lo, hi, self_slot):
  rls, pos, _, keys = _decode_cache()
  q = Tok(self_slot, Role.CLS, 1, 0, (lo, hi), sees_query)
  got, position = masks.window_row(jnp.asarray(rls), jnp.asarray(pos), jnp.array([sees_query]),
                                   jnp.array([lo]), jnp.array([hi]), jnp.array([self_slot]))
  np.testing.assert_array_equal(np.asarray(got[0]), [reads(q, k, "sft") for k in keys])
  assert int(position[0]) == reference_position(q, keys, "sft")


def test_window_visible_never_shows_pad_bos_template():
  roles = jnp.array([Role.PAD, Role.BOS, Role.TEMPLATE, Role.QUERY, Role.TEMPLATE,
                     Role.RESPONSE, Role.RESPONSE, Role.CLS])
  pos = jnp.array([0, 0, 1, 2, 3, 4, 5, 6])
  got = masks.window_visible(roles, pos, sees_query=True, lo=0, hi=100)
  np.testing.assert_array_equal(got, [False, False, False, True, False, True, True, False])
  got = masks.window_visible(roles, pos, sees_query=False, lo=5, hi=5)
  np.testing.assert_array_equal(got, [False] * 6 + [True, False])


def test_unknown_phase_is_an_error():
  b = packed([chat_segment()])
  with pytest.raises(ValueError, match="Unknown phase 'rlhf'"):
    masks.attention_mask(*(jnp.asarray(b[k]) for k in
                           ("roles", "segment_ids", "positions", "cls_window")), "rlhf")


def _cls_logits(cfg, params, segment, phase):
  from safety_align.model import forward_batch
  b = {k: jnp.asarray(v) for k, v in packed([segment]).items()}
  _, cls_logits = forward_batch(Transformer(cfg), params, b, phase)
  return np.asarray(cls_logits[0, 0])


@pytest.mark.parametrize("phase,changed,visible", [
    ("sft", "query", True), ("sft", "response", False),
    ("pretrain", "query", True), ("pretrain", "response", True)])
def test_cls_output_depends_exactly_on_what_it_sees(model_cfg, phase, changed, visible):
  params = nn.meta.unbox(init_params(model_cfg, jax.random.key(0)))
  base = _cls_logits(model_cfg, params, chat_segment(), phase)
  edit = dict(query=(10, 11, 40), response=(20, 21, 22, 40))[changed]
  seg = chat_segment(**{changed: edit})
  other = _cls_logits(model_cfg, params, seg, phase)
  if visible:
    assert np.abs(other - base).max() > 1e-4
  else:
    np.testing.assert_array_equal(other, base)
