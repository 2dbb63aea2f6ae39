"""The TPU compiler on this CPU machine (tools/aot.py --target): the tiny config's training step
and gated decoding loop compiled for a v5e:2x2 slice, in a process of their own
(tests/tools/aot_tpu_worker.py) so libtpu never loads into pytest's. libtpu missing fails the test:
`make test` installs it (the tpu extra)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).with_name("aot_tpu_worker.py")


@pytest.fixture(scope="module")
def compiled():
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                        env=env, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, (
      f"compiling for a TPU failed (is libtpu installed? pip install -e '.[tpu]'):\n"
      f"{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def test_the_slice_is_a_tpu(compiled):
  assert compiled["topology"] == "v5e:2x2"
  assert compiled["device_kind"].startswith("TPU v5 lite")


def test_training_step_fits_the_formula_and_shards_its_collectives(compiled):
  """The sharded step's per-chip arguments are within the formula's bound; FSDP gathers each
  layer's seven matmul weights once in the forward and once in the backward, per layer and
  micro-batch (counted by hand: async collectives split over several instructions count once);
  the compiled HLO's matmuls agree with the analytic hardware FLOPs, which for dense attention
  under remat=dots are the model's plus the masked half of the [T, T] scores."""
  sharded = compiled["sharded"]
  assert 0 < sharded["arguments"] <= sharded["bound"], sharded
  assert sharded["problem"] is None
  assert sharded["layer_gathers"] == 2 * 7 * sharded["layers"] * sharded["grad_accum"]
  assert sharded["collectives"].get("all-reduce", 0) + sharded["collectives"].get(
      "reduce-scatter", 0) > 0
  assert sharded["hlo_agrees"], (sharded["hlo_flops"], sharded["hlo_expected"])
  assert sharded["model_flops"] < sharded["hardware_flops"] < 1.2 * sharded["model_flops"]
  assert sharded["mfu_bound"] < 1.0


def test_an_unsharded_parameter_fails_the_memory_check(compiled):
  """The embedding and LM head replicated over `tensor` (their rule dropped): the check names
  the problem."""
  bad = compiled["vocab_replicated"]
  assert bad["arguments"] > 1.5 * compiled["sharded"]["arguments"]
  assert bad["arguments"] > bad["bound"]
  assert "not sharded" in bad["problem"]


def test_decode_loop_compiles_sharded(compiled):
  """The gated decoding loop compiles for the slice and each chip holds a share of the
  parameters, not all of them."""
  d = compiled["decode"]
  assert 0 < d["peak"] < d["hbm"]
  assert 0 < d["arguments"] < 0.75 * d["weights_and_cache"]


# A hand-written optimised HLO module: an outer loop of 3 around an inner loop of 2 whose
# all-gather is split, as the TPU compiler splits asynchronous collectives, over a start and
# a continuation fusion with one channel_id; a loop with a known trip count of 5; a fusion
# holding an all-reduce called from both loops; a loop of 8 stepping by 2 (the TPU compiler's
# windowed matmul loops).
_HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%continuation (q: bf16[2,8]) -> bf16[8,8] {
  %q = bf16[2,8]{1,0} parameter(0)
  ROOT %ag.2 = bf16[8,8]{1,0} all-gather(%q), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
}

%reduce (v: f32[4]) -> f32[4] {
  %v = f32[4]{0} parameter(0)
  ROOT %ar = f32[4]{0} all-reduce(%v), channel_id=6, replica_groups=[1,4]<=[4], to_apply=%add
}

%shared (v: f32[4]) -> f32[4] {
  %v = f32[4]{0} parameter(0)
  ROOT %f = f32[4]{0} fusion(%v), kind=kLoop, calls=%reduce
}

%inner_body (p: (s32[], bf16[2,8])) -> (s32[], bf16[2,8]) {
  %p = (s32[], bf16[2,8]) parameter(0)
  %s = f32[4]{0} fusion(%v), kind=kLoop, calls=%shared
  %x = bf16[2,8]{1,0} get-tuple-element(%p), index=1
  %w = bf16[16,8]{1,0} constant({...})
  %ag.1 = bf16[8,8]{1,0} all-gather(%x), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %f = bf16[8,8]{1,0} fusion(%x), kind=kCustom, calls=%continuation
  %y = bf16[2,16]{1,0} convolution(%x, %w), window={size=1}, dim_labels=bf_oi->bf
  %r = f32[8]{0} all-reduce(%z), channel_id=2, replica_groups=[1,4]<=[4], to_apply=%add
  ROOT %t = (s32[], bf16[2,8]) tuple(%i, %x)
}

%inner_cond (p: (s32[], bf16[2,8])) -> pred[] {
  %p = (s32[], bf16[2,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(2)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%outer_body (p: (s32[], bf16[2,8])) -> (s32[], bf16[2,8]) {
  %p = (s32[], bf16[2,8]) parameter(0)
  %w = (s32[], bf16[2,8]) while(%p), condition=%inner_cond, body=%inner_body
  %r = f32[8]{0} all-reduce(%z), channel_id=3, replica_groups=[1,4]<=[4], to_apply=%add
  ROOT %t = (s32[], bf16[2,8]) tuple(%i, %x)
}

%outer_cond (p: (s32[], bf16[2,8])) -> pred[] {
  %p = (s32[], bf16[2,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%known_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %cp = f32[4]{0} collective-permute(%v), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %s = f32[4]{0} fusion(%v), kind=kLoop, calls=%shared
  ROOT %t = (s32[], f32[4]) tuple(%i, %v)
}

%windowed_body (p: (u32[], f32[4])) -> (u32[], f32[4]) {
  %p = (u32[], f32[4]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %two = u32[] constant(2)
  %next = u32[] add(%i, %two)
  %cp = f32[4]{0} collective-permute(%v), channel_id=7, source_target_pairs={{0,1},{1,0}}
  ROOT %t = (u32[], f32[4]) tuple(%next, %cp)
}

%windowed_cond (p: (u32[], f32[4])) -> pred[] {
  %p = (u32[], f32[4]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %n = u32[] constant(8)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: bf16[2,8], l: f32[4,16], r: f32[16,8]) -> f32[4,8] {
  %a = bf16[2,8]{1,0} parameter(0)
  %l = f32[4,16]{1,0} parameter(1)
  %r = f32[16,8]{1,0} parameter(2)
  %w = (s32[], bf16[2,8]) while(%t0), condition=%outer_cond, body=%outer_body
  %k = (s32[], f32[4]) while(%t1), condition=%outer_cond, body=%known_body, backend_config={"known_trip_count":{"n":"5"}}
  %x = (u32[], f32[4]) while(%t2), condition=%windowed_cond, body=%windowed_body
  %g = bf16[8,8]{1,0} all-gather(%a), channel_id=5, replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %d = f32[4,8]{1,0} dot(%l, %r), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_collectives_and_matmuls_counted_as_executed():
  """Counted by hand: the inner loop's all-gather (one channel over two instructions) runs
  3 x 2 = 6 times, its all-reduce 6, the outer loop's all-reduce 3, the known-trip loop's
  permute 5, the windowed loop's permute 4, the entry's all-gather once, the shared fusion's all-reduce 6 + 5 = 11 (once per
  call site, not per path); the inner convolution 6 x 2·(2·16)·8 FLOPs, the
  entry's dot 2·(4·8)·16. Runs without libtpu."""
  from safety_align.tools import roofline
  c = roofline.collectives(_HLO)
  assert c.counts == {"all-gather": 7, "all-reduce": 20, "collective-permute": 9}
  gathered = 8 * 8 * 2 * 3 / 4  # bf16[8,8] less this chip's quarter
  assert c.bytes["all-gather"] == 7 * gathered
  assert c.bytes["all-reduce"] == 2 * (9 * 8 * 4 + 11 * 4 * 4) * 3 / 4
  per_iteration = roofline.collectives(_HLO, per_iteration=True)
  assert per_iteration.counts == {"all-gather": 1, "all-reduce": 4, "collective-permute": 2}
  assert roofline.matmul_flops(_HLO) == 6 * 2 * (2 * 16) * 8 + 2 * (4 * 8) * 16
