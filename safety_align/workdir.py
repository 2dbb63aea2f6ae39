"""The workdir format: what a training workdir or an import directory holds besides orbax.

A directory ``sa.load`` reads holds ``config.json`` (a training run's config, or an import's
``{"format", "family", "model", "chat_template", "special_tokens", "hf_config"}``),
``tokenizer.json`` (+ ``tokenizer_config.json``) and ``checkpoints/<phase>/<step>/``, which
``checkpoint.py`` writes and verifies. This module reads and writes ``config.json``, decides
which phase serves, and loads a checkpoint for inference as a typed :class:`Loaded`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from safety_align import checkpoint
from safety_align import sharding
from safety_align.data import json_files
from safety_align.model import ModelConfig, init_params

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# A workdir's phases, most trained first: ``load_for_inference`` (phase "") loads the first one
# that has a checkpoint.
INFERENCE_PHASES = ("sft", "pretrain", "import")


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A checkpoint loaded for inference (``load_for_inference``)."""

  model_config: ModelConfig
  params: Any                # unboxed parameter tree of ``model_config``
  tokenizer_path: str        # the directory's tokenizer.json
  chat_template: str         # a built-in template name or Jinja text
  special_tokens: dict       # an import's {bos_id, eos_ids, pad_id, ...}; {} for a workdir
  phase: str                 # the phase whose checkpoint was loaded
  step: int                  # its step
  config: dict               # the directory's config.json


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Write the run config as JSON, atomically."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  json_files.write_atomic(path, config.to_json_best_effort(indent=2))


def write_import(out: str, model_config: ModelConfig, params, tokenizer, chat_template: str,
                 seq_len: int) -> str:
  """Write ``params`` of ``model_config`` as a loadable directory (as ``convert.import_hf``
  writes one: phase ``import``, ``tokenizer`` saved beside it, ``chat_template`` a built-in
  name or Jinja text, ``seq_len`` the context it serves); ``out`` must not exist yet."""
  os.makedirs(out)
  tokenizer.save(os.path.join(out, TOKENIZER_FILE))
  tokenizer.save_special_tokens(os.path.join(out, "tokenizer_config.json"))
  model = dataclasses.asdict(model_config)
  checkpoint.save_params(out, "import", params, dict(step=0, phase="import", model=model))
  with open(os.path.join(out, CONFIG_FILE), "w") as f:
    json.dump(dict(model=model, chat_template=chat_template, data=dict(seq_len=seq_len)), f)
  return out


def read_config(workdir: str) -> dict:
  """``workdir``'s ``config.json``; raises naming the file if it is missing or malformed."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a safety_align workdir or "
                            "import directory.")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); it is written by "
                       "training or import: restore it from the run.") from None


def run_phases(config: dict) -> list[str]:
  """A workdir's ``config.phases`` in order ([] for an import directory)."""
  return [p.strip() for p in str(config.get("phases", "")).split(",") if p.strip()]


def serving_phase(path: str) -> str:
  """The phase ``sa.load`` serves by default: a workdir's last phase (``config.phases``), else
  (an import directory) the most trained one it has. Raises if a workdir's last phase has no
  checkpoint yet, naming the phase that has one (which ``sa.load(path, phase=...)`` still
  serves when asked)."""
  phases = run_phases(read_config(path))
  if not phases:
    have = [p for p in INFERENCE_PHASES if checkpoint.saved_steps(path, p)]
    if not have:
      raise checkpoint.no_checkpoint(path, INFERENCE_PHASES)
    return have[0]
  last = phases[-1]
  if checkpoint.saved_steps(path, last):
    return last
  trained = [p for p in phases[:-1] if checkpoint.saved_steps(path, p)]
  if not trained:
    raise checkpoint.no_checkpoint(path, phases)
  done = trained[-1]
  raise FileNotFoundError(
      f"{path}: the run's last phase {last!r} has no checkpoint yet (config.phases="
      f"{','.join(phases)!r}); the newest checkpoint is {done!r} step "
      f"{checkpoint.saved_steps(path, done)[-1]}. Resume training to finish {last!r}, or ask "
      f"for the {done} model explicitly: sa.load(path, phase={done!r}) (CLI: --phase={done}).")


def _check_config_json(path: str, saved_model: dict | None, model_cfg: ModelConfig) -> None:
  """Raise naming each model field of ``config.json`` that differs from the one the
  parameters were saved with."""
  current = model_cfg.architecture()
  diffs = [f"model.{k}={current[k]!r} (the parameters were saved with {saved_model[k]!r})"
           for k in current if saved_model and k in saved_model and saved_model[k] != current[k]]
  if diffs:
    raise checkpoint.IncompatibleCheckpointError(
        f"{os.path.join(path, CONFIG_FILE)} does not match its checkpoint: {'; '.join(diffs)}. "
        "The file was edited or copied from another run: set those fields back.")


def _check_shapes(path: str, params, model_cfg: ModelConfig) -> None:
  """Raise naming the parameters whose shapes differ from ``config.json``'s model."""
  boxed = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0)))
  want = {n: tuple(x.shape) for n, x in checkpoint.named_leaves(nn.meta.unbox(boxed)).items()}
  have = {n: tuple(x.shape) for n, x in checkpoint.named_leaves(params).items()}
  diffs = [f"{n}: checkpoint {have.get(n)} vs config {want.get(n)}"
           for n in sorted(set(want) | set(have)) if want.get(n) != have.get(n)]
  if diffs:
    raise checkpoint.IncompatibleCheckpointError(
        f"{os.path.join(path, CONFIG_FILE)}'s model block does not describe the checkpoint's "
        f"parameters ({checkpoint.few(diffs)}): restore the model block the run was trained "
        "with.")


def load_for_inference(path: str, phase: str = "", mesh: Mesh | None = None) -> Loaded:
  """The :class:`Loaded` checkpoint of a workdir or an ``import_hf`` directory.

  ``phase`` picks one phase's newest intact checkpoint ("" = the most trained one there is).
  ``config.json``'s model is checked against the parameters, naming the fields that differ.
  ``mesh``: restore each parameter straight onto its ``sharding.param_shardings`` placement
  (each device reads only its slices; no whole copy on one device), in ``config.json``'s
  parameter dtype; ``None``: as saved, on the default device.
  """
  config = read_config(path)
  model_cfg = ModelConfig.from_config(config["model"])
  targets = None
  if mesh is not None:
    abstract = jax.eval_shape(lambda: nn.meta.unbox(init_params(model_cfg, jax.random.key(0))))
    targets = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           abstract, sharding.param_shardings(model_cfg, mesh, abstract))
  params, meta, phase = checkpoint.latest_params(
      path, (phase,) if phase else INFERENCE_PHASES, abstract_params=targets,
      check_meta=lambda m: _check_config_json(path, m.get("model"), model_cfg))
  _check_shapes(path, params, model_cfg)
  return Loaded(
      model_config=model_cfg, params=jax.tree.map(jax.numpy.asarray, params),
      tokenizer_path=os.path.join(path, TOKENIZER_FILE),
      chat_template=(config.get("chat_template")  # import_hf output
                     or config.get("data", {}).get("chat_template", "demo")),
      special_tokens=config.get("special_tokens", {}), phase=phase, step=meta.get("step"),
      config=config)
