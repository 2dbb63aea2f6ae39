"""The model's logical sharding constraints reach XLA (8 fake CPU devices), and remat saves no
attention score block: what the compiled train step holds follows the mesh and T."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import chat_segment, packed, tiny_model_config
from safety_align import attention, model as model_lib, sharding, train_step as step_lib
from safety_align.masks import Role

from configs import tiny

# Shardy's op: `sdy.sharding_constraint %x <@mesh, [{"data", "fsdp"}, {}]> : tensor<8x16xf32>`
_CONSTRAINT = re.compile(
    r"sdy\.sharding_constraint %\S+ <@mesh, \[(.*)\]> : tensor<([0-9x]+)x[a-z]+[0-9]*>")
BATCH = '{"data", "fsdp"}'


def _constraints(text: str) -> dict[tuple[int, ...], set[str]]:
  """{shape: the per-dimension mesh axes it is constrained to} over a lowered program."""
  out = {}
  for axes, shape in _CONSTRAINT.findall(text):
    out.setdefault(tuple(int(n) for n in shape.split("x")), set()).add(axes)
  return out


def _cfg(**overrides):
  return tiny_model_config(vocab_size=160, d_model=64, d_ff=128, **overrides)


def _phase():
  return tiny.get_config("smoke").sft


def _mesh():
  return sharding.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices())


def test_train_step_constrains_every_activation():
  """Under ``Trainer``'s context each logical activation constraint is in the lowered step,
  rows over (data, fsdp) and heads / MLP / vocabulary over tensor (under a bare ``with mesh:``
  flax finds no abstract mesh on JAX 0.10 and drops them all)."""
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  trainer = step_lib.Trainer(_cfg(), _phase(), "sft", _mesh())
  found = _constraints(trainer.lower(8, 32).as_text())
  assert found.get((8, 32, 64)) == {f"{BATCH}, {{}}, {{}}"}, found          # residual stream
  assert found.get((8, 32, 4, 16)) == {f'{BATCH}, {{}}, {{"tensor"}}, {{}}'}, found  # q
  assert found.get((8, 32, 128)) == {f'{BATCH}, {{}}, {{"tensor"}}'}, found  # SwiGLU
  assert found.get((8, 32, 160)) == {f'{BATCH}, {{}}, {{"tensor"}}'}, found  # LM logits


def test_init_constrains_multi_axis_kernels_in_their_own_shape():
  """Initialised under the mesh, the 3-axis attention kernels and 2-axis biases are created
  and constrained in their full shapes, and the sharded init equals the unsharded one."""
  cfg = _cfg(qkv_bias=True)
  with step_lib.mesh_context(_mesh()):
    found = _constraints(jax.jit(lambda r: nn.meta.unbox(model_lib.init_params(cfg, r)))
                         .lower(jax.random.key(0)).as_text())
  assert found[(64, 4, 16)] == {'{"fsdp"}, {"tensor"}, {}'}  # q_proj kernel [D, H, Dh]
  assert found[(4, 16, 64)] == {'{"tensor"}, {}, {"fsdp"}'}  # o_proj kernel [H, Dh, D]
  assert found[(4, 16)] == {'{"tensor"}, {}'}  # q_proj bias [H, Dh]
  state = step_lib.Trainer(cfg, _phase(), "sft", _mesh()).init_state(jax.random.key(0))
  plain = jax.jit(lambda r: nn.meta.unbox(model_lib.init_params(cfg, r)))(jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, state.params, plain)
  bias = state.params["layer_0"]["attn"]["k_proj"]["bias"]  # [Hkv, Dh] over tensor
  assert bias.shape == (2, 16) and bias.addressable_shards[0].data.shape == (1, 16)


def _batch(t):
  segments = [chat_segment(query=tuple(range(10, 10 + t // 8)),
                           response=tuple(range(20, 20 + t // 4)), windows=[(0, 3, 0)])
              for _ in range(2)]
  return {k: jnp.asarray(v) for k, v in packed(segments, seq_len=t).items()}


def _grad(cfg, batch):
  """The jitted gradient of a loss over the non-PAD rows of ``batch``."""
  keep = (batch["roles"] != Role.PAD)[..., None]

  def loss(params):
    lm, cls = model_lib.forward_batch(model_lib.Transformer(cfg), params, batch, "sft")
    return jnp.sum(jnp.where(keep, lm, 0.) ** 2) * 1e-3 + jnp.sum(jnp.where(keep, cls, 0.) ** 2)
  return jax.jit(jax.grad(loss))


@pytest.fixture
def small_blocks(monkeypatch):
  monkeypatch.setattr(attention, "BLOCK", 32)
  monkeypatch.setattr(attention, "CLS_CHUNK", 8)


@pytest.mark.usefixtures("small_blocks")
def test_remat_dots_saves_no_blockwise_score_block():
  """``remat="dots"`` saves every dot, and a nested ``jax.checkpoint``'s own policy does not
  apply under it: blockwise attention's backward recomputes its blocks instead, so the
  gradient's temporaries grow with T, not T^2 (dense: T^2; without the recompute blockwise
  grew ~11x here), and the gradient is dense attention's."""
  cfg = _cfg(n_layers=1, scan_layers=True, remat="dots")
  params = nn.meta.unbox(model_lib.init_params(cfg, jax.random.key(0)))
  short = _batch(128)

  def compiled(impl, batch):
    return _grad(dataclasses.replace(cfg, attention=impl), batch).lower(params).compile()

  step = {impl: compiled(impl, short) for impl in ("dense", "blockwise")}
  growth = {impl: compiled(impl, _batch(512)).memory_analysis().temp_size_in_bytes
            / step[impl].memory_analysis().temp_size_in_bytes for impl in step}
  assert growth["dense"] > 8, growth
  assert growth["blockwise"] < 5, growth
  want, got = step["dense"](params), step["blockwise"](params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(np.asarray(w)).max())
