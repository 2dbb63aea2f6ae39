"""Sharded training on 8 fake CPU devices: same losses as one device, parameters really split."""

import jax
import numpy as np
import pytest

from conftest import chat_segment, packed, tiny_model_config
from safety_align import sharding, train_step as step_lib

from configs import tiny


def _phase_cfg():
  cfg = tiny.phase_config(steps=3, batch_size=8, cls_weight=0.1, lr=1e-2, split="sft")
  cfg.warmup_steps = 1
  return cfg


def _batches(n):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    segs = [chat_segment(query=tuple(rng.integers(6, 60, 3)), response=tuple(rng.integers(6, 60, 5)),
                         label=int(rng.integers(0, 2))) for _ in range(8)]
    out.append(packed(segs, seq_len=16, batch=8))
  return out


def _losses(mesh_sizes, devices):
  mesh = sharding.make_mesh(mesh_sizes, devices)
  trainer = step_lib.Trainer(tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128),
                             _phase_cfg(), "sft", mesh)
  state = trainer.init_state(jax.random.key(0))
  out = []
  for b in _batches(3):
    state, metrics = trainer.step(state, b)
    out.append(float(metrics["loss"]))
  return out, state


def test_mesh_2x2x2_matches_single_device():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  single, _ = _losses(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  sharded, state = _losses(dict(data=2, fsdp=2, tensor=2), jax.devices())
  np.testing.assert_allclose(sharded, single, rtol=1e-5)
  # Parameters are really split: embed [V, D] as (tensor, fsdp), q_proj [D, H, Dh] as
  # (fsdp, tensor, -), and AdamW's moments like their parameters.
  embed = state.params["embed"]
  assert embed.shape == (64, 64) and embed.addressable_shards[0].data.shape == (32, 32)
  q = state.params["layer_0"]["attn"]["q_proj"]["kernel"]  # [D, H, Dh]
  assert q.addressable_shards[0].data.shape == (32, 2, 16)
  mu = state.opt_state[1][0].mu["embed"]
  assert mu.addressable_shards[0].data.shape == (32, 32)


@pytest.mark.parametrize("sizes,match", [
    (dict(data=-1, fsdp=-1, tensor=1), "at most one axis may be -1"),
    (dict(data=3, fsdp=1, tensor=1), "does not divide 8 devices"),
    (dict(data=2, fsdp=2, tensor=1), "uses 4 devices, but 8 are available"),
])
def test_bad_mesh_is_a_clear_error(sizes, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(sizes, 8)


def test_minus_one_takes_the_rest():
  assert sharding.mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
