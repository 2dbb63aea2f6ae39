"""Per-device training memory of a config under FSDP: a formula, and the compiler's own.

  python -m safety_align.tools.aot --config=configs/llama2_7b.py --devices=8 --hbm_gib=80
  python -m safety_align.tools.aot --config=configs/llama2_7b_cls.py --devices=16 --compiled \
      --hbm_gib=32 --attention=blockwise --config.sft.batch_size=16
  python -m safety_align.tools.aot --target=tpu:v5p:16 --config=configs/llama2_7b_cls.py

``--target=tpu:<gen>:<chips>`` compiles with the real TPU compiler for that slice, on this
CPU machine (libtpu installed: ``pip install -e ".[tpu]"``): each phase's sharded training
step and the gated decoding loop, reported per chip (``tpu_aot.py``: HBM against the chip's,
FLOPs checked against the analytic ones, the collectives, a roofline and its MFU bound; slice
names in ``tpu_targets.py``). The rest of this docstring is the CPU-only path.

The formula: parameter shapes and dtypes come from ``jax.eval_shape`` of ``model.init_params``.
Parameters, gradients (parameter dtype) and AdamW's two float32 moments are sharded over all
``devices`` (ZeRO-3 / FSDP), with accumulation (``grad_accum`` > 1) also the step's float32
gradient accumulator; activations are those of each device's share of one micro-batch
(``batch_size`` rows of ``seq_len``), per layer as saved by the remat policy:

  full           the layer input (the scan carry)                     D
  dots_no_batch  + the weight matmul outputs q, k, v, o, gate, up, down
  dots           + the attention einsum outputs: scores [H, S] per token and probs @ v
  none           + norms, RoPE'd q/k, float32 scores and probs, SwiGLU intermediates

plus one layer's full working set (recomputed in the backward pass) and the float32 LM logits
and their gradient. Estimates, not compiler output: leave ~10% headroom.

``--compiled`` also lowers the real sharded step (``trainer.Trainer``: state and the
``[grad_accum, batch_size, seq_len]`` micro-batches as sharded ``ShapeDtypeStruct``s, nothing
allocated) on ``devices`` fake CPU devices, compiles it and reports XLA's
``memory_analysis()`` per device: arguments (state + batch), outputs, temporaries and the peak.
XLA:CPU's fusion and layouts differ from a TPU's or GPU's, so read it as the partitioned
program's buffer sizes, not a hardware measurement. ``Trainer`` traces under
``trainer.mesh_context`` (``jax.set_mesh``), so the model's logical activation constraints
are in the compiled program: each device holds its own rows' activations.
"""

from __future__ import annotations

import dataclasses
import math

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from safety_align import model as model_lib

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes per device (``params`` .. ``total``) and the global parameter count."""

  n_params: int
  param_bytes: int       # all parameters, unsharded
  params: float
  grads: float
  opt_state: float
  activations: float

  @property
  def total(self) -> float:
    return self.params + self.grads + self.opt_state + self.activations


def _per_token_layer_bytes(cfg: model_lib.ModelConfig, seq_len: int, policy: str) -> float:
  """Activation bytes per token per layer saved for the backward pass under ``policy``."""
  c = np.dtype(cfg.compute_dtype).itemsize
  d, f, s = cfg.d_model, cfg.d_ff, seq_len
  hq, hkv = cfg.n_heads * cfg.dim_per_head, cfg.n_kv_heads * cfg.dim_per_head
  carry = c * d
  weight_dots = c * (hq + 2 * hkv + d + 2 * f + d)          # q, k, v, o, gate, up, down
  attn_dots = c * (cfg.n_heads * s + hq)                    # scores, probs @ v
  rest = c * (2 * d + hq + hkv + 2 * f) + 8 * cfg.n_heads * s  # norms, rope, silu, f32 softmax
  return {
      "full": carry,
      "dots_no_batch": carry + weight_dots,
      "dots": carry + weight_dots + attn_dots,
      "none": carry + weight_dots + attn_dots + rest,
  }[policy]


def estimate(model_cfg: model_lib.ModelConfig, *, devices: int, batch_size: int, seq_len: int,
             grad_accum: int = 1) -> Estimate:
  """Per-device memory of one training step (see the module docstring for the model).

  ``batch_size`` rows go through each micro-step (as in ``trainer``); ``grad_accum`` > 1
  adds the step's float32 gradient accumulator (counted with the optimiser state).
  """
  if devices <= 0 or batch_size <= 0 or grad_accum <= 0:
    raise ValueError(f"need devices, batch_size, grad_accum > 0; got {devices}, {batch_size}, "
                     f"{grad_accum}.")
  shapes = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))
  leaves = jax.tree.leaves(shapes)
  n_params = sum(x.size for x in leaves)
  param_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
  tokens = math.ceil(batch_size / devices) * seq_len
  saved = model_cfg.n_layers * _per_token_layer_bytes(model_cfg, seq_len, model_cfg.remat)
  working = _per_token_layer_bytes(model_cfg, seq_len, "none")
  logits = 2 * 4 * model_cfg.vocab_size
  return Estimate(
      n_params=n_params, param_bytes=param_bytes, params=param_bytes / devices,
      grads=param_bytes / devices,
      opt_state=(2 + (grad_accum > 1)) * 4 * n_params / devices,
      activations=tokens * (saved + working + logits))


@dataclasses.dataclass(frozen=True)
class Compiled:
  """XLA's ``memory_analysis()`` of the compiled sharded train step, bytes per device."""

  devices: int
  arguments: int   # the state and the micro-batches
  outputs: int     # the new state and the metrics
  aliased: int     # outputs written in place of (donated) arguments
  temp: int        # activations, gradients, the accumulator, collectives' buffers
  peak: int        # arguments + outputs - aliased + temp (XLA:CPU's own peak field omits temp)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def with_attention(model_cfg: model_lib.ModelConfig, attention: str) -> model_lib.ModelConfig:
  """``model_cfg`` with ``attention`` ("" = keep the config's); raises if this ModelConfig has
  no ``attention`` field and a non-dense one is asked for."""
  if not attention:
    return model_cfg
  if "attention" not in {f.name for f in dataclasses.fields(model_cfg)}:
    if attention == "dense":
      return model_cfg
    raise ValueError(f"--attention={attention}: this version's ModelConfig has no attention "
                     "field (dense attention only); drop the flag.")
  return dataclasses.replace(model_cfg, attention=attention)


def compiled_memory(config: ml_collections.ConfigDict, phase: str, *, devices: int,
                    attention: str = "") -> Compiled:
  """Compile ``phase``'s train step of ``config`` (mesh ``config.mesh``) on the first
  ``devices`` devices from abstract, sharded inputs, and read XLA's memory analysis."""
  from safety_align import sharding, trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  if jax.device_count() < devices:
    raise ValueError(f"compiled_memory: {devices} devices asked for, {jax.device_count()} "
                     f"present: set XLA_FLAGS=--xla_force_host_platform_device_count={devices} "
                     "(or jax_num_cpu_devices) before JAX starts.")
  model_cfg = with_attention(model_lib.ModelConfig.from_config(config.model), attention)
  mesh = sharding.make_mesh(dict(config.mesh), jax.devices()[:devices])
  p = config[phase]
  n_data = mesh.shape["data"] * mesh.shape["fsdp"]
  if p.batch_size % n_data:
    raise ValueError(f"config.{phase}.batch_size={p.batch_size} is not divisible by the "
                     f"{n_data} data-parallel devices of {devices}: override it, e.g. "
                     f"--config.{phase}.batch_size={n_data * math.ceil(p.batch_size / n_data)}.")
  return step_memory(trainer_lib.Trainer(model_cfg, p, phase, mesh), p.batch_size,
                     config.data.seq_len)


def step_memory(trainer, batch_size: int, seq_len: int) -> Compiled:
  """XLA's memory analysis of ``trainer``'s step (a ``trainer.Trainer``) compiled for
  ``batch_size`` rows of ``seq_len`` per micro-batch."""
  stats = trainer.lower(batch_size, seq_len).compile().memory_analysis()
  args, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
  alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
  return Compiled(devices=trainer.mesh.size, arguments=args, outputs=out, aliased=alias,
                  temp=temp, peak=args + out - alias + temp)


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
  from safety_align.tools import tpu_aot, tpu_targets  # pylint: disable=g-import-not-at-top
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
    from safety_align.tools import tpu_targets  # pylint: disable=g-import-not-at-top
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
