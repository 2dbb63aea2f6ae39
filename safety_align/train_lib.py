"""The training loop: optimiser, sharded state, the jitted step and the phase driver.

A run is one or two phases (``config.phases``, e.g. ``"pretrain,sft"``). Each phase has its
own data, steps, λ and schedule, and its own checkpoints under ``WORKDIR/checkpoints/<phase>``;
the SFT phase starts from the pretraining phase's final parameters with a fresh optimiser. A
run resumes from the newest intact checkpoint of the phase it stopped in; the micro-batch ``m``
is a pure function of ``(seed, m)``, so a resumed run sees exactly the data it would have seen.
A non-finite loss or gradient norm stops the phase before anything from it is saved.

Gradient accumulation: ``phase.steps`` counts optimiser steps (so do the checkpoint and log
intervals); step ``s`` takes the ``grad_accum`` micro-batches ``s·k .. s·k + k - 1`` of
``batch_size`` rows at once (``[k, B, T]``), counts each loss term's targets over all of them,
scans the micro-batches summing the gradients of ``term sum / global count`` and makes one
update: every term is a mean over the whole accumulated batch, as for one batch of ``k·B`` rows
(not ``optax.MultiSteps``' mean of per-micro-batch means).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
import re
import signal
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from safety_align import checkpoint, losses, sharding
from safety_align.data import packing
from safety_align.data import pipeline as data_pipeline
from safety_align.model import ModelConfig, Transformer, forward_batch, init_params
from safety_align.masks import PHASES, Role, check_phase

SCHEDULES = ("cosine", "step", "constant")
FINITE = "all_finite"  # metrics key: whether the step's loss and gradient norm are finite


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def learning_rate_schedule(phase_cfg) -> optax.Schedule:
  """Warmup + cosine, the paper's step decay (x0.1 at 50% and 75%), or constant."""
  if phase_cfg.schedule not in SCHEDULES:
    raise ValueError(f"schedule={phase_cfg.schedule!r}: expected one of {SCHEDULES}.")
  lr, steps, warmup = phase_cfg.lr, max(phase_cfg.steps, 1), phase_cfg.warmup_steps
  if phase_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * phase_cfg.end_lr_fraction)
  warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
  if phase_cfg.schedule == "step":
    main = optax.piecewise_constant_schedule(
        lr, {max(steps // 2 - warmup, 1): 0.1, max(3 * steps // 4 - warmup, 2): 0.1})
  else:
    main = optax.constant_schedule(lr)
  return optax.join_schedules([warm, main], [warmup])


def decay_mask(params):
  """Weight decay on matrices only: not on norms, biases or (CLS) embeddings."""
  def keep(path, leaf):
    names = [getattr(p, "key", str(p)) for p in path]
    return leaf.ndim >= 2 and not {"embed", "cls_embed"} & set(names)
  return jax.tree_util.tree_map_with_path(keep, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """``optax.clip_by_global_norm`` as one scalar factor, g * min(1, max_norm / ||g||).

  The same clipping (and the same empty state), but a multiply by a scalar fuses into
  AdamW's moment updates, where optax's per-element select-and-divide is written out as a
  clipped copy of the gradients: on XLA:CPU that copy made the 125M model's optimizer update
  2.2x slower (7.5 vs 5.5 GB accessed, ``bench/train.py`` optimizer_update_s).
  """
  def update(updates, state, params=None):
    del params
    factor = jnp.minimum(1.0, max_norm / optax.global_norm(updates))  # norm 0: 1
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


CLS_PARAM_NAMES = ("cls_embed", "cls_head", "cls_gate")  # what the [CLS] branch adds


def param_path(path) -> str:
  """A ``tree_map_with_path`` key path as ``"layers/attn/q_proj/kernel"``."""
  return "/".join(str(getattr(p, "key", p)) for p in path)


def trainable_mask(params, pattern: str):
  """Tree of bools: the parameters whose path matches the regex ``pattern`` (``re.search``;
  "" = all). Raises if it matches none."""
  if not pattern:
    return jax.tree.map(lambda _: True, params)
  regex = re.compile(pattern)
  mask = jax.tree_util.tree_map_with_path(lambda p, _: bool(regex.search(param_path(p))),
                                          params)
  if not any(jax.tree.leaves(mask)):
    names = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    raise ValueError(f"config.<phase>.trainable={pattern!r} matches no parameter; paths look "
                     f"like {names[:4]}.")
  return mask


def scale_by_path(factor) -> optax.GradientTransformation:
  """Multiply each update by ``factor(path)`` (0 freezes a parameter exactly: no step and no
  weight decay)."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda p, u: u * jnp.asarray(factor(param_path(p)), u.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(phase_cfg) -> optax.GradientTransformation:
  """AdamW + clipping, one update per optimiser step (``Trainer`` accumulates the gradients).

  ``phase_cfg.trainable`` (a regex over parameter paths, "" = all) freezes the rest, and
  ``phase_cfg.cls_lr_scale`` multiplies the learning rate of the parameters the [CLS]
  branch adds (freshly initialised in an imported model, so they need a larger step than
  the pretrained weights' fine-tuning rate)."""
  pattern = phase_cfg.get("trainable", "")
  regex = re.compile(pattern) if pattern else None
  cls_scale = phase_cfg.get("cls_lr_scale", 1.0)

  def factor(path: str) -> float:
    if regex is not None and not regex.search(path):
      return 0.0
    return cls_scale if set(path.split("/")) & set(CLS_PARAM_NAMES) else 1.0

  tx = optax.chain(
      clip_by_global_norm(phase_cfg.grad_clip),
      optax.adamw(learning_rate_schedule(phase_cfg), b1=phase_cfg.b1, b2=phase_cfg.b2,
                  weight_decay=phase_cfg.weight_decay, mask=decay_mask))
  if regex is not None or cls_scale != 1.0:
    tx = optax.chain(tx, scale_by_path(factor))
  return tx


def objective(phase_cfg) -> tuple[float, float]:
  """(λ of the main [CLS] term, λ_w of the window [CLS] term) of a phase; ``window_cls_weight``
  defaults to ``cls_weight``."""
  return phase_cfg.cls_weight, phase_cfg.get("window_cls_weight", phase_cfg.cls_weight)


@contextlib.contextmanager
def mesh_context(mesh):
  """Trace the model sharded over ``mesh``: ``jax.set_mesh`` and ``sharding.RULES``, so every
  logical constraint of ``model.py`` (activations; parameters at init) reaches XLA. Flax finds
  the mesh through ``jax.sharding.get_abstract_mesh()``, which a bare ``with mesh:`` leaves
  empty: the constraints would then be silently dropped."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    yield


class Trainer:
  """Sharded init, the jitted train step and its shardings for one phase.

  The step takes ``grad_accum`` micro-batches stacked on a leading axis (``[k, B, T]``
  arrays, rows sharded as a batch's) and makes one optimiser update (module docstring).
  """

  def __init__(self, model_cfg: ModelConfig, phase_cfg, phase: str, mesh):
    check_phase(phase)
    self.model_cfg, self.phase_cfg, self.phase, self.mesh = model_cfg, phase_cfg, phase, mesh
    self.grad_accum = phase_cfg.get("grad_accum", 1)
    self.model = Transformer(model_cfg)
    self.tx = make_optimizer(phase_cfg)
    boxed = jax.eval_shape(functools.partial(init_params, model_cfg), jax.random.key(0))
    self.param_shardings = sharding.logical_sharding(boxed, mesh)
    abstract_params = nn.meta.unbox(boxed)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    self.opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh))
    self.state_shardings = TrainState(step=sharding.replicated(mesh),
                                      params=self.param_shardings,
                                      opt_state=self.opt_shardings)
    self.abstract_params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_params, self.param_shardings)
    self.abstract_opt = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_opt, self.opt_shardings)
    self.batch_sharding = sharding.batch_sharding(mesh)  # one [B, ...] micro-batch
    # [k, B, ...]: the micro-batch axis unsharded, rows as a batch's.
    self.micro_batches_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, *self.batch_sharding.spec))
    self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings,
                                                         self.micro_batches_sharding),
                         out_shardings=(self.state_shardings, sharding.replicated(mesh)),
                         donate_argnums=(0,))

  def init_state(self, rng, params=None) -> TrainState:
    """A fresh state, initialised sharded (never whole on one host), or from ``params``."""
    with mesh_context(self.mesh):
      if params is None:
        params = jax.jit(lambda r: nn.meta.unbox(init_params(self.model_cfg, r)),
                         out_shardings=self.param_shardings)(rng)
      else:
        params = jax.device_put(params, self.param_shardings)
      opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32),
                                          sharding.replicated(self.mesh)),
                      params=params, opt_state=opt_state)

  def abstract_state(self) -> TrainState:
    """The state as sharded ``ShapeDtypeStruct``s (for ``lower`` without any allocation)."""
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32,
                                                sharding=sharding.replicated(self.mesh)),
                      params=self.abstract_params, opt_state=self.abstract_opt)

  def abstract_batch(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """One step's micro-batches (``[grad_accum, batch_size, seq_len]``, packing's dtypes) as
    sharded ``ShapeDtypeStruct``s."""
    shape = (self.grad_accum, batch_size, seq_len)
    out = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.micro_batches_sharding)
           for k in packing.BATCH_KEYS}
    out["lm_mask"] = jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=self.micro_batches_sharding)
    out["cls_window"] = jax.ShapeDtypeStruct(shape + (2,), jnp.int32,
                                             sharding=self.micro_batches_sharding)
    return out

  def lower(self, batch_size: int, seq_len: int):
    """The sharded train step lowered for ``batch_size`` rows of ``seq_len`` per micro-batch
    (``.compile().memory_analysis()`` is the compiler's per-device memory)."""
    with mesh_context(self.mesh):
      return self._step.lower(self.abstract_state(), self.abstract_batch(batch_size, seq_len))

  def _loss(self, params, batch, counts):
    lm_logits, cls_logits = forward_batch(self.model, params, batch, self.phase)
    cls_weight, window_cls_weight = objective(self.phase_cfg)
    return losses.total_loss(lm_logits, cls_logits, batch, self.phase,
                             losses.Objective(cls_weight, window_cls_weight, counts))

  def _grads(self, params, batch, counts):
    """(metrics, gradients) of one micro-batch, each term divided by ``counts``; frozen
    parameters get zeros, their gradient never computed."""
    if not self.phase_cfg.get("trainable", ""):
      (_, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(params, batch, counts)
      return metrics, grads
    mask = trainable_mask(params, self.phase_cfg.trainable)
    train = jax.tree.map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    merge = lambda t: jax.tree.map(lambda m, a, b: a if m else b, mask, t, frozen,  # noqa: E731
                                   is_leaf=lambda x: x is None)
    (_, metrics), grads = jax.value_and_grad(
        lambda t: self._loss(merge(t), batch, counts), has_aux=True)(train)
    return metrics, jax.tree.map(lambda m, g, p: g if m else jnp.zeros_like(p), mask, grads,
                                 params, is_leaf=lambda x: x is None)

  def loss_and_grads(self, params, micro_batches):
    """(metrics, gradients) of one optimiser step's ``[k, B, ...]`` micro-batches: every loss
    term a mean over all ``k·B`` rows (``losses.term_counts`` first), the gradients summed over
    a ``lax.scan`` of the micro-batches in float32. Metrics as ``losses.total_loss``'s, of the
    whole accumulated batch."""
    counts = losses.term_counts(micro_batches, self.phase)
    if self.grad_accum == 1:
      return self._grads(params, jax.tree.map(lambda x: x[0], micro_batches), counts)

    def body(acc, batch):
      metrics, grads = self._grads(params, batch, counts)
      acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
      return acc, metrics
    acc = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    acc = jax.lax.with_sharding_constraint(acc, self.param_shardings)
    acc, metrics = jax.lax.scan(body, acc, micro_batches)
    grads = jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
    return jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics), grads

  def _train_step(self, state: TrainState, micro_batches):
    metrics, grads = self.loss_and_grads(state.params, micro_batches)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics[FINITE] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def step(self, state: TrainState, batch: dict[str, np.ndarray]):
    """One optimiser step on numpy arrays (this host's rows): ``[k, B, T]`` micro-batches
    (``k = grad_accum``), or, with ``grad_accum`` 1, one ``[B, T]`` batch."""
    k = batch["tokens"].shape[0] if batch["tokens"].ndim == 3 else None
    if k is None and self.grad_accum == 1:
      batch = {key: v[None] for key, v in batch.items()}
    elif k != self.grad_accum:
      got = "one [B, T] batch" if k is None else f"{k} micro-batches"
      raise ValueError(f"config.{self.phase}.grad_accum={self.grad_accum}: a step takes "
                       f"{self.grad_accum} micro-batches stacked as [k, B, T] arrays, got "
                       f"{got}: stack them (train_lib.micro_batches) or set grad_accum.")
    with mesh_context(self.mesh):
      batch = {key: _global_array(v, self.micro_batches_sharding) for key, v in batch.items()}
      return self._step(state, batch)


def micro_batches(pipeline, step: int, k: int) -> dict[str, np.ndarray]:
  """The ``k`` micro-batches of optimiser step ``step`` (pipeline batches ``step·k`` to
  ``step·k + k - 1``), stacked: ``[k, B, ...]``."""
  batches = [pipeline.batch(step * k + i) for i in range(k)]
  return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def _global_array(local: np.ndarray, sharding_: jax.sharding.NamedSharding) -> jax.Array:
  if jax.process_count() == 1:
    return jax.device_put(local, sharding_)
  return jax.make_array_from_process_local_data(sharding_, local)


class Interrupted(KeyboardInterrupt):
  """Training stopped by SIGINT (Ctrl-C) after saving; the message says where."""


class _Preemption:
  """Turns SIGTERM (TPU preemption) and SIGINT (Ctrl-C) into a flag the loop checks at step
  boundaries, where it saves and stops. A second Ctrl-C interrupts at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal: signal.Signals | None = None
    self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum)
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


class _FiniteGuard:
  """Checks the steps' ``FINITE`` flags (loss and gradient norm) on host at the log and save
  points, so nothing syncs every step and no non-finite state is ever saved."""

  def __init__(self, phase: str, ckpt: checkpoint.PhaseCheckpointer):
    self.phase, self.ckpt, self.pending = phase, ckpt, []

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, {k: metrics[k] for k in (FINITE, "loss", "grad_norm")}))

  def check(self) -> None:
    """Raise ``NonFiniteError`` naming the first bad step and the last good checkpoint."""
    flags = jax.device_get([m[FINITE] for _, m in self.pending])
    bad = next(((s, m) for (s, m), ok in zip(self.pending, flags) if not ok), None)
    self.pending.clear()
    if bad is None:
      return
    step, metrics = bad
    self.ckpt.wait()
    last = self.ckpt.latest_step()
    good = ("none yet: rerunning starts the phase over" if last is None else
            f"step {last} ({self.ckpt.step_dir(last)}), where rerunning resumes")
    raise checkpoint.NonFiniteError(
        f"{self.phase} step {step}: loss {float(metrics['loss'])}, grad_norm "
        f"{float(metrics['grad_norm'])}: training stopped, nothing saved after it. Last good "
        f"checkpoint: {good}. Lower config.{self.phase}.lr or check that step's data.")


class MetricsLog:
  """metrics.jsonl + TensorBoard summaries (process 0 only); one row per phase and step."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self.path = os.path.join(workdir, "metrics.jsonl")
      self.file = open(self.path, "a")

  def rewind(self, phase: str, step: int) -> None:
    """Drop the rows of ``phase`` after ``step``: a run resuming there logs them again. Torn
    lines (a kill mid-write) go too."""
    if not self.enabled:
      return
    self.file.close()
    with open(self.path) as f:
      lines = f.readlines()
    keep = [line for line in lines if _row_before(line, phase, step)]
    if len(keep) != len(lines):
      with open(self.path + ".tmp", "w") as f:
        f.writelines(keep)
      os.replace(self.path + ".tmp", self.path)
    self.file = open(self.path, "a")

  def write(self, phase: str, step: int, values: dict[str, float]):
    if not self.enabled:
      return
    self.file.write(json.dumps(dict(phase=phase, step=step, **values)) + "\n")
    self.file.flush()
    for k, v in values.items():
      self.writer.add_scalar(f"{phase}/{k}", v, step)

  def close(self):
    if self.enabled:
      self.writer.close()
      self.file.close()


def _row_before(line: str, phase: str, step: int) -> bool:
  try:
    row = json.loads(line)
  except json.JSONDecodeError:
    return False
  return row.get("phase") != phase or row.get("step", 0) <= step


def run_phase(config: ml_collections.ConfigDict, workdir: str, phase: str, pipeline,
              mesh, log: MetricsLog, init_params_=None):
  """Train one phase to ``config.<phase>.steps``, resuming from its newest intact checkpoint.

  Returns the final params, or ``None`` if stopped early by SIGTERM (after saving). Raises
  ``Interrupted`` after saving on SIGINT, ``checkpoint.NonFiniteError`` on a non-finite loss
  or gradient norm (saving nothing from that step on).
  """
  phase_cfg = config[phase]
  model_cfg = ModelConfig.from_config(config.model)
  trainer = Trainer(model_cfg, phase_cfg, phase, mesh)
  ckpt = checkpoint.PhaseCheckpointer(
      workdir, phase, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep,
      async_save=config.checkpoint.async_save)
  model_meta = model_cfg.architecture()
  total, k = phase_cfg.steps, trainer.grad_accum
  preemption = None
  try:
    restored = ckpt.restore_latest(
        trainer.abstract_params, trainer.abstract_opt,
        lambda meta: checkpoint.check_compatible(meta.get("model", {}), model_meta))
    if restored is None:
      state = trainer.init_state(jax.random.key(config.seed), init_params_)
      start = 0
    else:
      start, params, opt_state, meta = restored
      _check_data_position(phase, start, k, meta)
      state = TrainState(step=jax.device_put(jnp.asarray(start, jnp.int32),
                                             sharding.replicated(mesh)),
                         params=params, opt_state=opt_state)
      progress(f"{phase}: resumed from step {start} (data position {meta['data_position']})")
    log.rewind(phase, start)
    guard = _FiniteGuard(phase, ckpt)
    preemption = _Preemption()
    t0, last_log, step, real_tokens = time.time(), time.time(), start, 0
    for step in range(start, total):
      if preemption.signal is not None:
        guard.check()
        if ckpt.latest_step() != step:
          ckpt.save(step, state.params, state.opt_state, _meta(step, k, phase, model_meta),
                    force=True)
        ckpt.wait()
        message = (f"{phase}: {preemption.signal.name} at step {step}/{total}: saved "
                   f"{ckpt.step_dir(step)}; rerun the same command to resume.")
        if preemption.signal == signal.SIGINT:
          raise Interrupted(message)
        progress(message)
        return None
      batch = micro_batches(pipeline, step, k)
      real_tokens += int(np.count_nonzero(batch["roles"] != Role.PAD))
      state, metrics = trainer.step(state, batch)
      done = step + 1
      guard.add(done, metrics)
      if done % config.log_every_steps == 0 or done == total:
        guard.check()
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != FINITE}
        now = time.time()
        # Real (non-padding) tokens of this host's rows, not packed slots.
        values["tokens_per_s"] = real_tokens / max(now - last_log, 1e-9)
        real_tokens = 0
        eta = (now - t0) / (done - start) * (total - done)
        log.write(phase, done, values)
        window = (f"cls_win {values['cls_window_loss']:.4f}  "
                  if values["cls_window_rows"] else "")
        progress(f"{phase} step {done}/{total}  loss {values['loss']:.4f}  "
                 f"lm {values['lm_loss']:.4f}  cls {values['cls_loss']:.4f}  {window}"
                 f"cls_acc {values['cls_accuracy']:.3f}  {values['tokens_per_s']:.0f} tok/s  "
                 f"ETA {eta:.0f}s")
        last_log = now
      if done == total or ckpt.should_save(done):
        guard.check()
        ckpt.save(done, state.params, state.opt_state, _meta(done, k, phase, model_meta),
                  force=done == total)
    ckpt.wait()
  finally:
    if preemption is not None:
      preemption.restore()
    ckpt.close()
  return state.params


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Run every phase of ``config`` in ``workdir``; returns the final params (or None if
  stopped by SIGTERM).

  The config is checked and every phase's data prepared before any training, so a bad
  setting or record fails at once. Raises ``Interrupted`` (after saving) on SIGINT.
  """
  check_config(config)
  model_cfg = ModelConfig.from_config(config.model)
  phases = phase_names(config)
  os.makedirs(workdir, exist_ok=True)
  _check_saved_config(workdir, config, model_cfg)
  checkpoint.write_config(workdir, config)
  tokenizer = data_pipeline.load_tokenizer(config, workdir)
  mesh = sharding.make_mesh(dict(config.mesh))
  pipes = {phase: data_pipeline.make_pipeline(config, phase, tokenizer, model_cfg.cls_id,
                                              workdir) for phase in phases}
  params = _initial_params(config, model_cfg)
  log = MetricsLog(workdir)
  try:
    for phase in phases:
      params = run_phase(config, workdir, phase, pipes[phase], mesh, log, init_params_=params)
      if params is None:
        return None
  finally:
    log.close()
  return params


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raise, before any work, on a setting that would fail late or train silently wrong:
  non-positive steps, batch sizes, lengths or intervals, a negative or non-numeric loss
  weight, a global batch the data-parallel devices do not divide, an unknown over-length
  policy."""
  for phase in phase_names(config):
    if phase not in config:
      raise ValueError(f"config.phases names {phase!r}, but the config has no {phase!r} "
                       f"block: add config.{phase} or drop it from config.phases.")
    for key in ("steps", "batch_size", "grad_accum"):
      _check_positive(f"{phase}.{key}", config[phase].get(key, 1))
    for key, value in zip(("cls_weight", "window_cls_weight"), objective(config[phase])):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"config.{phase}.{key}={value!r}: expected a number >= 0 (the λ of "
                         "its [CLS] loss term).")
  for key in ("data.seq_len", "log_every_steps", "checkpoint.every_steps", "checkpoint.keep"):
    node = config
    for k in key.split("."):
      node = node[k]
    _check_positive(key, node)
  policy = config.data.get("overlong", "drop")
  if policy not in data_pipeline.OVERLONG:
    raise ValueError(f"config.data.overlong={policy!r}: expected one of "
                     f"{data_pipeline.OVERLONG}.")
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(dict(config.mesh),
                                                           jax.device_count())))
  n_data = shape["data"] * shape["fsdp"]
  for phase in phase_names(config):
    batch = config[phase].batch_size
    if batch % n_data:
      raise ValueError(
          f"config.{phase}.batch_size={batch} is not divisible by the {n_data} data-parallel "
          f"devices (mesh data={shape['data']} x fsdp={shape['fsdp']} of "
          f"{jax.device_count()} devices): use a multiple of {n_data}, or set config.mesh.")


def unknown_key(config: ml_collections.ConfigDict, path: str) -> str | None:
  """Why the override ``--config.<path>`` names no field of ``config`` (None if it does), with
  the close matches."""
  node, seen = config, ["config"]
  for key in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return f"--config.{path}: {'.'.join(seen)} is a value, not a group of fields."
    if key not in node:
      if key in OPTIONAL_PHASE_FIELDS and len(seen) == 2 and seen[1] in PHASES:
        return (f"--config.{path}: config.{seen[1]} has no field {key!r}; add "
                f"{key}=... to the config file's phase block (default: "
                f"{OPTIONAL_PHASE_FIELDS[key]}), then override it.")
      keys = sorted(node.keys())
      close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
      hint = (f"did you mean {' or '.join('.'.join(seen + [c]) for c in close)}?" if close
              else f"it has {', '.join(keys)}.")
      return f"--config.{path}: {'.'.join(seen)} has no field {key!r}; {hint}"
    node, seen = node[key], seen + [key]
  return None


# Phase fields train_lib reads with a default, so a config file may lack them: the default.
OPTIONAL_PHASE_FIELDS = {"window_cls_weight": "its cls_weight"}


def _check_positive(key: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"config.{key}={value!r}: expected a whole number >= 1.")


def _initial_params(config, model_cfg: ModelConfig):
  """Params of ``config.init_from`` (an import_hf output or a workdir), or None (random)."""
  if not config.init_from:
    return None
  saved_cfg, params, extra = checkpoint.load_for_inference(config.init_from,
                                                           config.get("init_phase", ""))
  checkpoint.check_compatible(saved_cfg.architecture(), model_cfg.architecture())
  progress(f"init_from {config.init_from}: phase {extra['phase']}, step {extra['step']}")
  return jax.tree.map(lambda x: x.astype(model_cfg.weight_dtype), params)


def _check_saved_config(workdir: str, config, model_cfg: ModelConfig) -> None:
  path = os.path.join(workdir, checkpoint.CONFIG_FILE)
  if os.path.exists(path):
    saved = checkpoint.read_config(workdir)
    checkpoint.check_compatible(
        ModelConfig.from_config(saved["model"]).architecture(), model_cfg.architecture())


def progress(message: str) -> None:
  """A progress line on process 0 (stdout, independent of absl's log verbosity)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def _meta(step: int, grad_accum: int, phase: str, model_meta: dict) -> dict:
  """A checkpoint's metadata; ``data_position``: the next micro-batch's index."""
  return dict(step=step, data_position=step * grad_accum, phase=phase, model=model_meta)


def _check_data_position(phase: str, step: int, grad_accum: int, meta: dict) -> None:
  """Raise if resuming at optimiser step ``step`` would not continue the saved run's data
  (``grad_accum`` changed since the checkpoint was written)."""
  saved = meta.get("data_position", step * grad_accum)
  if saved != step * grad_accum:
    raise ValueError(
        f"{phase}: the checkpoint of step {step} was written at data position {saved} "
        f"(micro-batch), but config.{phase}.grad_accum={grad_accum} resumes at "
        f"{step * grad_accum}: set grad_accum back to {saved // max(step, 1)} or use a fresh "
        "--workdir.")


def phase_names(config) -> list[str]:
  names = [p.strip() for p in config.phases.split(",") if p.strip()]
  for p in names:
    check_phase(p)
  if not names:
    raise ValueError("config.phases is empty: expected e.g. 'pretrain,sft'.")
  return names
