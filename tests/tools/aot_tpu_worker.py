"""Run by tests/tools/test_aot_tpu.py in its own process (libtpu never loads into pytest's): compile
the tiny config's training step (the training rules, and again with the embedding and LM head
replicated over ``tensor``) and its gated decoding loop for a ``v5e:2x2`` slice; print JSON."""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from safety_align.tools import tpu_targets  # noqa: E402

tpu_targets.compile_only_env()

from configs import tiny  # noqa: E402
from safety_align import sharding  # noqa: E402
from safety_align.tools import tpu_aot  # noqa: E402


def config():
  """Parameter-dominated (a large vocabulary, short rows), so the state is most of the peak."""
  c = tiny.get_config("smoke")
  c.model.update(vocab_size=8192, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                 scan_layers=True, remat="dots", dtype="bfloat16")
  c.data.seq_len = 32
  c.mesh.update(data=1, fsdp=2, tensor=2)
  c.sft.update(batch_size=4, grad_accum=1)
  return c


def main():
  target = tpu_targets.parse("tpu:v5e:4")
  devices = tpu_targets.devices(target)
  out = {"topology": target.topology, "device_kind": devices[0].device_kind}
  replicated = tuple((name, None if name == "vocab" else axes) for name, axes in sharding.RULES)
  for name, rules in (("sharded", sharding.RULES), ("vocab_replicated", replicated)):
    c = config()
    r = tpu_aot.train_step(c, "sft", target, devices, rules=rules)
    out[name] = dict(peak=r.memory.peak, arguments=r.memory.arguments,
                     bound=tpu_aot.SLACK * (r.estimate.params + r.estimate.opt_state),
                     problem=tpu_aot.memory_problem(r, r.estimate),
                     collectives=r.collectives.counts, hlo_agrees=r.hlo_agrees,
                     hlo_flops=r.hlo_flops, hlo_expected=r.hlo_expected,
                     hardware_flops=r.hardware_flops, model_flops=r.model_flops,
                     mfu_bound=r.mfu_bound, layers=c.model.n_layers,
                     grad_accum=c.sft.grad_accum, layer_gathers=sum(
                         runs for kind, runs, _, op in r.collectives.ops
                         if kind == "all-gather" and "/layers/" in (op or "")))
  d = tpu_aot.decode_loop(config(), target, devices, batch=4, prompt_len=16, new_tokens=16,
                          gate=True, mesh_sizes=dict(data=2, tensor=2))
  out["decode"] = dict(peak=d.memory.peak, arguments=d.memory.arguments,
                       hbm=target.chip.hbm_bytes, weights_and_cache=d.hbm_bytes * target.chips)
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
