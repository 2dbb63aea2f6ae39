"""The transformer with [CLS]: invariance of the text computation, scan/non-scan equivalence,
gradient routing of the two losses, and config validation."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import chat_segment, packed, tiny_model_config
from safety_align import losses
from safety_align.masks import Role
from safety_align.model import ModelConfig, Transformer, forward_batch, init_params


def _params(cfg, seed=0):
  return nn.meta.unbox(init_params(cfg, jax.random.key(seed)))


def _batch(segments, seq_len=32):
  return {k: jnp.asarray(v) for k, v in packed(segments, seq_len=seq_len).items()}


def _plain_logits(cfg, params, tokens):
  """The same model without [CLS]: causal attention over the text alone."""
  t = tokens.shape[1]
  logits, _, _ = Transformer(cfg).apply(
      {"params": params}, tokens, jnp.arange(t)[None], jnp.tril(jnp.ones((t, t), bool))[None])
  return np.asarray(logits[0])


def _without_cls(b):
  """The same packed layout with every [CLS] slot turned into padding."""
  is_cls = b["roles"] == Role.CLS
  out = dict(b)
  out["roles"] = jnp.where(is_cls, Role.PAD, b["roles"])
  out["segment_ids"] = jnp.where(is_cls, 0, b["segment_ids"])
  out["tokens"] = jnp.where(is_cls, 0, b["tokens"])
  return out


@pytest.mark.parametrize("phase", ["pretrain", "sft"])
@pytest.mark.parametrize("tied", [False, True])
def test_text_logits_unchanged_by_cls(phase, tied):
  cfg = tiny_model_config(tie_embeddings=tied)
  params = _params(cfg)
  b = _batch([chat_segment(windows=[(0, 1, 1)])])
  lm_logits, _ = forward_batch(Transformer(cfg), params, b, phase)
  lm_blind, _ = forward_batch(Transformer(cfg), params, _without_cls(b), phase)
  roles = np.asarray(b["roles"][0])
  text = np.nonzero((roles != Role.CLS) & (roles != Role.PAD))[0]
  ours = np.asarray(lm_logits[0, text])
  blind = np.asarray(lm_blind[0, text])
  # Against the model run on the text alone (other shapes, so XLA may sum in another order):
  # equal to float32 rounding, 1e-6 relative to the logits' magnitude.
  plain = _plain_logits(cfg, params, b["tokens"][:, text])
  response = roles[text] == Role.RESPONSE
  cls_blind = ~response if phase == "sft" else np.ones_like(response)
  # Same layout with the [CLS] slots padded: the CLS-blind tokens are bit-for-bit unchanged.
  np.testing.assert_array_equal(ours[cls_blind], blind[cls_blind])
  np.testing.assert_allclose(ours[cls_blind], plain[cls_blind], rtol=0,
                             atol=1e-6 * np.abs(plain).max())
  if phase == "sft":
    # The response tokens read [CLS] (the implicit path), so they do change.
    assert np.abs(ours[response] - blind[response]).max() > 1e-3


def _stack_layers(params, n_layers):
  layers = [params.pop(f"layer_{i}") for i in range(n_layers)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_and_loop_layer_stacks_agree(remat):
  cfg = tiny_model_config(remat=remat)
  params = _params(cfg)
  b = _batch([chat_segment(), chat_segment(label=0)])
  for phase in ("pretrain", "sft"):
    lm, cls = forward_batch(Transformer(cfg), params, b, phase)
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    scan_params = _stack_layers(dict(params), cfg.n_layers)
    lm_s, cls_s = forward_batch(Transformer(scan_cfg), scan_params, b, phase)
    np.testing.assert_allclose(lm_s, lm, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cls_s, cls, atol=1e-5, rtol=1e-5)


def test_scan_init_has_stacked_layers():
  cfg = tiny_model_config(scan_layers=True)
  shapes = jax.tree.map(lambda x: x.shape, _params(cfg))
  assert shapes["layers"]["attn"]["q_proj"]["kernel"] == (2, 32, 4, 8)
  assert "layer_0" not in shapes


def _loss_terms(cfg, params, batch, phase):
  lm_logits, cls_logits = forward_batch(Transformer(cfg), params, batch, phase)
  targets, weights = losses.lm_targets(batch["tokens"], batch["roles"], batch["segment_ids"],
                                       phase, batch["lm_mask"])
  l_lm, _ = losses.lm_loss(lm_logits, targets, weights)
  l_cls, _, _ = losses.cls_loss(cls_logits, batch["cls_labels"])
  return l_lm, l_cls


def test_pretrain_lm_loss_gives_no_gradient_to_cls_embedding_or_head(model_cfg):
  params = _params(model_cfg)
  b = _batch([chat_segment(), chat_segment(label=0)])
  grads = jax.grad(lambda p: _loss_terms(model_cfg, p, b, "pretrain")[0])(params)
  assert np.all(np.asarray(grads["cls_embed"]) == 0)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["cls_head"]))
  assert np.abs(np.asarray(grads["embed"])).max() > 0  # the LM loss does train the text


def test_sft_cls_loss_gives_no_gradient_to_response_embeddings(model_cfg):
  params = _params(model_cfg)
  b = _batch([chat_segment(), chat_segment(label=0)])
  model = Transformer(model_cfg)
  x = model.apply({"params": params}, b["tokens"], method=Transformer.embed_tokens)

  def cls_term(x):
    from safety_align import masks
    m = masks.attention_mask(b["roles"], b["segment_ids"], b["positions"], b["cls_window"],
                             "sft")
    pos = masks.cls_positions(m, b["roles"], b["positions"])
    _, cls_logits, _ = model.apply({"params": params}, x, pos, m,
                                   method=Transformer.forward_embedded)
    return losses.cls_loss(cls_logits, b["cls_labels"])[0]

  g = np.abs(np.asarray(jax.grad(cls_term)(x))).sum(-1)[0]
  roles = np.asarray(b["roles"][0])
  assert np.all(g[roles == Role.RESPONSE] == 0)
  assert np.all(g[(roles == Role.QUERY)] > 0)


def test_sft_lm_loss_ignores_query_and_template_predictions(model_cfg):
  b = _batch([chat_segment()])
  targets, weights = losses.lm_targets(b["tokens"], b["roles"], b["segment_ids"], "sft")
  roles = np.asarray(b["roles"][0])
  w = np.asarray(weights[0])
  # Counted predictions are exactly those whose target is a RESPONSE token.
  next_roles = np.append(roles[1:], Role.PAD)
  np.testing.assert_array_equal(w > 0, next_roles == Role.RESPONSE)
  logits = jax.random.normal(jax.random.key(1), (1, b["tokens"].shape[1], 64))
  base, _ = losses.lm_loss(logits, targets, weights)
  noisy = logits.at[0, np.nonzero(w == 0)[0]].add(100.0)
  np.testing.assert_allclose(losses.lm_loss(noisy, targets, weights)[0], base, rtol=1e-6)


def test_lm_loss_is_a_token_mean_under_packing(model_cfg):
  params = _params(model_cfg)
  one = _batch([chat_segment(response=(20, 21, 22, 23, 24, 25))], seq_len=48)
  two = _batch([chat_segment(response=(20, 21, 22, 23, 24, 25)),
                chat_segment(query=(13,), response=(26, 27))], seq_len=48)
  split = {k: jnp.asarray(np.stack([one[k][0], _batch([chat_segment(
      query=(13,), response=(26, 27))], seq_len=48)[k][0]])) for k in one}
  # Packing the two examples in one row or putting them in two rows gives the same loss.
  l_packed = _loss_terms(model_cfg, params, two, "sft")
  l_rows = _loss_terms(model_cfg, params, split, "sft")
  np.testing.assert_allclose(l_packed, l_rows, rtol=1e-5)


def test_untrained_response_tokens_are_not_targets():
  b = _batch([chat_segment(untrained=[(0, 3)])])
  _, weights = losses.lm_targets(b["tokens"], b["roles"], b["segment_ids"], "sft", b["lm_mask"])
  assert float(weights.sum()) == 0.0


@pytest.mark.parametrize("field,value,match", [
    ("n_heads", 5, "n_heads=5 does not divide model.d_model=32"),
    ("n_kv_heads", 3, "n_kv_heads=3 does not divide model.n_heads=4"),
    ("dtype", "float8", "model.dtype='float8'"),
    ("remat", "sometimes", "model.remat='sometimes'"),
    ("attention", "sparse", "model.attention='sparse'"),
])
def test_bad_config_values_name_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    tiny_model_config(**{field: value})


def test_attention_implementation_changes_no_parameter():
  """model.attention is how training computes the masks: the parameter tree and the
  architecture (what checkpoints are checked against) are the same for every choice."""
  base = tiny_model_config()
  shapes = lambda cfg: jax.tree.map(lambda x: x.shape, jax.eval_shape(lambda: _params(cfg)))
  for impl in ("blockwise", "flash"):
    cfg = tiny_model_config(attention=impl)
    assert cfg.architecture() == base.architecture()
    assert shapes(cfg) == shapes(base)


def test_unknown_model_field_is_named():
  with pytest.raises(ValueError, match=r"Unknown model config field\(s\) \['n_layer'\]"):
    ModelConfig.from_config(dict(vocab_size=8, d_model=8, n_layer=1, n_layers=1, n_heads=1,
                                 n_kv_heads=1, d_ff=8))


@pytest.mark.parametrize("tied", [False, True])
def test_lm_rows_limits_lm_logits_only(tied):
  """lm_rows=slice: lm_logits of those rows only, equal to the full call's; cls_logits and
  the cache unchanged (the decoder's steps use the first row, its prefill the last)."""
  from safety_align.model import KVCache  # pylint: disable=g-import-not-at-top
  cfg = tiny_model_config(tie_embeddings=tied)
  params = _params(cfg)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 6)), jnp.int32)
  tokens = tokens.at[:, -1].set(cfg.cls_id)
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  mask = jnp.broadcast_to(jnp.pad(jnp.tril(jnp.ones((6, 6), bool)), ((0, 0), (0, 4))),
                          (2, 6, 10))
  cache = KVCache.zeros(cfg, 2, 10)
  write = jnp.broadcast_to(jnp.arange(6), (2, 6))
  model = Transformer(cfg)
  lm, cls, kv = model.apply({"params": params}, tokens, positions, mask, cache, write)
  lm3, cls3, kv3 = model.apply({"params": params}, tokens, positions, mask, cache, write,
                               lm_rows=slice(0, 3))
  last, _, _ = model.apply({"params": params}, tokens, positions, mask, cache, write,
                           lm_rows=slice(-1, None))
  assert lm.shape[1] == 6 and lm3.shape[1] == 3 and last.shape[1] == 1
  np.testing.assert_allclose(np.asarray(lm3), np.asarray(lm[:, :3]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(last), np.asarray(lm[:, -1:]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cls3), np.asarray(cls))
  jax.tree.map(np.testing.assert_array_equal, kv3, kv)


def test_unrolled_model_and_per_layer_cache_match_scanned():
  """``unroll_layers`` gives the same logits, and per-layer cache buffers the same keys and
  values as the scanned model's stacked cache."""
  from safety_align.model import KVCache, unroll_layers  # pylint: disable=g-import-not-at-top
  cfg = tiny_model_config(scan_layers=True, n_layers=3)
  params = _params(cfg)
  flat_cfg, flat_params = unroll_layers(cfg, params)
  assert not flat_cfg.scan_layers and "layers" not in flat_params
  assert unroll_layers(flat_cfg, flat_params)[1] is flat_params  # already unrolled
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 5)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  mask = jnp.broadcast_to(jnp.pad(jnp.tril(jnp.ones((5, 5), bool)), ((0, 0), (0, 3))),
                          (2, 5, 8))
  write = jnp.broadcast_to(jnp.arange(5), (2, 5))
  stacked = KVCache.zeros(cfg, 2, 8)
  per_layer = KVCache.zeros(flat_cfg, 2, 8)
  assert stacked.k.shape == (3, 2, cfg.n_kv_heads, 8, cfg.dim_per_head)
  assert [k.shape for k in per_layer.k] == [(2, cfg.n_kv_heads, 8, cfg.dim_per_head)] * 3
  lm, cls, kv = Transformer(cfg).apply({"params": params}, tokens, positions, mask, stacked,
                                       write)
  lm_f, cls_f, kv_f = Transformer(flat_cfg).apply({"params": flat_params}, tokens, positions,
                                                  mask, per_layer, write)
  np.testing.assert_allclose(lm_f, lm, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(cls_f, cls, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.stack(kv_f.k), kv.k, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.stack(kv_f.v), kv.v, atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(kv.k)[:, :, :, :5]).min() > 0  # written
  assert np.all(np.asarray(kv.k)[:, :, :, 5:] == 0)  # untouched


def _with_gate(params, value):
  """Unrolled params with every layer's [CLS] attention gate set to ``value``."""
  out = dict(params)
  for name, layer in params.items():
    if name.startswith("layer_"):
      attn = dict(layer["attn"], cls_gate=jnp.full_like(layer["attn"]["cls_gate"], value))
      out[name] = dict(layer, attn=attn)
  return out


def test_cls_attention_gate_closed_is_blind_and_open_is_ordinary_attention():
  gated = tiny_model_config(cls_attention_gate=True)
  params = _params(gated)
  assert all(np.all(params[f"layer_{i}"]["attn"]["cls_gate"] == 0) for i in range(2))
  b = _batch([chat_segment(windows=[(0, 1, 1)]), chat_segment(label=0)])
  roles = np.asarray(b["roles"][0])
  text = (roles != Role.CLS) & (roles != Role.PAD)
  closed, cls_closed = forward_batch(Transformer(gated), params, b, "sft")
  blind, _ = forward_batch(Transformer(gated), params, _without_cls(b), "sft")
  # Closed (the import's init): no text row reads [CLS], the response rows included.
  np.testing.assert_array_equal(np.asarray(closed[0])[text], np.asarray(blind[0])[text])
  # Open: ordinary joint attention, as the ungated model computes it with the same weights.
  plain_params = {k: ({**v, "attn": {n: w for n, w in v["attn"].items() if n != "cls_gate"}}
                      if k.startswith("layer_") else v) for k, v in params.items()}
  opened, cls_open = forward_batch(Transformer(gated), _with_gate(params, 1.0), b, "sft")
  ref, cls_ref = forward_batch(Transformer(tiny_model_config()), plain_params, b, "sft")
  scale = np.abs(np.asarray(ref)).max()
  np.testing.assert_allclose(np.asarray(opened), np.asarray(ref), rtol=0, atol=1e-5 * scale)
  response = roles == Role.RESPONSE
  assert np.abs(np.asarray(opened[0])[response] - np.asarray(closed[0])[response]).max() > 1e-3
  # Main [CLS] rows (they read only the query) are never gated: the gate does not move them.
  window = np.asarray(b["cls_window"][0])
  is_cls = (roles == Role.CLS) & (window[:, 0] > window[:, 1])
  np.testing.assert_allclose(np.asarray(cls_closed[0])[is_cls], np.asarray(cls_open[0])[is_cls],
                             rtol=0, atol=1e-5)
  # The gate gets a gradient from the LM loss at zero (it can open).
  def lm_loss(p):
    logits, _ = forward_batch(Transformer(gated), p, b, "sft")
    return jnp.sum(jnp.where(jnp.asarray(response)[None, :, None], logits, 0.) ** 2)
  grad = jax.grad(lm_loss)(params)
  assert np.abs(np.asarray(grad["layer_0"]["attn"]["cls_gate"])).max() > 0
