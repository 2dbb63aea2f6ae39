"""The training loop: the config checks, the phase driver and the run of every phase.

A run is one or two phases (``config.phases``, e.g. ``"pretrain,sft"``). Each phase has its
own data, steps, λ and schedule, and its own checkpoints under ``WORKDIR/checkpoints/<phase>``;
the SFT phase starts from the pretraining phase's final parameters with a fresh optimiser. A
run resumes from the newest intact checkpoint of the phase it stopped in; the micro-batch ``m``
is a pure function of ``(seed, m)``, so a resumed run sees exactly the data it would have seen.
A non-finite loss or gradient norm stops the phase before anything from it is saved. The
optimiser is in ``optim``, the sharded state and jitted step (with gradient accumulation) in
``train_step``.
"""

from __future__ import annotations

import difflib
import json
import os
import signal
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from safety_align import checkpoint, console, sharding
from safety_align import workdir as workdir_lib
from safety_align.data import pipeline as data_pipeline
from safety_align.masks import PHASES, Role, check_phase
from safety_align.model import ModelConfig
from safety_align.train_step import FINITE, Trainer, TrainState, micro_batches, objective


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


def train(config: ml_collections.ConfigDict, workdir: str, stated: Iterable[str] = ()) -> dict:
  """Run every phase of ``config`` in ``workdir``; returns the final params (or None if
  stopped by SIGTERM).

  The config is checked and every phase's data prepared before any training, so a bad
  setting or record fails at once. With ``config.init_from`` the architecture is the
  import's (``with_init_architecture``; ``stated``: the config keys the user set explicitly,
  e.g. ``--config.model.n_layers``). Raises ``Interrupted`` (after saving) on SIGINT.
  """
  check_config(config)
  config = with_init_architecture(config, stated)
  model_cfg = ModelConfig.from_config(config.model)
  phases = phase_names(config)
  os.makedirs(workdir, exist_ok=True)
  _check_saved_config(workdir, config, model_cfg)
  workdir_lib.write_config(workdir, config)
  tokenizer = data_pipeline.load_tokenizer(config, workdir)
  mesh = sharding.make_mesh(dict(config.mesh))
  pipes = {phase: data_pipeline.make_pipeline(config, phase, tokenizer, model_cfg.cls_id,
                                              workdir) for phase in phases}
  params = _initial_params(config, model_cfg, tokenizer)
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


# Phase fields training_loop reads with a default, so a config file may lack them: the default.
OPTIONAL_PHASE_FIELDS = {"window_cls_weight": "its cls_weight"}


def _check_positive(key: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"config.{key}={value!r}: expected a whole number >= 1.")


def with_init_architecture(config: ml_collections.ConfigDict,
                           stated: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """``config`` with every architecture field of ``config.model`` (``ModelConfig.
  architecture``: sizes, ``cls_attention_gate``, ``scan_layers``, ...) taken from the
  ``config.init_from`` it starts from, each one that differs from the config's stated in a
  progress line; compute settings (dtype, remat, attention) stay the config's. A field in
  ``stated`` (``model.<field>``, set explicitly by the user) must equal the import's: else
  ``IncompatibleCheckpointError`` naming init_from. ``config`` itself without init_from."""
  if not config.get("init_from"):
    return config
  saved = ModelConfig.from_config(
      workdir_lib.read_config(config.init_from)["model"]).architecture()
  current = ModelConfig.from_config(config.model).architecture()
  explicit = {k.split(".", 1)[1] for k in stated if k.startswith("model.")} & set(saved)
  checkpoint.check_compatible({k: saved[k] for k in explicit},
                              {k: current[k] for k in explicit}, init_from=config.init_from)
  taken = {k: v for k, v in saved.items() if current[k] != v}
  if not taken:
    return config
  progress(f"init_from {config.init_from}: architecture from the import: " + ", ".join(
      f"model.{k}={v!r} (config {current[k]!r})" for k, v in sorted(taken.items())))
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(taken)
  return config


def _initial_params(config, model_cfg: ModelConfig, tokenizer):
  """Params of ``config.init_from`` (an import_hf output or a workdir), or None (random).
  With ``config.init_cls_embed`` (a token of ``tokenizer``), ``cls_embed`` starts as that
  token's embedding row instead of the import's."""
  if not config.init_from:
    return None
  loaded = workdir_lib.load_for_inference(config.init_from, config.get("init_phase", ""))
  checkpoint.check_compatible(loaded.model_config.architecture(), model_cfg.architecture(),
                              init_from=config.init_from)
  progress(f"init_from {config.init_from}: phase {loaded.phase}, step {loaded.step}")
  params = jax.tree.map(lambda x: x.astype(model_cfg.weight_dtype), loaded.params)
  token = config.get("init_cls_embed", "")
  if token:
    ids = tokenizer.encode(token, parse_special=True)
    if len(ids) != 1:
      raise ValueError(f"config.init_cls_embed={token!r} is {len(ids)} tokens of the "
                       "tokenizer, expected one (e.g. the chat template's end-of-turn token).")
    params = dict(params, cls_embed=params["embed"][ids[0]])
    progress(f"init_cls_embed: [CLS] starts as the embedding of {token!r} (id {ids[0]})")
  return params


def _check_saved_config(workdir: str, config, model_cfg: ModelConfig) -> None:
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if os.path.exists(path):
    saved = workdir_lib.read_config(workdir)
    checkpoint.check_compatible(
        ModelConfig.from_config(saved["model"]).architecture(), model_cfg.architecture())


def progress(message: str) -> None:
  """A progress line on process 0 (stdout, independent of absl's log verbosity)."""
  if jax.process_index() == 0:
    console.say(message)


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
