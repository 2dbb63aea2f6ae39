"""Where our decode step and train step spend their time (``python -m bench.profile``).

Not part of results.json: a diagnostic for choosing optimisations. Prints, per model and
batch, the compiled step's XLA cost analysis and timings of the step and of its parts
(each part jitted on its own, best of N), and the optimized HLO's ops inside the decode loop.
"""

from __future__ import annotations

import collections
import functools
import re
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from bench import common, decode, models, train
from safety_align import masks
from safety_align.decode import decoder as dec
from safety_align.decode.cache import DecodeState, response_mask, window_mask
from safety_align.model import KVCache, Transformer, unroll_layers

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small model only.")
flags.DEFINE_bool("train_only", False, "Only the train-step profile.")


def best(fn, reps=5):
  fn()
  t = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    t = min(t, time.perf_counter() - t0)
  return t


def cost(jitted, *args):
  c = jitted.lower(*args).compile().cost_analysis()
  c = c[0] if isinstance(c, list) else c
  return {k: float(c.get(k, 0.0)) for k in ("flops", "bytes accessed")}


def fake_cache(cfg, b, s, prompt):
  """A ``DecodeState`` with ``prompt`` + a few response keys written (roles, positions)."""
  roles = np.zeros((b, s), np.int32)
  roles[:, 2:2 + prompt] = masks.Role.QUERY
  roles[:, 2 + prompt:2 + prompt + 16] = masks.Role.RESPONSE
  roles[:, 0] = masks.Role.CLS
  pos = np.maximum(np.arange(s)[None] - 2, 0).repeat(b, 0).astype(np.int32)
  keys = iter(jax.random.split(jax.random.key(1), 2 * cfg.n_layers))
  layers = lambda: tuple(jax.random.normal(next(keys), (b, cfg.n_kv_heads, s, cfg.dim_per_head))
                         * 0.1 for _ in range(cfg.n_layers))
  kv = KVCache(k=layers(), v=layers())  # per-layer buffers: the decoder's unrolled layout
  return DecodeState(kv=kv, roles=jnp.asarray(roles), positions=jnp.asarray(pos))


def decode_profile(name, cfg, params, b, new_tokens=128, prompt=32):
  w = decode.random_workload(name, cfg, params, b, prompt)
  cfg, params = unroll_layers(cfg, params)  # as the decoder runs
  s = 2 + prompt + new_tokens
  cache = fake_cache(cfg, b, s, prompt)
  token = jnp.full((b,), 5, jnp.int32)
  q_pos = jnp.full((b,), prompt + 16, jnp.int32)
  slot = 2 + prompt + 16
  step = jax.jit(functools.partial(dec._token_step, cfg), donate_argnums=())  # pylint: disable=protected-access
  due = jnp.ones((b,), bool)
  lo, hi = q_pos - 10, q_pos - 1
  cls_step = jax.jit(lambda p, c, t, q: dec._token_cls_step(  # pylint: disable=protected-access
      cfg, p, c, t, q, jnp.full((b,), slot), due, jnp.zeros((b,), bool), lo, hi))
  head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  h = jnp.ones((b, 1, cfg.d_model))
  lm_head = jax.jit(lambda h, w: jnp.einsum("btd,dv->btv", h, w))
  mask_fn = jax.jit(response_mask)
  win_fn = jax.jit(lambda c: window_mask(c, jnp.zeros((b,), bool), lo, hi,
                                         jnp.zeros((b,), jnp.int32)))
  # Attention alone (all layers), as the model computes it: [B,1,S] scores, mask, softmax.
  g = cfg.n_heads // cfg.n_kv_heads
  q = jnp.ones((b, cfg.n_kv_heads, g, cfg.dim_per_head))  # [B, Hkv, T*G, Dh], T = 1
  mask = response_mask(cache, q_pos)[:, None]

  def attn(q, ks, vs, m):
    def one(k, v):  # k, v [B, Hkv, S, Dh]
      sc = jnp.einsum("bkqd,bksd->bkqs", q, k) / 8.0
      sc = jnp.where(m[:, None], sc, -jnp.inf)
      return jnp.einsum("bkqs,bksd->bkqd", jax.nn.softmax(sc, -1), v)
    return [one(k, v) for k, v in zip(ks, vs)]
  attn_fn = jax.jit(attn)
  # Cache write as the model does it (scatter into [B, S] rows), all layers.
  rows = jnp.arange(b)[:, None]
  wi = jnp.full((b, 1), slot)
  newk = jnp.ones((b, 1, cfg.n_kv_heads, cfg.dim_per_head))

  def write(ck, k):  # ck: per-layer [B, Hkv, S, Dh]; k [B, T, Hkv, Dh]
    return tuple(c.at[rows, :, wi].set(k) for c in ck)
  write_fn = jax.jit(write, donate_argnums=0)
  holder = {"ck": tuple(jnp.array(c) for c in cache.kv.k)}

  def do_write():
    holder["ck"] = write_fn(holder["ck"], newk)
    return holder["ck"]

  slots = jnp.full((b,), slot)
  t_step = best(lambda: step(params, cache, token, q_pos, slots))
  t_cls = best(lambda: cls_step(params, cache, token, q_pos))
  parts = dict(
      lm_head=best(lambda: lm_head(h, head)),
      attention_all_layers=best(lambda: attn_fn(q, cache.kv.k, cache.kv.v, mask)),
      response_mask=best(lambda: mask_fn(cache, q_pos)),
      window_mask=best(lambda: win_fn(cache)),
      cache_write_all_layers=best(do_write))
  # The real loop: per-step time of the whole decode (prompt pass amortised).
  off = decode.ours(w, "off", new_tokens)
  t_loop = best(off, reps=2) / new_tokens
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  c = cost(step, params, cache, token, q_pos, slots)
  print(f"\n== decode step: {name}, batch {b}, cache {s} slots ==")
  print(f"  isolated token step      {t_step * 1e3:8.2f} ms   (XLA: {c['flops'] / 1e9:.3f} "
        f"GFLOP, {c['bytes accessed'] / 1e6:.0f} MB accessed; weights {weight_bytes / 1e6:.0f} "
        f"MB -> {weight_bytes / t_step / 1e9:.1f} GB/s)")
  print(f"  token + [CLS] row step   {t_cls * 1e3:8.2f} ms   (+{(t_cls / t_step - 1) * 100:.0f}%)")
  print(f"  in the while loop        {t_loop * 1e3:8.2f} ms / token (gate off, incl. prompt pass)")
  for k, v in parts.items():
    print(f"    {k:24s} {v * 1e3:8.3f} ms  ({v / t_step * 100:5.1f}% of the step)")
  return dict(step=t_step, cls_step=t_cls, loop=t_loop, parts=parts, cost=c)


def loop_hlo_ops(cfg, params, b):
  """Op histogram of the optimized decode program (whole module), large copies listed."""
  w = decode.random_workload("x", cfg, params, b, 32)
  from safety_align.decode.gate import GateConfig  # pylint: disable=g-import-not-at-top
  spec, inputs = decode.Decoder(cfg).prepare(
      w.prompts, max_new_tokens=128, gate=GateConfig(schedule="annealing"),
      refusal_ids=[5], newline_ids=[4])
  text = dec._decode.lower(spec, params, inputs).compile().as_text()  # pylint: disable=protected-access
  ops = collections.Counter(re.findall(r"= \S+ (\w[\w-]*)\(", text))
  copies = re.findall(r"(f32\[[\d,]+\][^ ]*) copy\(", text)
  big = [c for c in copies if np.prod([int(x) for x in re.findall(r"\d+", c.split("]")[0])]) >= 1e5]
  print(f"\n== optimized decode HLO (annealing, batch {b}) ==")
  print("  ops:", ", ".join(f"{k} {v}" for k, v in ops.most_common(14)))
  print(f"  large copies ({len(big)}):", big[:8])


def train_profile(cfg, params, batch, seq):
  data = train.make_batch(cfg, batch, seq)
  run, c = train.ours_step(cfg, params, data)
  t_step = best(run, reps=3)
  from safety_align.model import forward_batch  # pylint: disable=g-import-not-at-top
  model = Transformer(cfg)
  jb = {k: jnp.asarray(v) for k, v in data.items()}
  fwd = jax.jit(lambda p, b: forward_batch(model, p, b, "pretrain"))
  from safety_align import losses  # pylint: disable=g-import-not-at-top

  def loss(p, b):
    lm, cl = forward_batch(model, p, b, "pretrain")
    return losses.total_loss(lm, cl, b, "pretrain", 0.1)[0]
  grad = jax.jit(jax.grad(loss))
  mask_fn = jax.jit(lambda b: masks.attention_mask(b["roles"], b["segment_ids"],
                                                   b["positions"], b["cls_window"], "pretrain"))
  t_fwd = best(lambda: fwd(params, jb), reps=3)
  t_grad = best(lambda: grad(params, jb), reps=3)
  t_mask = best(lambda: mask_fn(jb), reps=3)
  h = jnp.ones((batch, seq, cfg.d_model))
  head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]

  def head_loss(h, w):
    lg = jnp.einsum("btd,dv->btv", h, w)
    return jnp.mean(jax.nn.log_softmax(lg, -1)[..., 0])
  head_fn = jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1)))
  t_head = best(lambda: head_fn(h, head), reps=3)
  n_mm = train.matmul_params(cfg, params)
  flops = train.model_flops(cfg, n_mm, batch, seq)
  print(f"\n== train step: {batch} x {seq}, {n_mm / 1e6:.0f}M matmul params ==")
  print(f"  full step (fwd+bwd+AdamW) {t_step:7.3f} s  ({flops / t_step / 1e9:.1f} model "
        f"GFLOP/s; XLA {c.get('flops', 0) / 1e9:.0f} GFLOP vs model {flops / 1e9:.0f} GFLOP)")
  print(f"  forward only              {t_fwd:7.3f} s")
  print(f"  forward + backward        {t_grad:7.3f} s  (optimizer+clip ~{t_step - t_grad:.3f} s)")
  print(f"  LM head + log-softmax f+b {t_head:7.3f} s  ({t_head / t_grad * 100:.0f}% of f+b)")
  print(f"  mask construction         {t_mask:7.4f} s")
  return dict(step=t_step, fwd=t_fwd, grad=t_grad, head=t_head, mask=t_mask, cost=c)


def main(argv):
  del argv
  print(f"device {common.device_name()}, {common.n_threads()} threads")
  cfg = models.quick_config() if FLAGS.quick else models.m100_config()
  params = models.random_params(cfg)
  demo_cfg = models.tiny_config()
  demo_params = models.random_params(demo_cfg)
  if not FLAGS.train_only:
    for b in (1, 16):
      decode_profile("demo", demo_cfg, demo_params, b)
      decode_profile("m100", cfg, params, b)
    loop_hlo_ops(cfg, params, 16)
  train_profile(cfg, params, 2, 128)
  peak = train.matmul_peak(3)
  print(f"\nmatmul peak: jax {peak['jax'] / 1e9:.1f} GFLOP/s, torch {peak['torch'] / 1e9:.1f}")


if __name__ == "__main__":
  app.run(main)
