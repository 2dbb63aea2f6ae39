"""Per-device training memory of a config under FSDP: a formula (``estimate``), and the
compiler's own (``compiled_memory``); ``python -m safety_align.tools.aot`` prints both.

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

``compiled_memory`` (``--compiled``) lowers the real sharded step (``train_step.Trainer``: state
and the ``[grad_accum, batch_size, seq_len]`` micro-batches as sharded ``ShapeDtypeStruct``s,
nothing allocated) on ``devices`` fake CPU devices, compiles it and reports XLA's
``memory_analysis()`` per device: arguments (state + batch), outputs, temporaries and the peak.
XLA:CPU's fusion and layouts differ from a TPU's or GPU's, so read it as the partitioned
program's buffer sizes, not a hardware measurement. ``Trainer`` traces under
``train_step.mesh_context`` (``jax.set_mesh``), so the model's logical activation constraints
are in the compiled program: each device holds its own rows' activations.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections
import numpy as np

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

  ``batch_size`` rows go through each micro-step (as in ``train_step``); ``grad_accum`` > 1
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
  from safety_align import sharding, train_step as step_lib  # pylint: disable=g-import-not-at-top
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
  return step_memory(step_lib.Trainer(model_cfg, p, phase, mesh), p.batch_size,
                     config.data.seq_len)


def step_memory(trainer, batch_size: int, seq_len: int) -> Compiled:
  """XLA's memory analysis of ``trainer``'s step (a ``train_step.Trainer``) compiled for
  ``batch_size`` rows of ``seq_len`` per micro-batch."""
  stats = trainer.lower(batch_size, seq_len).compile().memory_analysis()
  args, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
  alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
  return Compiled(devices=trainer.mesh.size, arguments=args, outputs=out, aliased=alias,
                  temp=temp, peak=args + out - alias + temp)
