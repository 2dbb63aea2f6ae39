"""Sharded decoding on the 8 fake CPU devices (data=2 x tensor=4): the same tokens and
signals as one device, gate on and off; weights and KV cache really split, and no weight
matrix gathered whole onto a device."""

import dataclasses
import json
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_model_config, tiny_params, tiny_tokenizer
from safety_align import api, checkpoint, sharding, workdir
from safety_align.data import chat_templates
from safety_align.decode import Decoder, GateConfig, Prompts
from safety_align.masks import Role
from safety_align.model import init_params, unroll_layers

CFG = tiny_model_config(n_kv_heads=4)  # 4 heads and 4 KV heads: one of each per tensor shard
REFUSAL, NEWLINE = [40, 41, 42], [6]
QUERIES = [(10, 11, 12), (13, 14, 15, 16, 17), (20, 21), (30, 31, 32, 33)]


def _pieces(query):
  return [([1], Role.BOS), ([3, 4], Role.TEMPLATE), (list(query), Role.QUERY),
          ([5], Role.TEMPLATE)]


@pytest.fixture(scope="module")
def setup():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=4))
  params = tiny_params(CFG)
  placed = jax.device_put(params, sharding.param_shardings(CFG, mesh, params))
  return mesh, params, placed


def _spy_hlo(decoder, texts):
  """Record the compiled HLO text of each sharded decode program ``decoder`` runs."""
  build = decoder._sharded_decode  # pylint: disable=protected-access

  def spy(*args):
    run, shardings = build(*args)

    def recorded(*args):
      texts.append(run.lower(*args).compile().as_text())
      return run(*args)
    return recorded, shardings
  decoder._sharded_decode = spy  # pylint: disable=protected-access


def _whole_weight_gathers(hlo: str, params, shardings) -> list[str]:
  """All-gathers whose result has the shape, or the size, of a whole split weight."""
  sizes = {(tuple(p.shape), p.size) for p, s in zip(jax.tree.leaves(params),
                                                     jax.tree.leaves(shardings))
           if not s.is_fully_replicated}
  found = []
  for dims in re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} all-gather\(", hlo):
    shape = tuple(int(d) for d in dims.split(",") if d)
    if any(shape == w or np.prod(shape) == n for w, n in sizes):
      found.append(shape)
  return found


@pytest.mark.parametrize("schedule,queries", [("annealing", QUERIES), ("off", QUERIES[:1])])
def test_sharded_decode_matches_one_device(setup, schedule, queries):
  """Annealing with 4 rows (rows over ``data``): refusals at the first classification and
  after a mid-response re-evaluation fire. Gate off with 1 row: rows replicated."""
  mesh, params, placed = setup
  gate = GateConfig(schedule=schedule)
  kw = dict(max_new_tokens=12, gate=gate, refusal_ids=REFUSAL, newline_ids=NEWLINE)
  prompts = Prompts.from_pieces([_pieces(q) for q in queries])
  single = Decoder(CFG)(params, prompts, **kw)
  decoder, hlo = Decoder(CFG, mesh=mesh), []
  _spy_hlo(decoder, hlo)
  out = decoder(placed, prompts, **kw)
  np.testing.assert_array_equal(out.tokens, single.tokens)
  np.testing.assert_array_equal(out.lengths, single.lengths)
  np.testing.assert_array_equal(out.refusal_step, single.refusal_step)
  np.testing.assert_array_equal(out.cls_steps, single.cls_steps)
  np.testing.assert_allclose(out.cls_probs, single.cls_probs, atol=1e-5)
  if schedule == "annealing":
    assert 0 in single.refusal_step and (single.refusal_step > 0).any()
    assert (single.n_evals > 1).all()
  shardings = sharding.param_shardings(CFG, mesh, params)
  assert _whole_weight_gathers(hlo[0], params, shardings) == []
  # One layer's cache buffer [B, Hkv, S, Dh] per device: KV heads over tensor (4 -> 1), rows
  # over data when the batch bucket divides (4 -> 2; a batch of 1 stays whole).
  rows = len(queries) // 2 if len(queries) % 2 == 0 else len(queries)
  assert re.search(r"f32\[%d,1,\d+,%d\]" % (rows, CFG.dim_per_head), hlo[0])


def test_gather_check_can_fail(setup):
  """The HLO check finds a weight gathered whole: the MLP kernel returned replicated."""
  mesh, params, placed = setup
  shardings = sharding.param_shardings(CFG, mesh, params)
  kernel = placed["layer_0"]["mlp"]["gate_proj"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (CFG.d_model, CFG.d_ff // 4)
  gather = jax.jit(lambda w: w * 2, out_shardings=sharding.replicated(mesh))
  hlo = gather.lower(kernel).compile().as_text()
  assert _whole_weight_gathers(hlo, params, shardings) == [(CFG.d_model, CFG.d_ff)]


def test_fitted_rules_and_unrolled_shardings(setup):
  mesh, _, _ = setup
  odd = tiny_model_config(n_kv_heads=2)  # 2 KV heads over tensor=4: kept whole
  rules = dict(sharding.fitted_rules(odd, mesh, batch=1))
  assert rules["kv_heads"] is None and rules["heads"] == ("tensor",)
  assert rules["act_batch"] is None  # 1 row over data=2
  assert dict(sharding.fitted_rules(odd, mesh, batch=4))["act_batch"] == ("data", "fsdp")
  wide = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  assert dict(sharding.fitted_rules(odd, wide, batch=2))["act_batch"] == ("data",)
  layout = sharding.DecodeLayout.of(odd, mesh, 4)
  assert layout.kv.spec == P(("data", "fsdp"), None) and layout.rows.spec == P(("data", "fsdp"))
  # A scanned stack's sharding, less its ``layers`` axis, is each unrolled layer's.
  scanned = tiny_model_config(n_kv_heads=4, scan_layers=True)
  stacked = jax.eval_shape(lambda: nn.meta.unbox(init_params(scanned, jax.random.key(0))))
  unrolled_cfg = dataclasses.replace(scanned, scan_layers=False)
  unrolled = jax.eval_shape(lambda: unroll_layers(
      scanned, nn.meta.unbox(init_params(scanned, jax.random.key(0))))[1])
  by_stack = sharding.param_shardings(scanned, mesh, stacked)["layers"]
  by_layer = sharding.param_shardings(unrolled_cfg, mesh, unrolled)
  for i in range(scanned.n_layers):
    jax.tree.map(lambda s, u: _assert_spec(s.spec[1:], u.spec), by_stack, by_layer[f"layer_{i}"])


def _assert_spec(stacked, unrolled):
  assert tuple(stacked) == tuple(unrolled)


def test_restore_onto_the_mesh(setup, tmp_path):
  """``load_for_inference(mesh=...)`` restores every parameter straight onto its
  ``param_shardings`` placement (not onto one device), equal to the unsharded load."""
  mesh = setup[0]
  cfg = tiny_model_config(n_kv_heads=4, scan_layers=True)
  (tmp_path / "config.json").write_text(json.dumps(dict(model=dataclasses.asdict(cfg))))
  params = tiny_params(cfg, 2)
  checkpoint.save_params(str(tmp_path), "sft", params, dict(step=0, phase="sft"))
  whole = workdir.load_for_inference(str(tmp_path), "sft").params
  split = workdir.load_for_inference(str(tmp_path), "sft", mesh=mesh).params
  want = sharding.param_shardings(cfg, mesh, params)
  jax.tree.map(lambda x, s: _assert_placed(x, s), split, want)
  kernel = split["layers"]["mlp"]["down_proj"]["kernel"]  # [layers, d_ff, d_model]
  assert kernel.addressable_shards[0].data.shape == (cfg.n_layers, cfg.d_ff // 4, cfg.d_model)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               split, whole)
  assert jax.tree.map(lambda x: x.dtype, split) == jax.tree.map(lambda x: x.dtype, whole)


def _assert_placed(x, want):
  assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)


def test_load_on_a_mesh(tmp_path, monkeypatch):
  """``sa.load(path, mesh=...)`` of a scanned model's workdir: weights restored onto the mesh,
  unrolled and split at load, the same classifications and generations as on one device."""
  template = chat_templates.get_template("demo")
  tok = tiny_tokenizer(["how do I bake bread", "tell me a story about a cat"] * 4, 300,
                       tmp_path / "tokenizer.json")
  cfg = tiny_model_config(vocab_size=320, n_kv_heads=4, scan_layers=True)
  (tmp_path / "config.json").write_text(json.dumps(dict(
      model=dataclasses.asdict(cfg), data=dict(seq_len=96, chat_template="demo"))))
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(1))
  checkpoint.save_params(str(tmp_path), "sft", nn.meta.unbox(params), dict(step=0, phase="sft"))
  one = api.SafetyModel(cfg, params, tok, template, max_length=96)
  restore, meshes = workdir.load_for_inference, []
  monkeypatch.setattr(workdir, "load_for_inference",
                      lambda *a, mesh=None: meshes.append(mesh) or restore(*a, mesh=mesh))
  split = api.load(str(tmp_path), mesh=dict(data=2, tensor=4))
  assert meshes == [split.mesh]
  kernel = split.params["layer_1"]["mlp"]["down_proj"]["kernel"]  # [d_ff, d_model]
  assert kernel.addressable_shards[0].data.shape == (cfg.d_ff // 4, cfg.d_model)
  assert split.mesh.shape == dict(data=2, fsdp=1, tensor=4)
  prompts = ["how do I bake bread", "a story", "a cat"]
  np.testing.assert_allclose(split.classify(prompts), one.classify(prompts), atol=1e-5)
  kw = dict(max_new_tokens=6, gate="every")
  assert [g.tokens for g in split.generate(prompts, **kw)] == [
      g.tokens for g in one.generate(prompts, **kw)]
  with pytest.raises(ValueError, match="dict of axis sizes over"):
    api.SafetyModel(cfg, params, tok, template, mesh=dict(model=8))
