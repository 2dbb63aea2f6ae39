"""The run's programs compiled by the TPU compiler for a TPU slice, on a CPU machine.

``train_step``: the sharded training step of a phase (``train_step.Trainer``: state and the
``[grad_accum, batch_size, seq_len]`` micro-batches as sharded ``ShapeDtypeStruct``s, nothing
allocated) over the config's mesh on the slice's devices (``tpu_targets.devices``).
``decode_loop``: the compiled gated decoding program (prompt pass + loops, ``decode.decoder``)
with parameters, KV cache and loop state laid out as ``sa.load(mesh=...)`` lays them out
(``sharding.DecodeLayout``; parameters unrolled and in the config's parameter dtype, as
``load`` restores them). Each returns a report per chip: XLA's ``memory_analysis()`` against
the chip's HBM, the model's and the hardware's FLOPs with the optimised HLO's matmuls as the
cross-check, the executed collectives of the optimised HLO and the roofline (``roofline.py``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import pathlib
from unittest import mock

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from safety_align import model as model_lib
from safety_align import sharding
from safety_align.tools import roofline, tpu_targets
from safety_align.tools.memory_estimate import Compiled, Estimate, estimate, with_attention

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Report:
  """One compiled program on one slice, per chip.

  FLOPs, per chip: ``model_flops`` the MFU numerator (``roofline.train_flops``; a decoding
  step's for the decoder), ``hardware_flops`` what the chip executes (``roofline.
  train_hardware_flops``: recompute, masked blocks), ``hlo_flops`` the matmuls of the compiled
  HLO as executed (``roofline.matmul_flops``, every conditional branch taken) checked against
  ``hlo_expected`` (the analytic hardware FLOPs with every block counted), and XLA's
  ``cost_analysis()`` ``xla_flops`` (a ``while`` body counted once: shown, not used)."""

  what: str
  target: tpu_targets.Target
  memory: Compiled
  xla_flops: float
  model_flops: float
  hardware_flops: float
  hbm_bytes: float        # analytic HBM traffic per chip (a lower bound)
  collectives: roofline.Collectives
  tokens: int             # tokens the step processes (all chips)
  hlo_flops: float = 0.0
  hlo_expected: float = 0.0
  notes: tuple = ()
  per_step: bool = False  # a decoding step: the HLO covers the whole program, not one step
  estimate: Estimate | None = None  # the formula's memory (training steps)

  @property
  def fits(self) -> bool:
    return self.memory.peak <= self.target.chip.hbm_bytes

  @property
  def hlo_agrees(self) -> bool:
    return roofline.agrees(self.hlo_flops, self.hlo_expected)

  @property
  def roofline(self) -> roofline.Roofline:
    c = self.target.chip
    return roofline.Roofline(flops=self.hardware_flops, hbm_bytes=self.hbm_bytes,
                             ici_bytes=self.collectives.total_bytes, peak_flops=c.peak_flops,
                             hbm_bw=c.hbm_bw, ici_bw=c.ici_bw)

  @property
  def mfu_bound(self) -> float:
    """Model FLOPs over the chip's peak for the roofline time: an upper bound on MFU (below
    1 by at least model / hardware FLOPs when compute-bound)."""
    return self.roofline.mfu(self.model_flops)

  def lines(self) -> list[str]:
    """The per-chip table."""
    m, r, c = self.memory, self.roofline, self.target.chip
    tf = lambda x: f"{x / 1e12:.3f} TFLOP"
    out = [f"  {self.what}",
           f"    HBM per chip (GiB): arguments {m.arguments / GIB:.2f}, outputs "
           f"{m.outputs / GIB:.2f} (aliased {m.aliased / GIB:.2f}), temporaries "
           f"{m.temp / GIB:.2f}, peak {m.peak / GIB:.2f} of {c.hbm_bytes / GIB:.1f}: "
           f"{'fits' if self.fits else 'does NOT fit'}"]
    if self.per_step:
      out.append(f"    FLOPs per chip, one decoding step (analytic): {tf(self.model_flops)}; "
                 f"cost_analysis of the whole program {tf(self.xla_flops)}")
    else:
      check = (f"x{self.hlo_flops / self.hlo_expected:.2f} the analytic hardware FLOPs with "
               f"every block counted ({tf(self.hlo_expected)}): "
               + ("agrees" if self.hlo_agrees else
                  f"DIFFERS by more than {roofline.TOLERANCE:.0%}"))
      out += [f"    FLOPs per chip: model {tf(self.model_flops)} (6·N·tokens + attention); "
              f"hardware {tf(self.hardware_flops)} (x{self.hardware_flops / self.model_flops:.2f}:"
              " recompute, masked blocks; used by the roofline)",
              f"    cross-check: the compiled HLO's matmuls executed {tf(self.hlo_flops)}, "
              f"{check}; cost_analysis {tf(self.xla_flops)} "
              f"(x{self.xla_flops / self.model_flops:.3f} the model's: it counts a while body "
              "once, not used)"]
    out += [f"    collectives per chip (executed): {self.collectives.describe()}",
            f"    roofline per chip: compute {r.terms['compute'] * 1e3:.1f} ms, HBM "
            f"{r.terms['HBM'] * 1e3:.1f} ms, ICI {r.terms['ICI'] * 1e3:.1f} ms -> "
            f"{r.seconds * 1e3:.1f} ms ({r.bound}-bound)"]
    problem = self.estimate and memory_problem(self, self.estimate)
    out += [f"    note: {n}" for n in self.notes + ((problem,) if problem else ())]
    return out


SLACK = 1.3  # the compiled peak may exceed the formula by this much before it is flagged


def memory_problem(report: Report, e: Estimate, slack: float = SLACK) -> str | None:
  """Why ``report``'s compiled arguments (the state the step keeps between steps, and the
  batch) are over ``slack`` x the formula's sharded state (``memory_estimate.estimate``:
  parameters and optimiser state over every chip), or None. Over it, some state is not sharded
  as the formula assumes, e.g. a parameter replicated by a missing logical-axis rule. (The peak is
  not checked against the formula: XLA may hold a whole float32 gradient of the embedding
  before reduce-scattering it, which the formula does not model.)"""
  state = e.params + e.opt_state
  if report.memory.arguments <= slack * state:
    return None
  return (f"compiled arguments {report.memory.arguments / GIB:.3f} GiB per chip are over "
          f"{slack:g} x the formula's {state / GIB:.3f} GiB of parameters and optimiser state "
          "sharded over every chip: some parameter is not sharded; check that each has a "
          "logical-axis rule that shards it (sharding.RULES).")


@dataclasses.dataclass(frozen=True)
class Program:
  """What the report reads from one compiled program: XLA's ``memory_analysis()`` and
  ``cost_analysis()`` per chip and the optimised HLO text. ``save`` / ``load`` keep it
  (``aot.py --hlo_dir``) so the report can be recomputed without compiling again."""

  memory: Compiled
  xla_flops: float
  hlo: str

  @classmethod
  def of(cls, compiled, devices: int) -> "Program":
    stats = compiled.memory_analysis()
    args, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
    alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    peak = getattr(stats, "peak_memory_in_bytes", 0) or args + out - alias + temp
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cls(Compiled(devices=devices, arguments=args, outputs=out, aliased=alias,
                            temp=temp, peak=peak),
               float(cost.get("flops", 0.0)), compiled.as_text())

  def save(self, path: pathlib.Path) -> None:
    """``path``.json (memory and cost) and ``path``.hlo.gz (the optimised HLO)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(dict(
        memory=self.memory.to_json(), xla_flops=self.xla_flops)))
    with gzip.open(path.with_suffix(".hlo.gz"), "wt") as f:
      f.write(self.hlo)

  @classmethod
  def load(cls, path: pathlib.Path) -> "Program":
    saved = json.loads(path.with_suffix(".json").read_text())
    with gzip.open(path.with_suffix(".hlo.gz"), "rt") as f:
      hlo = f.read()
    return cls(Compiled(**saved["memory"]), saved["xla_flops"], hlo)


def tpu_attention(attention: str) -> tuple[str, tuple]:
  """(the attention compiled for a TPU, notes): ``flash`` is the Pallas GPU kernel, so a TPU
  compiles ``blockwise`` instead (why: ``attention.py``)."""
  if attention != "flash":
    return attention, ()
  return "blockwise", (
      "--attention=flash is the Pallas GPU kernel; compiled blockwise instead. The Pallas TPU "
      "kernels (jax.experimental.pallas.ops.tpu flash_attention, splash_attention) return "
      "their log-sum-exp only with save_residuals=True, and their VJPs then raise "
      "NotImplementedError('Higher-order AD not supported'): the lse that merges the "
      "RESPONSE->[CLS] key cannot be differentiated through them.",)


def _cached(hlo_dir: str, key: str, what: str, devices: int, lower) -> Program:
  """The program ``lower()`` compiles, kept in ``hlo_dir`` under ``what`` and a hash of
  ``key`` (the config and the settings that shape it) and read back from there when present;
  ``hlo_dir`` "": compiled every time."""
  if not hlo_dir:
    return Program.of(lower().compile(), devices)
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  path = pathlib.Path(hlo_dir) / f"{what}-{digest}"
  if path.with_suffix(".hlo.gz").exists():
    return Program.load(path)
  program = Program.of(lower().compile(), devices)
  program.save(path)
  return program


def train_step(config: ml_collections.ConfigDict, phase: str, target: tpu_targets.Target,
               devices, attention: str = "", rules: tuple = sharding.RULES,
               hlo_dir: str = "") -> Report:
  """Compile ``phase``'s sharded training step for ``target`` and report it per chip.
  ``rules``: the logical-axis rules of the parameters (tests replicate one to see the memory
  check fail). ``hlo_dir``: keep the compiled program's analyses there (``_cached``)."""
  from safety_align import train_step as step_lib  # pylint: disable=g-import-not-at-top
  attention, notes = tpu_attention(attention)
  model_cfg = with_attention(model_lib.ModelConfig.from_config(config.model), attention)
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  p, seq_len = config[phase], config.data.seq_len
  n_data = mesh.shape["data"] * mesh.shape["fsdp"]
  if p.batch_size % n_data:
    raise ValueError(f"config.{phase}.batch_size={p.batch_size} is not divisible by the "
                     f"{n_data} data-parallel chips of {target.slice_name}: override it, e.g. "
                     f"--config.{phase}.batch_size={n_data}.")
  trainer = step_lib.Trainer(model_cfg, p, phase, mesh, rules)
  chips = target.chips
  program = _cached(hlo_dir, repr((config.to_json(), phase, target.topology, model_cfg, rules)),
                    f"{target.topology.replace(':', '_')}-{phase}-{model_cfg.attention}", chips,
                    lambda: trainer.lower(p.batch_size, seq_len))
  e = estimate(model_cfg, devices=chips, batch_size=p.batch_size, seq_len=seq_len,
                   grad_accum=trainer.grad_accum)
  tokens = p.batch_size * seq_len * trainer.grad_accum
  per_chip = lambda f, **kw: f(model_cfg, e.n_params, tokens, seq_len, **kw) / chips
  return Report(
      what=(f"{phase} step: {e.n_params / 1e9:.2f}B params, micro-batch {p.batch_size} x "
            f"{seq_len} x {trainer.grad_accum} accumulated, attention={model_cfg.attention}, "
            f"remat={model_cfg.remat}, mesh {dict(mesh.shape)}"),
      target=target, memory=program.memory, xla_flops=program.xla_flops,
      model_flops=per_chip(roofline.train_flops),
      hardware_flops=per_chip(roofline.train_hardware_flops),
      hbm_bytes=_train_hbm_bytes(model_cfg, e, chips, trainer.grad_accum),
      collectives=roofline.collectives(program.hlo), tokens=tokens,
      hlo_flops=roofline.matmul_flops(program.hlo),
      hlo_expected=per_chip(roofline.train_hardware_flops, skipped=False), notes=notes,
      estimate=e)


def _train_hbm_bytes(cfg: model_lib.ModelConfig, e: Estimate, chips: int, k: int) -> float:
  """A lower bound on one step's HBM traffic per chip: AdamW reads the float32 parameters,
  gradients and both moments and writes three of them back (28 bytes per parameter, sharded);
  each micro-step reads the gathered compute-dtype weights three times (forward, and the
  backward's two matmuls), writes and reads back its saved activations, and with
  accumulation reads and writes the float32 accumulator."""
  c = np.dtype(cfg.compute_dtype).itemsize
  state = 28 * e.n_params / chips
  micro = 3 * c * e.n_params + 2 * e.activations + (8 * e.n_params / chips if k > 1 else 0)
  return state + k * micro


def decode_loop(config: ml_collections.ConfigDict, target: tpu_targets.Target, devices, *,
                batch: int, prompt_len: int, new_tokens: int, gate: bool,
                mesh_sizes: dict, hlo_dir: str = "") -> Report:
  """Compile the gated decoding program (``gate``: annealing schedule, else off) for ``batch``
  prompts of ``prompt_len`` tokens and ``new_tokens`` new ones, laid out as
  ``sa.load(mesh=mesh_sizes)`` lays it out, and report it per chip. The roofline is one plain
  decoding step (every step without re-evaluation is exactly that step)."""
  from safety_align.decode import decoder as decoder_lib  # pylint: disable=g-import-not-at-top
  from safety_align.decode import gate as gate_lib  # pylint: disable=g-import-not-at-top
  from safety_align.decode.cache import PROMPT_SLOT, Prompts  # pylint: disable=g-import-not-at-top
  from safety_align.masks import Role  # pylint: disable=g-import-not-at-top
  cfg = model_lib.ModelConfig.from_config(config.model)
  mesh = sharding.make_mesh({**dict.fromkeys(sharding.MESH_AXES, 1), **mesh_sizes}, devices)
  params = jax.eval_shape(lambda: model_lib.unroll_layers(
      cfg, nn.meta.unbox(model_lib.init_params(cfg, jax.random.key(0))))[1])
  cfg = dataclasses.replace(cfg, scan_layers=False)
  chips = target.chips

  def lower():
    dec = decoder_lib.Decoder(cfg, eos_ids=[2], mesh=mesh)
    prompts = Prompts(ids=((5,) * prompt_len,) * batch,
                      roles=((int(Role.QUERY),) * prompt_len,) * batch)
    run, args = _decode_program(dec, params, prompts, dict(
        max_new_tokens=new_tokens, gate=gate_lib.GateConfig(
            schedule="annealing" if gate else "off", reliance="low")))
    return run.lower(*args)

  program = _cached(hlo_dir, repr((cfg, target.topology, batch, prompt_len, new_tokens, gate,
                                   dict(mesh.shape))),
                    f"{target.topology.replace(':', '_')}-decode-gate_{'on' if gate else 'off'}",
                    chips, lower)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  cache_len = PROMPT_SLOT + prompt_len + new_tokens
  flops = roofline.decode_flops(cfg, n_params, batch, cache_len) / chips
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  kv_bytes = (2 * cfg.n_layers * batch * cfg.n_kv_heads * cache_len * cfg.dim_per_head
              * np.dtype(cfg.compute_dtype).itemsize)
  return Report(
      what=(f"gated decode loop, gate {'on (annealing)' if gate else 'off'}: batch {batch} x "
            f"(prompt {prompt_len} + {new_tokens} new = KV cache {cache_len} slots), "
            f"parameters {cfg.param_dtype} unrolled, mesh {dict(mesh.shape)}"),
      target=target, memory=program.memory, xla_flops=program.xla_flops,
      model_flops=flops, hardware_flops=flops,
      hbm_bytes=(param_bytes + kv_bytes) / chips,
      collectives=roofline.collectives(program.hlo, per_iteration=True), tokens=batch,
      per_step=True,
      notes=("roofline per decoding step (one token per row): the collectives inside the "
             "decoding loops, once per iteration",))


class _Captured(Exception):
  pass


def _decode_program(dec, params, prompts, kwargs):
  """(the jitted sharded program ``dec(params, prompts, **kwargs)`` runs, its arguments with
  ``params`` as sharded ``ShapeDtypeStruct``s): the decoder builds its own program and inputs
  (``Decoder._sharded_decode`` returns the program and the parameters' shardings, and the
  decoder calls it on the placed parameters and its inputs), and is stopped at that call. The
  decoder's ``jax.device_put`` of the abstract parameters is the identity meanwhile: nothing
  is placed."""
  captured = {}
  build = dec._sharded_decode  # pylint: disable=protected-access

  def sharded_decode(*args):
    run, shardings = build(*args)

    def stop(placed, *inputs):
      captured.update(run=run, inputs=inputs, params=jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), placed, shardings))
      raise _Captured
    return stop, shardings

  dec._sharded_decode = sharded_decode  # pylint: disable=protected-access
  with mock.patch.object(jax, "device_put", lambda x, *_, **__: x):
    try:
      dec(params, prompts, **kwargs)
    except _Captured:
      pass
  return captured["run"], (captured["params"],) + captured["inputs"]
