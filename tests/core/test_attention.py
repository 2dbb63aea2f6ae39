"""Structured attention (``attention.py``) against the dense mask: outputs, gradients, the
invisibility of [CLS] to the text, and memory that does not grow as T^2."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import chat_segment, packed, tiny_model_config
from safety_align import attention, masks
from safety_align.masks import Role
from safety_align.model import Transformer, forward_batch, init_params

STRUCTURED = ("blockwise", "flash")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
  """Blocks and [CLS] chunks far below T, so every loop runs several times and skips some."""
  monkeypatch.setattr(attention, "BLOCK", 8)
  monkeypatch.setattr(attention, "CLS_CHUNK", 2)


def _batch():
  """Two rows: three segments (window rows, several [CLS] chunks) then padding; padding only."""
  segments = [chat_segment(windows=[(0, 1, 1), (2, 3, 0)]),
              chat_segment(query=(13, 14), response=(24, 25, 26), label=0, windows=[(1, 2, 0)]),
              chat_segment(query=(15,), response=(27,))]
  return {k: jnp.asarray(v) for k, v in packed(segments, seq_len=44, batch=2).items()}


def _params(cfg, gate=0.0):
  params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.full_like(x, gate) if "cls_gate" in jax.tree_util.keystr(path) else x,
      params)


def _run(cfg, params, batch, phase):
  """(lm_logits, cls_logits, gradients) of a loss over the non-PAD rows."""
  keep = (batch["roles"] != Role.PAD)[..., None]

  def loss(p):
    lm, cls = forward_batch(Transformer(cfg), p, batch, phase)
    return jnp.sum(jnp.where(keep, lm, 0.) ** 2) * 1e-3 + jnp.sum(jnp.where(keep, cls, 0.) ** 2), (
        lm, cls)

  (_, (lm, cls)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return lm, cls, grads


def _close(got, want, rows):
  got, want = np.asarray(got)[rows], np.asarray(want)[rows]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("phase,gate,scan", [
    ("sft", 0.7, False), ("sft", None, True), ("pretrain", None, False)])
def test_structured_matches_dense(phase, gate, scan):
  cfg = tiny_model_config(cls_attention_gate=gate is not None, scan_layers=scan)
  params = _params(cfg, gate or 0.0)
  b = _batch()
  rows = np.asarray(b["roles"] != Role.PAD)
  assert np.sum(np.asarray(b["roles"]) == Role.CLS) > 2 * attention.CLS_CHUNK
  lm, cls, grads = _run(cfg, params, b, phase)
  for impl in STRUCTURED:
    lm_s, cls_s, grads_s = _run(dataclasses.replace(cfg, attention=impl), params, b, phase)
    _close(lm_s, lm, rows)
    _close(cls_s, cls, rows)
    for name, g, g_s in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(grads), jax.tree.leaves(grads_s)):
      scale = np.abs(np.asarray(g)).max()
      np.testing.assert_allclose(g_s, g, rtol=0, atol=1e-5 * scale + 1e-30, err_msg=str(name[0]))


@pytest.mark.parametrize("impl", ("dense",) + STRUCTURED)
@pytest.mark.parametrize("phase", ["pretrain", "sft"])
def test_cls_changes_no_cls_blind_text_logit(impl, phase):
  """Other [CLS] embeddings: the text rows that do not read [CLS] are bit-for-bit the same
  (all text in pretraining, all but the responses in SFT); the responses do change in SFT."""
  cfg = tiny_model_config(attention=impl)
  params = _params(cfg)
  other = dict(params, cls_embed=params["cls_embed"] + 1.0)
  b = _batch()
  fwd = jax.jit(lambda p: forward_batch(Transformer(cfg), p, b, phase)[0])
  base, moved = np.asarray(fwd(params)), np.asarray(fwd(other))
  roles = np.asarray(b["roles"])
  text = masks.is_text(roles)
  blind = text & ((roles != Role.RESPONSE) | (phase == "pretrain"))
  np.testing.assert_array_equal(moved[blind], base[blind])
  if phase == "sft":
    assert np.abs(moved[roles == Role.RESPONSE] - base[roles == Role.RESPONSE]).min() > 0


def test_structured_cls_positions_match_dense():
  b = _batch()
  for phase in masks.PHASES:
    spec = masks.MaskSpec.from_batch(b, phase)
    dense = masks.cls_positions(spec.dense(), spec.roles, spec.positions)
    np.testing.assert_array_equal(masks.structured_cls_positions(spec, chunk=2), dense)


def _memory(impl, t, hkv=2, groups=2, d=16):
  """Compiled temporary bytes of the gradient of attention over a [1, t] packed row."""
  segments = [chat_segment(query=tuple(range(10, 10 + t // 8)),
                           response=tuple(range(20, 20 + t // 4)), windows=[(0, 3, 0)])
              for _ in range(2)]
  spec = masks.MaskSpec.from_batch(
      {k: jnp.asarray(v) for k, v in packed(segments, seq_len=t).items()}, "sft")
  q = jax.ShapeDtypeStruct((1, t, hkv, groups, d), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, t, hkv, d), jnp.float32)

  def dense(q, k, v):
    s = jnp.einsum("bthgd,bshd->bthgs", q, k)
    p = jax.nn.softmax(jnp.where(spec.dense()[:, :, None, None], s, -jnp.inf), axis=-1)
    return jnp.einsum("bthgs,bshd->bthgd", p, v)

  fn = dense if impl == "dense" else lambda q, k, v: attention.attend(q, k, v, spec, impl)
  grad = jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2))
  return jax.jit(grad).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly_dense_quadratically(monkeypatch):
  monkeypatch.setattr(attention, "BLOCK", 64)
  monkeypatch.setattr(attention, "CLS_CHUNK", 8)
  dense = _memory("dense", 1024) / _memory("dense", 256)
  blockwise = _memory("blockwise", 1024) / _memory("blockwise", 256)
  assert dense > 10, dense
  assert blockwise < 6, blockwise


def test_mask_spec_refuses_a_cache():
  from safety_align.model import KVCache  # pylint: disable=g-import-not-at-top
  cfg = tiny_model_config(attention="blockwise")
  b = _batch()
  spec = masks.MaskSpec.from_batch(b, "sft")
  with pytest.raises(ValueError, match="decode with a dense mask"):
    Transformer(cfg).apply({"params": _params(cfg)}, b["tokens"], b["positions"], spec,
                           KVCache.zeros(cfg, 2, 44), jnp.zeros((2, 44), jnp.int32))
