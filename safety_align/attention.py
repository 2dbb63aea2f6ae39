"""Attention by structure: the training masks of ``masks.py`` without a [T, S] score matrix.

The [CLS] masks decompose (METHOD.md section 3) into

(a) text -> text: segment-aware causal attention, exactly the source model's ([CLS] keys
    excluded), computed by a kernel that returns the output ``o_text`` and the log-sum-exp
    ``lse_text`` of each row's scores;
(b) RESPONSE -> its segment's main [CLS] (SFT): one extra key per row, merged by the
    log-sum-exp combine ``o = o_text + g * w * (v_cls - o_text)``, ``w = sigmoid(s_cls -
    lse_text)`` (the [CLS] key's weight in the joint softmax; ``g`` the per-head
    ``cls_gate``, 1 without ``model.cls_attention_gate``): the formula of
    ``model.Attention._gate_cls``;
(c) the few [CLS] query rows: dense attention over the row's keys (``masks.cls_visible``),
    ``CLS_CHUNK`` rows at a time, scattered back into their rows. The static bound on [CLS]
    rows per packed row is T itself (``MaskSpec.cls_row_chunks``), so no layout exceeds it;
    chunks holding no [CLS] row are skipped, so the work follows the rows there are.

Implementations of (a) (``model.attention``):

* ``blockwise``: pure-JAX online softmax over key blocks inside a map over query blocks
  (Rabe & Staats, "Self-attention does not need O(n^2) memory"), both block bodies under
  ``jax.checkpoint``: forward and backward hold [BLOCK, BLOCK] scores, never [T, S]. Key blocks
  no query of the block reads (other segments, the future) are skipped.
* ``flash``: the fused Pallas GPU kernel (``jax.experimental.pallas.ops.gpu.attention``),
  causal by row index with segment ids, [CLS] and PAD rows given ids no text row has. It
  returns the log-sum-exp but does not differentiate it, so ``_pallas_mha`` wraps it in a
  ``custom_vjp`` whose backward is the kernel's own fused backward with ``delta = rowsum(o *
  do) - dlse`` (d lse / d s = softmax: the lse cotangent enters exactly where delta does). It
  needs the packer's layout, where a segment's text positions increase along the row (index
  causality is then position causality). On CPU the kernel runs interpreted (for tests: use
  ``blockwise`` there). There is no TPU kernel here (splash attention does not differentiate
  its log-sum-exp either): on TPU use ``blockwise``.

Shapes: q [B, T, Hkv, G, D] (G query heads per kv head), k, v [B, T, Hkv, D]; out as q.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
import jax.numpy as jnp

from safety_align import masks
from safety_align.masks import Role

IMPLEMENTATIONS = ("blockwise", "flash")
# The checkpoint name of the attention outputs ``model.remat="dots"`` saves (o_text, lse_text,
# the final output), as it saves dense attention's ``probs @ v``.
SAVED = "attention_out"
BLOCK = 512  # blockwise query and key block (clipped to T)
CLS_CHUNK = 64  # [CLS] rows per dense block
FLASH_BLOCK, FLASH_BWD_BLOCK = 128, 32


def attend(q, k, v, spec: masks.MaskSpec, implementation: str, gate=None):
  """Attention of q over k, v under ``spec``'s mask; ``gate`` [Hkv * G] (the ``cls_gate``
  parameter) or None."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"Unknown attention implementation {implementation!r}: expected one of "
                     f"{IMPLEMENTATIONS} (or 'dense', which takes a dense mask).")
  text = _recomputed(blockwise_text) if implementation == "blockwise" else flash_text
  o, lse = (checkpoint_name(x, SAVED) for x in text(q, k, v, spec))
  o = merge_cls_key(o, lse, q, k, v, spec, gate)
  return checkpoint_name(_recomputed(cls_rows)(o, q, k, v, spec), SAVED)


def _recomputed(f):
  """``f`` whose backward recomputes it from its inputs (its blocks under their own
  ``jax.checkpoint``s). An enclosing remat's policy overrides nested ``jax.checkpoint``
  policies: under ``model.remat="dots"`` autodiff through ``f`` would save every score block,
  [T, S] per layer in all; a ``custom_vjp`` with the inputs as residuals saves none, for one
  more forward of ``f`` in the backward."""
  g = jax.custom_vjp(f)
  g.defvjp(lambda *args: (f(*args), args), lambda args, ct: jax.vjp(f, *args)[1](ct))
  return g


def _scores(q, k, subscripts):
  return jnp.einsum(subscripts, q, k.astype(q.dtype),
                    preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))


def _text_block_visible(q_meta, k_meta):
  """[B, bq, bk]: ``masks.text_visible``, and PAD / [CLS] rows reading themselves (so every
  row is finite; (c) replaces the [CLS] rows)."""
  (qr, qs, qp, qi), (kr, ks, kp, ki) = q_meta, k_meta
  keys = lambda x: x[:, None, :]
  text = masks.text_visible(qr, qs, qp, keys(kr), keys(ks), keys(kp))
  return text | ((qr == Role.CLS) | (qr == Role.PAD))[..., None] & (qi[..., None] == keys(ki))


def blockwise_text(q, k, v, spec: masks.MaskSpec):
  """(a) by online softmax over blocks: (o_text [B, T, Hkv, G, D], lse_text [B, T, Hkv, G])."""
  b, t = spec.roles.shape
  block = min(BLOCK, t)
  n = -(-t // block)
  length = n * block

  def padded(x, value=0):  # [B, T, ...] -> [B, n * block, ...], the tail PAD tokens
    return jnp.pad(x, [(0, 0), (0, length - t)] + [(0, 0)] * (x.ndim - 2),
                   constant_values=value)

  def blocks(x):  # [B, n * block, ...] -> [n, B, block, ...]
    return x.reshape((b, n, block) + x.shape[2:]).swapaxes(0, 1)

  meta = tuple(blocks(x) for x in (
      padded(spec.roles, int(Role.PAD)), padded(spec.segment_ids), padded(spec.positions),
      jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))))
  k_blocks, v_blocks = blocks(padded(k)), blocks(padded(v))
  acc_dtype = jnp.float32

  def query_block(qb, q_meta):
    def key_step(carry, key_block):
      kb, vb, k_meta = key_block
      visible = _text_block_visible(q_meta, k_meta)

      def update(carry):
        m, l, acc = carry
        s = _scores(qb, kb, "bqhgd,bkhd->bqhgk")
        s = jnp.where(visible[:, :, None, None, :], s, -jnp.inf)
        # The running max only shifts the exponent (the result does not depend on it).
        m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(-1)))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.)
        p = jnp.exp(s - shift[..., None])
        correction = jnp.exp(m - shift)
        pv = jnp.einsum("bqhgk,bkhd->bqhgd", p.astype(vb.dtype), vb,
                        preferred_element_type=acc_dtype)
        return m_new, l * correction + p.sum(-1), acc * correction[..., None] + pv

      return jax.lax.cond(visible.any(), update, lambda c: c, carry), None

    stats = qb.shape[:-1]
    init = (jnp.full(stats, -jnp.inf, acc_dtype), jnp.zeros(stats, acc_dtype),
            jnp.zeros(qb.shape, acc_dtype))
    (m, l, acc), _ = jax.lax.scan(jax.checkpoint(key_step), init, (k_blocks, v_blocks, meta))
    return (acc / l[..., None]).astype(qb.dtype), m + jnp.log(l)

  o, lse = jax.lax.map(lambda x: jax.checkpoint(query_block)(*x), (blocks(padded(q)), meta))
  unblock = lambda x: x.swapaxes(0, 1).reshape((b, length) + x.shape[3:])[:, :t]
  return unblock(o), unblock(lse)


def _flash_segments(spec: masks.MaskSpec):
  """Kernel segment ids: text rows their segment, [CLS] rows -1, PAD rows -2 (a text row
  reads no [CLS] or PAD key; those rows read only each other and are replaced or unused)."""
  return jnp.where(masks.is_text(spec.roles), spec.segment_ids,
                   jnp.where(spec.roles == Role.CLS, -1, -2)).astype(jnp.int32)


def flash_text(q, k, v, spec: masks.MaskSpec):
  """(a) by the fused Pallas GPU kernel: (o_text, lse_text) as ``blockwise_text``."""
  backend = jax.default_backend()
  if backend not in ("cpu", "gpu"):
    raise ValueError(f"model.attention='flash' runs the Pallas GPU kernel, which has no "
                     f"{backend} version here: set model.attention='blockwise'.")
  b, t, hkv, g, d = q.shape
  block = FLASH_BLOCK if t > FLASH_BLOCK else max(16, 1 << (t - 1).bit_length())
  length = -(-t // block) * block
  pad = lambda x, value=0: jnp.pad(x, [(0, 0), (0, length - t)] + [(0, 0)] * (x.ndim - 2),
                                   constant_values=value)
  segments = pad(_flash_segments(spec), -3)
  heads = lambda x: pad(jnp.repeat(x, g, axis=2))  # kv heads to query heads
  o, lse = _pallas_mha(pad(q.reshape(b, t, hkv * g, d)), heads(k), heads(v), segments,
                       1.0 / math.sqrt(d), block, backend == "cpu")
  o = o[:, :t].reshape(b, t, hkv, g, d)
  return o, lse[:, :, :t].transpose(0, 2, 1).reshape(b, t, hkv, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _pallas_mha(q, k, v, segments, scale, block, interpret):
  """Causal segment attention [B, T, H, D] -> (o [B, T, H, D], natural lse [B, H, T])."""
  return _pallas_mha_fwd(q, k, v, segments, scale, block, interpret)[0]


def _pallas_mha_fwd(q, k, v, segments, scale, block, interpret):
  o, lse2 = gpu_attention.mha(
      q, k, v, segments, sm_scale=scale, causal=True,
      block_sizes=gpu_attention.BlockSizes(block_q=block, block_k=block),
      interpret=interpret, return_residuals=True)
  # The kernel's lse is in base 2 (exp2 of log2(e)-scaled scores).
  return (o, lse2 * math.log(2.0)), (q, k, v, segments, o, lse2)


def _pallas_mha_bwd(scale, block, interpret, residuals, cotangents):
  """The kernel's fused backward with ``delta = rowsum(o * do) - dlse``."""
  del block
  q, k, v, segments, o, lse2 = residuals
  do, dlse = cotangents
  b, t, h, d = q.shape
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32)) - dlse
  bb = min(FLASH_BWD_BLOCK, t)
  dp = pl.next_power_of_2(d)
  rows = lambda: pl.BlockSpec((None, t, None, dp), lambda i, j, _: (i, 0, j, 0))
  per_head = lambda: pl.BlockSpec((None, None, t), lambda i, j, _: (i, j, 0))
  out_block = lambda: pl.BlockSpec((None, bb, None, dp), lambda i, j, n: (i, n, j, 0))
  kernel = functools.partial(
      gpu_attention.mha_backward_kernel, sm_scale=scale, causal=True, block_q_dkv=bb,
      block_kv_dkv=bb, block_q_dq=bb, block_kv_dq=bb, head_dim=d)
  dq, dk, dv = pl.pallas_call(
      kernel, grid=(b, h, pl.cdiv(t, bb)),
      in_specs=[rows(), rows(), rows(), pl.BlockSpec((None, t), lambda i, j, _: (i, 0)),
                rows(), rows(), per_head(), per_head()],
      out_specs=[out_block(), out_block(), out_block()],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name="mha_backward_with_lse",
  )(q, k, v, segments, o, do, lse2, delta)
  return dq, dk, dv, None


_pallas_mha.defvjp(_pallas_mha_fwd, _pallas_mha_bwd)


def merge_cls_key(o, lse, q, k, v, spec: masks.MaskSpec, gate=None):
  """(b): the rows with a text -> [CLS] edge (``MaskSpec.main_cls``) take their [CLS] key
  into the softmax by the log-sum-exp combine (module docstring)."""
  b, t, hkv, g, d = q.shape
  key, edge = spec.main_cls()
  at = lambda x: jnp.take_along_axis(x, key[:, :, None, None], axis=1)  # [B, T, Hkv, D]
  k_cls, v_cls = at(k), at(v)
  s_cls = _scores(q, k_cls, "bthgd,bthd->bthg")
  w = jax.nn.sigmoid(s_cls - lse)
  if gate is not None:
    w = gate.astype(jnp.float32).reshape(hkv, g) * w
  mix = w.astype(o.dtype)[..., None]
  merged = o + mix * (v_cls[:, :, :, None].astype(o.dtype) - o)
  return jnp.where(edge[:, :, None, None, None], merged, o)


def cls_rows(o, q, k, v, spec: masks.MaskSpec):
  """(c): the [CLS] rows' outputs, ``CLS_CHUNK`` rows at a time (chunks without a [CLS] row
  are skipped), written into ``o``."""
  b, t = spec.roles.shape
  rows = spec.cls_row_chunks(min(CLS_CHUNK, t))  # [n, B, chunk]

  def attend_rows(rows):
    r = jnp.minimum(rows, t - 1)  # unused entries compute a finite row that is dropped
    qr = jnp.take_along_axis(q, r[:, :, None, None, None], axis=1)
    seen = spec.cls_rows_visible(rows) | (r[..., None] == jnp.arange(t))
    s = jnp.where(seen[:, :, None, None, :], _scores(qr, k, "bchgd,bshd->bchgs"), -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(o.dtype)
    return jnp.einsum("bchgs,bshd->bchgd", p, v.astype(o.dtype))

  def chunk_rows(rows):
    return jax.lax.cond((rows < t).any(), attend_rows,
                        lambda r: jnp.zeros(r.shape + o.shape[2:], o.dtype), rows)

  out = jax.lax.map(jax.checkpoint(chunk_rows), rows)  # [n, B, chunk, Hkv, G, D]
  batch = jnp.broadcast_to(jnp.arange(b)[None, :, None], rows.shape)
  return o.at[batch, rows].set(out, mode="drop")
