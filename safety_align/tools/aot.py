"""Per-device training memory of a config under FSDP: a formula, and the compiler's own.

  python -m safety_align.tools.aot --config=configs/llama2_7b.py --devices=8 --hbm_gib=80
  python -m safety_align.tools.aot --config=configs/llama2_7b_cls.py --devices=16 --compiled \
      --hbm_gib=32 --attention=blockwise --config.sft.batch_size=16
  python -m safety_align.tools.aot --target=tpu:v5p:16 --config=configs/llama2_7b_cls.py

``--target=tpu:<gen>:<chips>`` compiles with the real TPU compiler for that slice, on this
CPU machine (libtpu installed: ``pip install -e ".[tpu]"``): each phase's sharded training
step and the gated decoding loop, reported per chip (``tpu_aot.py``: HBM against the chip's,
FLOPs checked against the analytic ones, the collectives, a roofline and its MFU bound; slice
names in ``tpu_targets.py``).

Without ``--target``: the formula's per-device memory of each phase's training step and, with
``--compiled``, XLA's memory analysis of the sharded step on ``--devices`` fake CPU devices
(``memory_estimate.py`` says how each is counted), against ``--hbm_gib``.
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from safety_align import model as model_lib
from safety_align.tools import tpu_aot, tpu_targets
from safety_align.tools.memory_estimate import GIB, compiled_memory, estimate, with_attention

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined on demand: importing this module defines none)."""
  config_flags.DEFINE_config_file("config", None, "Training config file.")
  flags.DEFINE_integer("devices", 8, "Devices the FSDP mesh shards over.")
  flags.DEFINE_float("hbm_gib", 16.0, "Memory per device, GiB.")
  flags.DEFINE_bool("compiled", False, "Also compile the sharded step on --devices fake CPU "
                    "devices and report XLA's memory analysis (minutes for a 7B model).")
  flags.DEFINE_string("attention", "", "model.attention for the compiled step: dense | "
                      "blockwise | flash ('' = the config's).")
  flags.DEFINE_string("target", "", "tpu:<gen>:<chips> (e.g. tpu:v5p:16): compile for that "
                      "TPU slice with the TPU compiler instead ('' = the CPU paths above).")
  flags.DEFINE_list("decode", ["on", "off"], "--target: compile the gated decoding loop with "
                    "the gate on and/or off ('' = none).")
  flags.DEFINE_integer("decode_batch", 16, "--target: decoding batch (rows).")
  flags.DEFINE_integer("decode_prompt", 2048, "--target: prompt tokens per row.")
  flags.DEFINE_integer("decode_new", 2048, "--target: new tokens per row (KV cache: prompt + "
                       "new + 3 slots).")
  flags.DEFINE_string("hlo_dir", "", "--target: keep each compiled program's optimised HLO and "
                      "XLA analyses in this folder, and read them back from there instead of "
                      "compiling again when the config and settings are the same (the code "
                      "is not part of the key: empty the folder after changing it).")
  flags.DEFINE_string("decode_mesh", "tensor=-1", "--target: the serving mesh as "
                      "sa.load(mesh=...) takes it, axis=size pairs (-1: the rest).")


def tpu_main(config: ml_collections.ConfigDict) -> bool:
  """``--target``: compile every phase's step and the decoding loop for the TPU slice, print
  the per-chip reports; True if every training step fits."""
  target = tpu_targets.parse(FLAGS.target)
  devices = tpu_targets.devices(target)
  print(target.describe())
  fits_all = True
  for phase in config.phases.split(","):
    r = tpu_aot.train_step(config, phase, target, devices, FLAGS.attention,
                           hlo_dir=FLAGS.hlo_dir)
    print("\n".join(r.lines()))
    seconds = r.roofline.seconds
    print(f"    MFU upper bound (model FLOPs at the roofline time): {r.mfu_bound:.1%}; "
          f"{r.tokens / seconds / target.chips:,.0f} tokens/s per chip at the roofline time")
    fits_all &= r.fits
  mesh = {k: int(v) for k, v in (pair.split("=") for pair in FLAGS.decode_mesh.split(","))}
  for gate in FLAGS.decode:
    if gate not in ("on", "off"):
      raise app.UsageError(f"--decode={gate}: expected on and/or off.")
    r = tpu_aot.decode_loop(config, target, devices, batch=FLAGS.decode_batch,
                            prompt_len=FLAGS.decode_prompt, new_tokens=FLAGS.decode_new,
                            gate=gate == "on", mesh_sizes=mesh, hlo_dir=FLAGS.hlo_dir)
    print("\n".join(r.lines()))
    print(f"    roofline {r.roofline.seconds * 1e3:.2f} ms per token "
          f"({FLAGS.decode_batch / r.roofline.seconds:,.0f} tokens/s over the batch)")
  return fits_all


def main(argv):
  del argv
  config: ml_collections.ConfigDict = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/llama2_7b.py.")
  if FLAGS.target:
    tpu_targets.compile_only_env()  # before JAX starts a backend
    if not tpu_main(config):
      raise SystemExit(1)
    return
  if FLAGS.compiled:  # before JAX starts a backend: the fake devices to shard over
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", FLAGS.devices)
  model_cfg = with_attention(model_lib.ModelConfig.from_config(config.model), FLAGS.attention)
  budget = FLAGS.hbm_gib * GIB
  fits_all = True
  for phase in config.phases.split(","):
    p = config[phase]
    e = estimate(model_cfg, devices=FLAGS.devices, batch_size=p.batch_size,
                 seq_len=config.data.seq_len, grad_accum=p.grad_accum)
    attention = getattr(model_cfg, "attention", "dense")
    print(f"{phase}: {e.n_params / 1e9:.2f}B params ({e.param_bytes / 1e9:.2f} GB "
          f"{model_cfg.param_dtype}), {FLAGS.devices} devices, micro-batch "
          f"{p.batch_size} x {config.data.seq_len} (x{p.grad_accum} accumulated), "
          f"remat={model_cfg.remat}, attention={attention}")
    print("  formula (GiB / device)")
    for name in ("params", "grads", "opt_state", "activations", "total"):
      print(f"    {name:12s} {getattr(e, name) / GIB:8.2f}")
    need = e.total
    if FLAGS.compiled:
      c = compiled_memory(config, phase, devices=FLAGS.devices, attention=FLAGS.attention)
      print("  compiled, XLA memory_analysis (GiB / device)")
      for name in ("arguments", "outputs", "aliased", "temp", "peak"):
        print(f"    {name:12s} {getattr(c, name) / GIB:8.2f}")
      need = c.peak
    fits = need <= budget
    fits_all &= fits
    print(f"  {'fits' if fits else 'does NOT fit'} in {FLAGS.hbm_gib:g} GiB "
          f"({'compiled peak' if FLAGS.compiled else 'formula'})")
  if not fits_all:
    raise SystemExit(1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
