"""Evaluation configs: loading ``configs/eval/<name>.py`` (``get_config(arg)`` files, where the
configs themselves are defined), the checks that need no model, and the gates per attack."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from safety_align.api import SCHEDULES, GateConfig
from safety_align.attacks import judges
from safety_align.attacks.base import GATE_OFF
from safety_align.config_lib import names
from safety_align.eval import benchmarks, competitors, registry

GATED = tuple(s for s in SCHEDULES if s != GATE_OFF)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "eval")


def load(name: str, arg: str = "") -> ml_collections.ConfigDict:
  """``configs/eval/<name>.py``'s ``get_config(arg)`` (``name``: e.g. ``"quick"``, or a path
  to a ``.py`` file), loaded by path."""
  path = name if name.endswith(".py") else os.path.join(CONFIG_DIR, f"{name}.py")
  if not os.path.isfile(path):
    known = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py"))
    raise FileNotFoundError(f"No evaluation config {path}: expected one of {known} or the path "
                            "of a get_config() file.")
  spec = importlib.util.spec_from_file_location(
      f"configs.eval.{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def gate_config(cfg, schedule: str = "annealing") -> GateConfig:
  return GateConfig(schedule=schedule, **dict(cfg.gate))


def gates_for(cfg, attack: str) -> list[str]:
  """Gates an attack runs under on the [CLS] model: off, gate_on (+ schedule baselines)."""
  gates = [GATE_OFF, cfg.gate_on]
  if attack in names(cfg.schedule_attacks):
    gates += [s for s in names(cfg.schedules) if s not in gates]
  return gates


def validate(cfg) -> None:
  """Every config error that can be found without a model (before long work starts)."""
  registry.build_attacks(cfg)
  competitors.chosen(cfg)
  for s in [cfg.gate_on] + names(cfg.schedules) + names(cfg.overhead.schedules):
    if s not in GATED:
      raise ValueError(f"Unknown gate schedule {s!r}: expected one of {GATED}.")
  gate_config(cfg, cfg.gate_on)
  if cfg.gate_calibration not in ("on", "off"):
    raise ValueError(f"gate_calibration must be 'on' (the workdir's calibration.json) or 'off', "
                     f"got {cfg.gate_calibration!r}.")
  judges.refusal_strings(cfg.judge.refusals)
  if cfg.judge.harm not in judges.HARM_JUDGES:
    raise ValueError(f"Unknown judge.harm {cfg.judge.harm!r}: expected one of "
                     f"{judges.HARM_JUDGES}.")
  if cfg.judge.harm in ("model", "either") and not cfg.judge.model_workdir:
    raise ValueError(f"judge.harm={cfg.judge.harm!r} needs judge.model_workdir.")
  if cfg.judge.model_mode not in ("generate", "classify"):
    raise ValueError(f"Unknown judge.model_mode {cfg.judge.model_mode!r}: expected "
                     "'generate' (Llama-Guard verdict) or 'classify' (a trained [CLS] head).")
  if cfg.judge.leak_min_tokens < 1:
    raise ValueError(f"judge.leak_min_tokens must be >= 1, got {cfg.judge.leak_min_tokens}: "
                     "a leak needs text the model wrote itself.")
  benchmarks.check(cfg.benchmarks)
  for field in ("max_new_tokens", "batch_size"):
    if cfg[field] < 1:
      raise ValueError(f"{field} must be >= 1, got {cfg[field]}.")
