"""A LLaMA-family decoder (RMSNorm, RoPE, SwiGLU, GQA) with the [CLS] safety branch.

The `[CLS]` token is one extra embedding row (token id ``vocab_size``, never generated: the LM
head keeps the original vocabulary) and a classification head of two logits (benign,
malicious) on its final, normed hidden state. Which tokens see ``[CLS]`` and which tokens
``[CLS]`` sees is decided entirely by the attention mask (``masks.py``).

One forward serves training and decoding: ``Transformer(tokens, positions, mask, cache,
write_index)``. Without a cache the keys are the new tokens themselves; with a cache the new
tokens' keys and values are first scattered into the cache at ``write_index`` and the new
queries attend over the whole cache. Parameters and activations carry logical axis names that
``sharding.py`` maps onto the device mesh. The architecture is a ``ModelConfig``
(``model_config.py``, importable from here).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from safety_align import attention as attention_lib
from safety_align import masks
from safety_align.model_config import ModelConfig

Array = jax.Array
NUM_CLASSES = 2  # benign (0), malicious (1)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, laid out as the layers are.

  Scanned layers (``scan_layers``): one stacked ``k``, ``v`` [L, B, n_kv_heads, S, head_dim]
  that rides the layer scan's carry. Unrolled layers: ``k``, ``v`` are tuples of L per-layer
  [B, n_kv_heads, S, head_dim] buffers, so each layer writes and reads its own buffer in place
  (XLA:CPU copies a layer's part out of a stacked cache on every step).
  Heads before slots: each (row, kv head) is one contiguous [S, head_dim] matrix, so attention
  over the cache is a plain batched matmul with no per-step transpose of the cache.
  """

  k: Array | tuple[Array, ...]
  v: Array | tuple[Array, ...]

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> "KVCache":
    shape = (batch, cfg.n_kv_heads, length, cfg.dim_per_head)
    if cfg.scan_layers:
      zeros = lambda: jnp.zeros((cfg.n_layers,) + shape, cfg.compute_dtype)
    else:
      zeros = lambda: tuple(jnp.zeros(shape, cfg.compute_dtype) for _ in range(cfg.n_layers))
    return cls(k=zeros(), v=zeros())


def _init(cfg: ModelConfig, axes, scale: float | None = None):
  return nn.with_logical_partitioning(
      nn.initializers.normal(cfg.init_scale if scale is None else scale), axes)


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.cfg.weight_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (y * scale.astype(jnp.float32)).astype(self.cfg.compute_dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding, half-split layout (as HF Llama). x [B, T, H, Dh], positions [B, T]."""
  half = x.shape[-1] // 2
  freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle = positions.astype(jnp.float32)[:, :, None, None] * freq  # [B, T, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Dense(nn.Module):
  """``x``'s trailing dimensions contracted with a ``kernel`` [those dimensions..., *features]
  named ``axes`` (the inputs' names, then the features'), plus an optional ``bias`` [*features].

  ``nn.DenseGeneral``'s parameters, initial values and arithmetic, but the kernel is created
  and logically constrained in its full shape: DenseGeneral draws it as a 2-D [in, out] array
  and constrains that by the kernel's names, which fails under a mesh for 3-axis kernels.
  """

  cfg: ModelConfig
  features: tuple[int, ...]
  axes: tuple[str, ...]
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    n_in = len(self.axes) - len(self.features)
    in_shape = x.shape[x.ndim - n_in:]

    def init(rng, shape, dtype):  # DenseGeneral's draw: [prod(in), prod(features)], reshaped
      flat = (math.prod(in_shape), math.prod(self.features))
      return nn.initializers.normal(cfg.init_scale)(rng, flat, dtype).reshape(shape)

    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                        in_shape + self.features, cfg.weight_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.axes[n_in:]),
                        self.features, cfg.weight_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=cfg.compute_dtype)
    contract = tuple(range(x.ndim - n_in, x.ndim))
    out = jax.lax.dot_general(x, kernel, ((contract, tuple(range(n_in))), ((), ())))
    return out if bias is None else out + bias


def _dense(cfg: ModelConfig, features, axes, name, use_bias=False) -> Dense:
  features = features if isinstance(features, tuple) else (features,)
  return Dense(cfg, features, axes, use_bias, name=name)


class Attention(nn.Module):
  """Grouped-query attention over an explicit boolean mask, optionally through a KV cache, or
  over a ``masks.MaskSpec`` (training, no cache) by ``cfg.attention`` (``attention.py``)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, layer=None, write_index=None,
               cls_edges=None):
    """``cache``: None; this layer's (k, v) [B, Hkv, S, Dh] (``layer`` None); or every layer's
    stacked (k, v) [L, B, Hkv, S, Dh]. The new keys and values are written in place at
    (``layer``,) ``write_index``, the cache is returned and this layer attends over its part.

    ``cls_edges`` [B, T, S] bool (with ``cfg.cls_attention_gate``): the text -> [CLS] entries
    of ``mask`` (at most one per row). Their weight passes through a per-head gate ``g``
    (``cls_gate``, zero-initialised as LLaMA-Adapter's gating): with ``o_text`` the
    attention over the row's other keys, ``w`` the weight the [CLS] key has in the joint
    softmax and ``v_cls`` its value, ``out = o_text + g * w * (v_cls - o_text)``; ``g = 1``
    is ordinary attention, ``g = 0`` ignores [CLS] exactly.

    ``mask`` a ``masks.MaskSpec``: the structured path (no cache; ``cls_edges`` unused, the
    spec says which rows read [CLS])."""
    cfg = self.cfg
    hd = cfg.dim_per_head
    q = _dense(cfg, (cfg.n_heads, hd), ("embed", "heads", "head_dim"), "q_proj", cfg.qkv_bias)(x)
    k = _dense(cfg, (cfg.n_kv_heads, hd), ("embed", "kv_heads", "head_dim"), "k_proj",
               cfg.qkv_bias)(x)
    v = _dense(cfg, (cfg.n_kv_heads, hd), ("embed", "kv_heads", "head_dim"), "v_proj",
               cfg.qkv_bias)(x)
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", "act_head_dim"))
    b, t, _, _ = q.shape
    groups = cfg.n_heads // cfg.n_kv_heads
    if isinstance(mask, masks.MaskSpec):  # no cache (Transformer.forward_embedded checks)
      gate = self._cls_gate() if cfg.cls_attention_gate else None
      out = attention_lib.attend(q.reshape(b, t, cfg.n_kv_heads, groups, hd), k, v, mask,
                                 cfg.attention, gate)
      return self._out_proj(out.reshape(b, t, cfg.n_heads, hd)), None
    # Heads-major layout [B, Hkv, S, Dh] for keys/values (the cache's own layout), and the
    # query groups folded into the row axis: q [B, Hkv, T*G, Dh]. Both attention products are
    # then plain batched matmuls over (B, Hkv).
    if cache is not None:
      # Advanced indices split by a slice: the update is indexed [B, T, Hkv, Dh], as k, v are.
      at = (jnp.arange(b)[:, None], slice(None), write_index)
      if layer is not None:
        at = (layer,) + at
      cache = tuple(c.at[at].set(n.astype(c.dtype)) for c, n in zip(cache, (k, v)))
      k, v = cache if layer is None else (cache[0][layer], cache[1][layer])
    else:
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    qg = q.reshape(b, t, cfg.n_kv_heads, groups, hd).transpose(0, 2, 1, 3, 4)
    qg = qg.reshape(b, cfg.n_kv_heads, t * groups, hd)
    scores = jnp.einsum("bkqd,bksd->bkqs", qg, k.astype(q.dtype)).astype(jnp.float32)
    scores = scores.reshape(b, cfg.n_kv_heads, t, groups, -1) / jnp.sqrt(jnp.float32(hd))
    if cfg.cls_attention_gate:
      if cls_edges is None:
        raise ValueError("model.cls_attention_gate needs cls_edges (the text -> [CLS] "
                         "entries of the mask).")
      mask = mask & ~cls_edges
    text_scores = jnp.where(mask[:, None, :, None], scores, -jnp.inf)
    probs = jax.nn.softmax(text_scores, axis=-1).astype(cfg.compute_dtype)
    probs = probs.reshape(b, cfg.n_kv_heads, t * groups, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v.astype(cfg.compute_dtype))
    out = out.reshape(b, cfg.n_kv_heads, t, groups, hd)
    if cfg.cls_attention_gate:
      out = self._gate_cls(out, scores, text_scores, cls_edges, v)
    out = out.transpose(0, 2, 1, 3, 4).reshape(b, t, cfg.n_heads, hd)
    return self._out_proj(out), cache

  def _out_proj(self, out):
    return _dense(self.cfg, self.cfg.d_model, ("heads", "head_dim", "embed"), "o_proj")(out)

  def _cls_gate(self):
    return self.param("cls_gate", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                ("heads",)),
                      (self.cfg.n_heads,), self.cfg.weight_dtype)

  def _gate_cls(self, o_text, scores, text_scores, cls_edges, v):
    """``o_text + g * w * (v_cls - o_text)`` (see ``__call__``); all [B, Hkv, T, G, Dh]."""
    cfg = self.cfg
    gate = self._cls_gate()
    slot = jnp.argmax(cls_edges, axis=-1)  # [B, T]: the row's [CLS] key (if any)
    has_cls = jnp.any(cls_edges, axis=-1)[:, None, :, None]  # [B, 1, T, 1]
    s_cls = jnp.take_along_axis(scores, slot[:, None, :, None, None], axis=-1)[..., 0]
    # The [CLS] key's joint-softmax weight: e^s / (e^s + sum_text e^s_i).
    w = jnp.where(has_cls, jax.nn.sigmoid(s_cls - jax.nn.logsumexp(text_scores, axis=-1)), 0.)
    v_cls = jnp.take_along_axis(v, slot[:, None, :, None], axis=2)  # [B, Hkv, T, Dh]
    g = gate.astype(jnp.float32).reshape(cfg.n_kv_heads, -1)[None, :, None]  # [1, Hkv, 1, G]
    mix = (g * w).astype(o_text.dtype)[..., None]
    return o_text + mix * (v_cls[:, :, :, None].astype(o_text.dtype) - o_text)


class MLP(nn.Module):
  """SwiGLU feed-forward."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    gate = _dense(cfg, cfg.d_ff, ("embed", "mlp"), "gate_proj")(x)
    up = _dense(cfg, cfg.d_ff, ("embed", "mlp"), "up_proj")(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
    return _dense(cfg, cfg.d_model, ("mlp", "embed"), "down_proj")(h)


class Block(nn.Module):
  """Pre-norm decoder layer. Signature fits ``nn.scan``: carry (x, cache) and the layer index.

  Scanned, the cache (every layer's, or None) rides in the carry rather than being scanned
  over, so each step's new keys and values are written into it in place: scanning it as a
  per-layer input and output would rebuild the whole cache on every forward. Unrolled, the
  carry holds this layer's own cache buffers and ``layer`` is None.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, layer, positions, mask, write_index, cls_edges):
    x, cache = carry
    h, cache = Attention(self.cfg, name="attn")(
        RMSNorm(self.cfg, name="attn_norm")(x), positions, mask, cache, layer, write_index,
        cls_edges)
    x = x + h
    x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x))
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    return (x, cache), None


def _remat_policy(name: str):
  return {
      "full": None,
      "dots": jax.checkpoint_policies.save_from_both_policies(
          jax.checkpoint_policies.checkpoint_dots,
          jax.checkpoint_policies.save_only_these_names(attention_lib.SAVED)),
      "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  }[name]


class Transformer(nn.Module):
  """Decoder + [CLS] head.

  Call: ``(tokens [B, T] int, positions [B, T] int, mask [B, T, S] bool, cache=None,
  write_index=None [B, T] int, lm_rows=None)`` -> ``(lm_logits [B, T', V] f32, cls_logits
  [B, T, 2] f32, cache)``. ``S`` is ``T`` without a cache and the cache length with one.
  Without a cache ``mask`` may instead be a ``masks.MaskSpec`` (``positions`` then with the
  [CLS] rows placed, ``masks.structured_cls_positions``): ``cfg.attention`` computes it.
  ``cls_logits`` are computed at every position; only rows holding ``[CLS]`` are meaningful.
  ``lm_rows`` (a ``slice`` of query rows): compute ``lm_logits`` for those rows only (``T'``
  = their number), e.g. the decoder's token row but not its [CLS] row, or the prompt's last
  row at prefill; ``None``: all rows (``T' = T``).
  """

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = self.param("embed", _init(cfg, ("vocab", "embed")),
                            (cfg.vocab_size, cfg.d_model), cfg.weight_dtype)
    self.cls_embed = self.param("cls_embed", _init(cfg, ("embed",)), (cfg.d_model,),
                                cfg.weight_dtype)
    block = Block
    if cfg.remat != "none":
      block = nn.remat(block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.n_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    else:
      self.layers = [block(cfg, name=f"layer_{i}") for i in range(cfg.n_layers)]
    self.final_norm = RMSNorm(cfg, name="final_norm")
    if not cfg.tie_embeddings:
      self.lm_head = self.param("lm_head", _init(cfg, ("embed", "vocab")),
                                (cfg.d_model, cfg.vocab_size), cfg.weight_dtype)
    self.cls_head = nn.Dense(NUM_CLASSES, dtype=jnp.float32, param_dtype=cfg.weight_dtype,
                             kernel_init=_init(cfg, ("embed", "classes")),
                             bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                     ("classes",)),
                             name="cls_head")

  def embed_tokens(self, tokens: Array) -> Array:
    """[B, T] ids (``cls_id`` for [CLS]) -> [B, T, D] input embeddings."""
    cfg = self.cfg
    text = jnp.take(self.embed, jnp.clip(tokens, 0, cfg.vocab_size - 1), axis=0)
    x = jnp.where((tokens == cfg.cls_id)[..., None], self.cls_embed, text)
    return x.astype(cfg.compute_dtype)

  def __call__(self, tokens, positions, mask, cache: KVCache | None = None, write_index=None,
               lm_rows: slice | None = None, cls_keys=None):
    """``cls_keys`` [B, S] bool: which keys are [CLS] (only read with
    ``cfg.cls_attention_gate``; default without a cache: the [CLS] tokens themselves)."""
    chex.assert_rank([tokens, positions], 2)
    chex.assert_type([tokens, positions], int)
    chex.assert_equal_shape([tokens, positions])
    is_cls = tokens == self.cfg.cls_id
    if cls_keys is None and cache is None:
      cls_keys = is_cls
    return self.forward_embedded(self.embed_tokens(tokens), positions, mask, cache, write_index,
                                 lm_rows, cls_queries=is_cls, cls_keys=cls_keys)

  def forward_embedded(self, x, positions, mask, cache: KVCache | None = None,
                       write_index=None, lm_rows: slice | None = None, cls_queries=None,
                       cls_keys=None):
    """Same as ``__call__`` from input embeddings x [B, T, D] (for gradients w.r.t. inputs);
    with ``cfg.cls_attention_gate``, ``cls_queries`` [B, T] and ``cls_keys`` [B, S] bool
    say which rows and keys are [CLS]."""
    cfg = self.cfg
    chex.assert_rank([x, positions], [3, 2])
    chex.assert_type(positions, int)
    chex.assert_equal_shape_prefix([x, positions], 2)
    structured = isinstance(mask, masks.MaskSpec)
    if structured:
      chex.assert_equal_shape([positions, mask.roles])
      if cache is not None:
        raise ValueError("A MaskSpec describes a training forward: decode with a dense mask.")
      if cfg.attention == "dense":
        mask, structured = mask.dense(), False
    else:
      chex.assert_rank(mask, 3)
      chex.assert_type(mask, bool)
      chex.assert_equal_shape_prefix([mask, positions], 2)
    cls_edges = None
    if cfg.cls_attention_gate and not structured:
      if cls_queries is None or cls_keys is None:
        raise ValueError("model.cls_attention_gate needs cls_queries and cls_keys.")
      cls_edges = mask & cls_keys[:, None, :] & ~cls_queries[:, :, None]
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    if cfg.scan_layers:
      carry = (x, (cache.k, cache.v) if cache is not None else None)
      (x, new), _ = self.layers(carry, jnp.arange(cfg.n_layers), positions, mask, write_index,
                                cls_edges)
    else:
      new = []
      for i, layer in enumerate(self.layers):
        kv = (cache.k[i], cache.v[i]) if cache is not None else None
        (x, kv), _ = layer((x, kv), None, positions, mask, write_index, cls_edges)
        new.append(kv)
      new = tuple(zip(*new)) if cache is not None else None
    h = self.final_norm(x)
    head = self.embed.T if cfg.tie_embeddings else self.lm_head
    lm_h = h if lm_rows is None else h[:, lm_rows]
    lm_logits = jnp.einsum("btd,dv->btv", lm_h, head.astype(cfg.compute_dtype),
                           preferred_element_type=jnp.float32)
    lm_logits = nn.with_logical_constraint(lm_logits, ("act_batch", "act_length", "act_vocab"))
    cls_logits = self.cls_head(h.astype(jnp.float32))
    new_cache = KVCache(k=new[0], v=new[1]) if cache is not None else None
    return lm_logits, cls_logits, new_cache


def forward_batch(model: Transformer, params, batch, phase: str):
  """Training forward of a packed batch (``data/packing.py``) under ``phase``'s mask, by
  ``model.cfg.attention``: "dense" builds the [B, T, T] mask, the others a ``MaskSpec``.

  Returns (lm_logits [B, T, V], cls_logits [B, T, 2]).
  """
  spec = masks.MaskSpec.from_batch(batch, phase)
  chex.assert_equal_shape([batch["tokens"], spec.roles])
  if model.cfg.attention == "dense":
    mask = spec.dense()
    positions = masks.cls_positions(mask, spec.roles, spec.positions)
  else:
    mask = spec
    positions = masks.structured_cls_positions(spec, attention_lib.CLS_CHUNK)
  lm_logits, cls_logits, _ = model.apply({"params": params}, batch["tokens"], positions, mask)
  return lm_logits, cls_logits


def unroll_layers(cfg: ModelConfig, params) -> tuple[ModelConfig, Any]:
  """The same model with its layers unrolled: the config with ``scan_layers=False`` and the
  parameters with each layer's slice of the stacked ``layers`` as its own ``layer_{i}`` tree
  (unchanged if already unrolled). Decoding runs this way: in a scanned decode XLA:CPU copies
  each layer's weights out of the stacked arrays at every step, and an unrolled model also
  keeps one cache buffer per layer (``KVCache``)."""
  if not cfg.scan_layers:
    return cfg, params
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(cfg.n_layers):
    params[f"layer_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return dataclasses.replace(cfg, scan_layers=False), params


def init_params(cfg: ModelConfig, rng: Array, seq_len: int = 8) -> Any:
  """Boxed (logically partitioned) parameters of a fresh model."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  positions = jnp.arange(seq_len, dtype=jnp.int32)[None]
  mask = jnp.tril(jnp.ones((seq_len, seq_len), bool))[None]
  return Transformer(cfg).init(rng, tokens, positions, mask)["params"]


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


@functools.partial(jax.jit, static_argnums=(0, 3))
def plain_forward(cfg: ModelConfig, params, tokens: Array, layers: tuple[int, ...] = ()):
  """The plain causal forward of ``tokens`` [B, T] (text only, no [CLS]): (LM logits
  [B, T, V] float32, the outputs of blocks ``layers`` [len(layers), B, T, D]). With ``layers``
  no LM logits are computed ([B, 0, V]: at B x T rows they would dwarf the states). The one
  such forward: ``SafetyModel.lm_logits`` / ``hidden_states`` and the import parity checks
  read it."""
  if layers:  # block outputs are captured from unrolled layers
    cfg, params = unroll_layers(cfg, params)
  t = tokens.shape[1]
  positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (tokens.shape[0], t, t))
  (logits, _, _), state = Transformer(cfg).apply(
      {"params": params}, tokens, positions, mask, lm_rows=slice(0, 0) if layers else None,
      mutable=["intermediates"],
      capture_intermediates=lambda module, method: bool(layers) and isinstance(module, Block))
  if not layers:
    return logits, jnp.zeros((0,) + tokens.shape + (cfg.d_model,), cfg.compute_dtype)
  blocks = state["intermediates"]
  return logits, jnp.stack([blocks[f"layer_{i}"]["__call__"][0][0][0] for i in layers])
