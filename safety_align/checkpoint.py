"""Checkpoints: orbax lives here and nowhere else (the rest of a workdir: ``workdir.py``).

A workdir's ``checkpoints/<phase>/<step>/`` holds ``{params,opt_state,meta}``. Orbax writes
each step into a temporary folder and renames it when complete, so an interrupted save leaves
the previous step loadable. ``meta`` holds the step, the data position, the model config (which a resumed
run checks against its own) and a manifest: each array's dtype, shape and a checksum of its
bits.

Every restore is verified. A step whose files are missing or unreadable, whose arrays do not
match the manifest, or that holds NaN/Inf is *damaged*: loading skips it with a warning that
names it and why, and takes the newest intact step; training also moves it to
``checkpoints/damaged/`` (later saves reuse its step number). If no step is intact, loading
raises rather than starting over. Saving refuses NaN/Inf. Steps saved before manifests
existed load with a note.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


DAMAGED_DIR = "damaged"  # checkpoints/damaged/<phase>_<step>: steps training moved aside
_ITEMS = ("params", "opt_state", "meta")


class IncompatibleCheckpointError(ValueError):
  pass


class DamagedCheckpointError(ValueError):
  """No intact checkpoint: every saved step of a phase is damaged."""


class NonFiniteError(FloatingPointError):
  """NaN or Inf where a checkpoint (or a training step) needs finite values."""


class _Damaged(Exception):
  """One step is damaged; the message says why."""


def phase_dir(workdir: str, phase: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints", phase)


def saved_steps(workdir: str, phase: str) -> list[int]:
  """The step folders of ``phase`` (intact or not), ascending."""
  path = phase_dir(workdir, phase)
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


# --- the manifest: dtype, shape and a checksum per array ---------------------------------------

def _leaf_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _words(x: jax.Array) -> jax.Array:
  """``x``'s bits as uint32 words (narrower types widened, 64-bit ones split in two)."""
  size = jnp.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if size < 4:
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _leaf_check(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(checksum, all finite) of one array. The checksum is ``sum_i (w_i + i) * k_i`` mod 2^32
  over its words ``w`` with odd, position-dependent ``k_i``: a flipped bit always changes it, and
  no reshape is needed, so a sharded array is summed where it lies."""
  words = _words(x)
  index, stride = jnp.zeros(words.shape, jnp.uint32), 1
  for d in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, d) * jnp.uint32(
        stride % 2**32)
    stride *= words.shape[d]
  digest = jnp.sum((words + index) * (index * jnp.uint32(0x9E3779B1) | 1), dtype=jnp.uint32)
  finite = jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return digest, finite


_check_tree = jax.jit(lambda tree: jax.tree.map(_leaf_check, tree))


def _host(x) -> np.ndarray:
  return np.asarray(x.addressable_data(0))  # replicated scalars, on any host


def manifest(tree) -> tuple[dict, list[str]]:
  """(``{name: [dtype, shape, checksum]}``, names of the arrays holding NaN/Inf) of a tree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  checks = jax.tree.leaves(jax.tree.map(_host, _check_tree(tree)))
  out, nonfinite = {}, []
  for (path, x), digest, finite in zip(leaves, checks[0::2], checks[1::2]):
    name = _leaf_name(path)
    out[name] = [jnp.dtype(x.dtype).name, list(x.shape), f"{int(digest):08x}"]
    if not finite:
      nonfinite.append(name)
  return out, nonfinite


def named_leaves(tree) -> dict[str, Any]:
  return {_leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def few(names: list[str]) -> str:
  return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _save_manifest(items: dict, what: str) -> dict:
  """``{item: manifest}`` of the arrays about to be saved; raises on NaN/Inf."""
  out, bad = {}, []
  for item, tree in items.items():
    out[item], nonfinite = manifest(tree)
    bad += [f"{item}/{n}" for n in nonfinite]
  if bad:
    raise NonFiniteError(f"Refusing to save {what}: NaN or Inf in {few(bad)}.")
  return out


# --- restoring one step, verified --------------------------------------------------------------

def _root_cause(e: BaseException) -> str:
  """The innermost error's first line, without TensorStore's long spec dumps."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
  return text if len(text) <= 240 else text[:237] + "..."


def _restore_step(manager: ocp.CheckpointManager, step_dir: str, step: int,
                  targets: dict[str, Any], check_meta: Callable[[dict], None]):
  """(arrays ``{item: tree}``, meta) of one step, verified against its manifest.

  ``targets``: item -> abstract tree to restore onto (``None``: as saved). Raises ``_Damaged``;
  ``check_meta`` raises ``IncompatibleCheckpointError`` for a step of another config.
  """
  if not os.listdir(step_dir):
    raise _Damaged("the step folder is empty")
  for item in ("meta", *targets):
    if not os.path.isdir(os.path.join(step_dir, item)):
      raise _Damaged(f"{item}/ is missing")
  for item in targets:
    if not os.path.isfile(os.path.join(step_dir, item, "_METADATA")):
      raise _Damaged(f"{item}/_METADATA is missing")
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  except Exception as e:  # noqa: BLE001  (any unreadable meta is damage)
    raise _Damaged(f"meta is unreadable ({_root_cause(e)})") from None
  if not isinstance(meta, dict) or "step" not in meta:
    raise _Damaged("meta holds no checkpoint metadata")
  check_meta(meta)
  saved = meta.get("manifest")
  if saved is None:
    logging.warning("Checkpoint %s has no checksum manifest (saved by an older version): "
                    "loaded it checking only that its values are finite.", step_dir)
  args, casts = {}, {}
  for item, target in targets.items():
    if target is not None and saved is not None:
      target, casts[item] = _saved_dtypes(item, target, saved.get(item, {}))
    args[item] = (ocp.args.StandardRestore(target) if target is not None
                  else ocp.args.StandardRestore())
  try:
    out = manager.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # noqa: BLE001  (missing or corrupted array files)
    raise _Damaged(f"array files corrupt or unreadable ({_root_cause(e)})") from None
  arrays = {item: out[item] for item in targets}
  _verify(arrays, saved)
  for item, dtypes in casts.items():  # e.g. config.model.param_dtype changed since the save
    arrays[item] = jax.tree.map(lambda x, d: x if x.dtype == d else x.astype(d),
                                arrays[item], dtypes)
  return arrays, meta


def _saved_dtypes(item: str, target, saved: dict):
  """(``target`` in the dtypes it was saved in, the target's dtypes); raises if the saved
  arrays are not the target's (another optimiser or model config)."""
  want = {n: list(t.shape) for n, t in named_leaves(target).items()}
  have = {n: shape for n, (_, shape, _) in saved.items()}
  if want != have:
    diffs = sorted(set(want) ^ set(have)) or [n for n in want if want[n] != have[n]]
    raise IncompatibleCheckpointError(
        f"The checkpoint's {item} does not match this run's (e.g. {few(diffs)}): the model or "
        "the optimiser settings (trainable, cls_lr_scale, grad_accum) changed since it was "
        "saved. Use a fresh --workdir, or set them back.")
  dtypes = jax.tree.map(lambda t: t.dtype, target)
  as_saved = jax.tree_util.tree_map_with_path(
      lambda p, t: jax.ShapeDtypeStruct(t.shape, jnp.dtype(saved[_leaf_name(p)][0]),
                                        sharding=t.sharding), target)
  return as_saved, dtypes


def _verify(arrays: dict, saved: dict | None) -> None:
  """Raise ``_Damaged`` unless the arrays match the saved manifest and are finite."""
  for item, tree in arrays.items():
    got, nonfinite = manifest(tree)
    if saved is not None:
      want = saved.get(item, {})
      bad = [n for n in want if got.get(n) != want[n]] + sorted(set(got) - set(want))
      if bad:
        raise _Damaged(f"checksum mismatch in {item}/{few(bad)} (corrupted files)")
    if nonfinite:
      raise _Damaged(f"NaN or Inf in {item}/{few(nonfinite)}")


def _newest_intact(manager, directory: str, targets: dict, check_meta):
  """(step, arrays, meta, damaged newer steps [(step, reason)]) of the newest intact step of
  ``manager``, or None if it has no steps. Raises ``DamagedCheckpointError`` if none is
  intact."""
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      arrays, meta = _restore_step(manager, os.path.join(directory, str(step)), step, targets,
                                   check_meta)
    except _Damaged as e:
      damaged.append((step, str(e)))
      continue
    return step, arrays, meta, damaged
  if not damaged:
    return None
  raise DamagedCheckpointError(
      f"No intact checkpoint in {directory}: "
      + "; ".join(f"step {s}: {why}" for s, why in damaged)
      + ". Restore those files from a backup, or move the folder aside to start the phase "
      "over.")


class PhaseCheckpointer:
  """Interval saves (with manifests), keep-last-N and verified resume for one phase."""

  def __init__(self, workdir: str, phase: str, *, every_steps: int, keep: int,
               async_save: bool = True):
    self.phase, self.directory = phase, phase_dir(workdir, phase)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps, max_to_keep=keep,
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, params, opt_state, meta: dict, *, force: bool = False) -> bool:
    """Save if ``step`` is on the interval (or ``force``); returns whether it saved. Raises
    ``NonFiniteError`` (writing nothing) if a value is NaN or Inf."""
    if not force and not self.should_save(step):
      return False
    meta = dict(meta, manifest=_save_manifest(dict(params=params, opt_state=opt_state),
                                              f"{self.phase} step {step}"))
    return self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)), force=force)

  def restore_latest(self, abstract_params, abstract_opt_state,
                     check_meta: Callable[[dict], None]):
    """(step, params, opt_state, meta) of the newest intact step, or None if none was saved.

    Restores onto the given ``jax.ShapeDtypeStruct`` trees (with shardings). ``check_meta``
    raises for a step of an incompatible config. Damaged newer steps are moved to
    ``checkpoints/damaged/``, each with a warning; if no step is intact, raises
    ``DamagedCheckpointError`` and moves nothing.
    """
    found = _newest_intact(self.manager, self.directory,
                           dict(params=abstract_params, opt_state=abstract_opt_state),
                           check_meta)
    if found is None:
      return None
    step, arrays, meta, damaged = found
    for bad, why in damaged:
      dest = self._move_aside(bad, why)
      logging.warning("%s: checkpoint step %d (%s) is damaged: %s. Moved it to %s; resuming "
                      "from step %d.", self.phase, bad, self.step_dir(bad), why, dest, step)
    if damaged:
      self.manager.reload()
    return step, arrays["params"], arrays["opt_state"], meta

  def _move_aside(self, step: int, why: str) -> str:
    base = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR, f"{self.phase}_{step}")
    dest, n = base, 1
    while os.path.exists(dest):
      dest, n = f"{base}.{n}", n + 1
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      os.rename(self.step_dir(step), dest)
      with open(os.path.join(dest, "DAMAGED.txt"), "w") as f:
        f.write(why + "\n")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"move aside {dest}")
    return dest

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def save_params(directory: str, phase: str, params, meta: dict) -> None:
  """Write params alone as step 0 of ``phase`` (e.g. an imported HF checkpoint)."""
  ckpt = PhaseCheckpointer(directory, phase, every_steps=1, keep=1, async_save=False)
  meta = dict(meta, manifest=_save_manifest(dict(params=params), f"{phase} parameters"))
  ckpt.manager.save(0, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)), force=True)
  ckpt.wait()
  ckpt.close()


def latest_params(directory: str, phases: tuple[str, ...], abstract_params=None,
                  check_meta: Callable[[dict], None] = lambda meta: None):
  """Params of the newest intact checkpoint of the first phase in ``phases`` that has one.

  Damaged steps are skipped (not moved), each with a warning. Returns (params, meta, phase).
  Raises ``FileNotFoundError`` naming what was looked for, ``DamagedCheckpointError`` if the
  phase's steps are all damaged (never falling back to another phase).
  """
  for phase in phases:
    path = phase_dir(directory, phase)
    if not saved_steps(directory, phase):
      continue
    manager = ocp.CheckpointManager(path, item_names=_ITEMS)
    try:
      step, arrays, meta, damaged = _newest_intact(manager, path,
                                                   dict(params=abstract_params), check_meta)
    finally:
      manager.close()
    for bad, why in damaged:
      logging.warning("Checkpoint %s (step %d) is damaged: %s. Loading step %d instead.",
                      os.path.join(path, str(bad)), bad, why, step)
    return arrays["params"], meta, phase
  raise no_checkpoint(directory, phases)


def no_checkpoint(directory: str, phases) -> FileNotFoundError:
  """The error for a ``directory`` with no checkpoint of any of ``phases``."""
  return FileNotFoundError(
      f"No checkpoint under {os.path.abspath(directory)}/checkpoints/{{{','.join(phases)}}}: "
      "train first (python -m safety_align.train --workdir=...) or import one "
      "(python -m safety_align.convert import_hf --out=...).")


def check_compatible(saved: dict, current: dict, what: str = "model",
                     init_from: str = "") -> None:
  """Raise naming every field of ``what`` that differs between a checkpoint and this run:
  the workdir's, or with ``init_from`` the one the run starts from."""
  source = "init_from" if init_from else "checkpoint"
  diffs = [f"{what}.{k}: {source}={saved.get(k)!r} vs config={current.get(k)!r}"
           for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  if diffs and init_from:
    raise IncompatibleCheckpointError(
        f"init_from={init_from} has a different architecture than the config sets:\n  "
        + "\n  ".join(diffs)
        + "\nDrop those --config.model overrides (the run takes its architecture from "
        "init_from), or point init_from at an import of that architecture.")
  if diffs:
    raise IncompatibleCheckpointError(
        "The checkpoint in this workdir comes from an incompatible config:\n  "
        + "\n  ".join(diffs)
        + "\nUse a fresh --workdir, or override the config to match the checkpoint.")
