"""The Python API of API.md: ``load`` a checkpoint into a ``SafetyModel`` (``safety_model.py``:
``classify``, ``generate`` with the safety gate, ``decode``, ``score``, plain ``lm_logits``, ...),
whose results and argument checks (``Generation``, ``Rendered``, ``check_arg``,
``resolve_gate``) live in ``calls.py``, and the gate's settings (``GateConfig``, ``SCHEDULES``,
``DEFAULT_REFUSAL``); all are importable from here, so no caller above the model object needs
``decode``.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from safety_align import gate_calibration, sharding, workdir
from safety_align.calls import Generation, Rendered, check_arg, resolve_gate
from safety_align.data import chat_templates
from safety_align.data.tokenizer import Tokenizer
from safety_align.decode import SCHEDULES, GateConfig
from safety_align.decode.gate import DEFAULT_REFUSAL
from safety_align.safety_model import SafetyModel

__all__ = ["DEFAULT_REFUSAL", "GateConfig", "Generation", "Rendered", "SCHEDULES", "SafetyModel",
           "check_arg", "load", "resolve_gate"]


def _max_length(config: dict[str, Any], path: str) -> int | None:
  """The context a checkpoint serves: its source's ``max_position_embeddings`` (RoPE), as the
  training config records it (``context_length``, from the import) or an import directory
  holds it (``hf_config``), or the training ``data.seq_len`` if that is longer. A model
  trained from scratch serves its ``data.seq_len``; one fine-tuned from an import by an older
  version (no ``context_length``) falls back to it, with a warning saying how to fix it."""
  seq_len = config.get("data", {}).get("seq_len")
  context = (config.get("context_length")
             or config.get("hf_config", {}).get("max_position_embeddings"))
  if context:
    return max(int(context), seq_len or 0)
  if seq_len and config.get("init_from"):
    logging.warning(
        "%s records no context_length, so it serves its training data.seq_len=%d tokens as its "
        "context: add \"context_length\": N to %s (N: max_position_embeddings in the hf_config "
        "of %s/config.json), or pass max_length=N to sa.load.", path, seq_len,
        os.path.join(path, workdir.CONFIG_FILE), config["init_from"])
  return seq_len


def load(path: str, phase: str | None = None, *, calibrated: bool | None = None,
         **kwargs) -> SafetyModel:
  """A training workdir or an ``import_hf`` directory, with its tokenizer and chat template.

  ``phase``: whose newest intact checkpoint to load. ``None``: a workdir's last phase
  (``config.phases``; refused while it has no checkpoint, e.g. a pretraining model whose SFT
  phase has not run: ``phase="pretrain"`` asks for it), an import directory's "import".
  ``SafetyModel.loaded_from`` (and a log line) says what was loaded. ``kwargs`` go to
  ``SafetyModel`` (e.g. ``gate_defaults``, ``max_length``: default the context the source
  model supports, ``_max_length``).

  ``calibrated``: the gate defaults from ``path/calibration.json`` (``python -m
  safety_align.calibrate``: θ, τ and schedule for an over-refusal budget), recorded in
  ``SafetyModel.calibration``. None (default): when there is one for the loaded checkpoint;
  True: required; False: the uncalibrated ``GateConfig()``. An explicit ``gate_defaults``
  wins.

  ``mesh`` (a ``kwargs`` key): serve across devices. A ``jax.sharding.Mesh`` with axes
  ``data``, ``fsdp``, ``tensor`` (``sharding.make_mesh``), or their sizes, e.g.
  ``mesh=dict(tensor=-1)`` (missing axes 1, one may be -1: the remaining devices). Parameters
  are placed by the training rules (``sharding.RULES``: heads, MLP and vocabulary over
  ``tensor``, ``embed`` over ``fsdp``; a dimension an axis does not divide stays whole) and
  decoding runs sharded (``decode.Decoder``: KV cache heads over ``tensor``, rows over
  ``data``/``fsdp`` when the batch divides them); outputs are the same as on one device. Each
  parameter is restored straight onto its devices' slices. ``None`` (default): one device.
  """
  if phase is not None and (not isinstance(phase, str) or not phase):
    raise TypeError(f"phase must be a phase name such as 'sft' or 'pretrain', or None; got "
                    f"{phase!r}.")
  phase = workdir.serving_phase(path) if phase is None else phase
  kwargs["mesh"] = sharding.as_mesh(kwargs.get("mesh"))
  loaded = workdir.load_for_inference(path, phase, mesh=kwargs["mesh"])
  tokenizer = Tokenizer.load(loaded.tokenizer_path)
  eos_ids = loaded.special_tokens.get("eos_ids") or [tokenizer.eos_id]
  if "max_length" not in kwargs:
    kwargs["max_length"] = _max_length(loaded.config, path)
  kwargs.setdefault("eos_ids", eos_ids)
  kwargs.setdefault("uses_cls", loaded.config.get("use_cls", True))
  loaded_from, calibration = _loaded_from(path, loaded), None
  if "gate_defaults" not in kwargs:
    kwargs["gate_defaults"], calibration = gate_calibration.for_checkpoint(path, loaded_from,
                                                                           calibrated)
  model = SafetyModel(loaded.model_config, loaded.params, tokenizer,
                      chat_templates.get_template(loaded.chat_template), **kwargs)
  model.loaded_from, model.calibration = loaded_from, calibration
  return model


def _loaded_from(path: str, loaded: workdir.Loaded) -> dict:
  """``{"path", "phase", "step", "steps"}`` (``steps``: the phase's configured length, None for
  an import); logs it, and warns if the phase is unfinished."""
  phase, step = loaded.phase, loaded.step
  phase_cfg = loaded.config.get(phase) or {}
  steps = phase_cfg.get("steps")  # optimiser steps, as checkpoints count them
  logging.vlog(1, "Loaded %s: phase %s, step %s.", path, phase, step)
  if steps is not None and step < steps:
    logging.warning("%s: the %s phase is unfinished (step %d of %d): serving its latest "
                    "checkpoint.", path, phase, step, steps)
  return dict(path=os.path.abspath(path), phase=phase, step=step, steps=steps)
