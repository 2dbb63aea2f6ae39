"""Training step by attention implementation (``model.attention``): compiled memory against
the sequence length at a fixed number of tokens, and step time, blockwise vs dense."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from bench import common
from safety_align import sharding
from safety_align.data.packing import build_segment, pack
from safety_align.masks import Role
from safety_align.model import ModelConfig
from safety_align.tools import memory_estimate as memory
from safety_align.train_step import Trainer

PHASE = "sft"
ATTENTIONS = ("dense", "blockwise")


def unsupported(name: str) -> str | None:
  """Why this checkout's ModelConfig cannot run ``attention=name`` (None if it can)."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  if "attention" not in fields:
    return "ModelConfig has no attention field (dense attention only)"
  try:
    ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, d_ff=8,
                attention=name)
  except ValueError as e:
    return str(e)
  return None


def _trainer(cfg: ModelConfig, attention: str, batch: int) -> Trainer:
  from bench.train import phase_config  # pylint: disable=g-import-not-at-top
  if attention != "dense":
    cfg = dataclasses.replace(cfg, attention=attention)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  return Trainer(cfg, phase_config(batch), PHASE, mesh)


def memory_vs_seq(cfg: ModelConfig, *, tokens: int, seq_lens, attentions) -> dict:
  """Compiled per-step memory (``memory.step_memory``, bytes) of each attention at each length,
  ``tokens // T`` rows of ``T``: ``{attention: {T: Compiled.to_json()}}``. Compiled only."""
  out = {}
  for attention in attentions:
    out[attention] = {}
    for t in seq_lens:
      if tokens % t:
        raise ValueError(f"tokens={tokens} is not a multiple of seq_len={t}.")
      out[attention][t] = memory.step_memory(_trainer(cfg, attention, tokens // t), tokens // t,
                                          t).to_json()
  return out


def sft_rows(cfg: ModelConfig, batch: int, seq_len: int, segment_len: int = 256,
             seed: int = 0) -> dict:
  """Packed SFT rows: ``[CLS] <s> query response`` examples of ``segment_len`` tokens, as
  many as fill each row (the [CLS] masks' structure at a realistic density)."""
  rng = np.random.default_rng(seed)
  n_query = segment_len // 4
  segs = []
  for i in range(batch * (seq_len // segment_len)):
    ids = rng.integers(3, cfg.vocab_size, segment_len - 2)
    segs.append(build_segment(cfg.cls_id, [([1], Role.BOS), (ids[:n_query].tolist(), Role.QUERY),
                                           (ids[n_query:].tolist(), Role.RESPONSE)],
                              label=i % 2))
  return pack(segs, batch, seq_len)


def step_times(cfg: ModelConfig, params, *, batch: int, seq_len: int, reps: int,
               attentions) -> dict:
  """Best-of-``reps`` step time (s) per attention, interleaved, on the same packed SFT rows
  and parameters, plus the first step's loss of each (the same model: they must agree)."""
  data = sft_rows(cfg, batch, seq_len)
  fns, losses, holders = {}, {}, {}
  for attention in attentions:
    trainer = _trainer(cfg, attention, batch)
    holders[attention] = {"state": trainer.init_state(jax.random.key(0),
                                                      jax.tree.map(np.asarray, params))}

    def run(trainer=trainer, holder=holders[attention]):
      holder["state"], metrics = trainer.step(holder["state"], data)
      jax.block_until_ready(metrics)
      return metrics
    losses[attention] = float(run()["loss"])  # compiles; the first step's loss
    fns[attention] = run
  samples = {}
  times = common.interleaved(fns, reps, warmup=0, samples=samples)
  return dict(step_s=times, first_step_loss=losses,
              paired_dense_over_blockwise=(common.paired_ratio(samples["dense"],
                                                               samples["blockwise"])
                                           if {"dense", "blockwise"} <= set(samples) else None))
