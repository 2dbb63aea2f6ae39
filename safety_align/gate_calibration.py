"""calibration.json: the gate settings ``python -m safety_align.calibrate`` chose for a
workdir's checkpoint, and how loading and evaluation read them.

``DIR/calibration.json`` (``FILE``) holds the chosen ``gate`` ({schedule, threshold, tau}), the
budget, the checkpoint it was calibrated on (``{"phase", "step"}``), the data and the figures
(``calibrate.py`` writes it). ``sa.load`` reads it through ``for_checkpoint`` (its
``gate_defaults``); ``calibrated=False`` / ``--gate_calibration=off`` ignores it.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import logging

from safety_align.data import json_files
from safety_align.decode import GateConfig

FILE = "calibration.json"
FORMAT = 1
CALIBRATED = ("schedule", "threshold", "tau")
_RERUN = "rerun `python -m safety_align.calibrate --workdir={}`"
_OFF = "or load uncalibrated (calibrated=False, --gate_calibration=off)"


def path(workdir: str) -> str:
  return os.path.join(workdir, FILE)


def write(workdir: str, calibration: dict) -> None:
  json_files.write_json(path(workdir), calibration, indent=2)


def read(workdir: str) -> dict | None:
  """``workdir``'s calibration (None if it has none), checked; a malformed file is a
  ``ValueError`` naming it."""
  target = path(workdir)
  if not os.path.exists(target):
    return None
  fix = f"{_RERUN.format(workdir)} {_OFF}"
  try:
    with open(target, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{target}: malformed JSON ({e}); {fix}.") from None
  gate = data.get("gate") if isinstance(data, dict) else None
  ckpt = data.get("checkpoint") if isinstance(data, dict) else None
  if (not isinstance(gate, dict) or set(gate) != set(CALIBRATED) or not isinstance(ckpt, dict)
      or not isinstance(ckpt.get("phase"), str) or not isinstance(ckpt.get("step"), int)):
    raise ValueError(f"{target}: expected {{\"gate\": {{{', '.join(CALIBRATED)}}}, "
                     f"\"checkpoint\": {{\"phase\", \"step\"}}, ...}}; {fix}.")
  try:
    gate_config(data)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{target}: invalid gate settings {gate} ({e}); {fix}.") from None
  return data


def gate_config(calibration: dict, base: GateConfig = GateConfig()) -> GateConfig:
  """``base`` with the calibrated schedule, θ and τ."""
  gate = calibration["gate"]
  if isinstance(gate["tau"], bool) or not isinstance(gate["tau"], int):
    raise TypeError(f"tau must be a whole number, got {gate['tau']!r}")
  if gate["schedule"] == "off":
    raise ValueError("a calibrated schedule cannot be 'off'")
  return dataclasses.replace(base, schedule=gate["schedule"], threshold=float(gate["threshold"]),
                             tau=gate["tau"])


def for_checkpoint(workdir: str, loaded_from: dict,
                   calibrated: bool | None) -> tuple[GateConfig, dict | None]:
  """(gate defaults, calibration or None) for the checkpoint ``loaded_from`` of ``workdir``.

  ``calibrated``: None uses the calibration when there is one for this checkpoint (a stale one,
  written for another phase or step, is ignored with a warning); True requires it; False
  ignores the file (the uncalibrated ``GateConfig()``)."""
  if calibrated is False:
    return GateConfig(), None
  calibration = read(workdir)
  fix = _RERUN.format(workdir)
  if calibration is None:
    if calibrated:
      raise FileNotFoundError(f"{path(workdir)} not found: calibrated=True needs a calibration; "
                              f"{fix}.")
    return GateConfig(), None
  was = calibration["checkpoint"]
  if (was["phase"], was["step"]) != (loaded_from["phase"], loaded_from["step"]):
    stale = (f"{path(workdir)} was calibrated on {was['phase']} step {was['step']}, but "
             f"{loaded_from['phase']} step {loaded_from['step']} is loaded")
    if calibrated:
      raise ValueError(f"{stale}: {fix}.")
    logging.warning("%s: using the uncalibrated gate; %s.", stale, fix)
    return GateConfig(), None
  return gate_config(calibration), calibration


def eval_config(cfg, calibration: dict | None):
  """An evaluation config with the calibrated schedule as ``gate_on`` and its θ, τ in
  ``gate`` (a copy); ``cfg`` itself without a calibration."""
  if calibration is None:
    return cfg
  cfg = cfg.copy_and_resolve_references()
  gate = calibration["gate"]
  cfg.gate_on = gate["schedule"]
  cfg.gate.threshold, cfg.gate.tau = float(gate["threshold"]), int(gate["tau"])
  return cfg


def summary(workdir: str, calibration: dict | None) -> dict | None:
  """What a results file records of the calibration in use (None: uncalibrated)."""
  if calibration is None:
    return None
  return dict(path=os.path.abspath(path(workdir)),
              **{k: calibration.get(k) for k in ("gate", "budget", "budget_met", "checkpoint",
                                                 "confirmed")},
              data={k: calibration.get("data", {}).get(k) for k in ("files", "n_benign",
                                                                     "n_malicious")})
