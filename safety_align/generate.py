"""``python -m safety_align.generate --workdir=DIR --prompt="..." [--gate=annealing]
[--gate_calibration=off]``.

Prints the response, whether the gate refused (and at which response token), the gate settings
(the workdir's calibration unless ``--gate_calibration=off``) and the [CLS] trace:
P(malicious) at each evaluation (step 0 is the query's classification). The numeric
flags are checked by the Python API's own checks, so both give the same errors.
"""

from __future__ import annotations

import sys

from absl import app, flags

from safety_align import api, console
from safety_align.decode import SCHEDULES


class _ApiNumber(flags.ArgumentParser):
  """A number flag checked by ``api.check_arg`` (the wording of ``SafetyModel.generate``)."""

  syntactic_help = "a number"

  def __init__(self, name: str):
    self.name = name

  def parse(self, argument):
    value = argument
    if isinstance(argument, str):
      for kind in (int, float):
        try:
          value = kind(argument)
          break
        except ValueError:
          continue
    api.check_arg(self.name, value)
    return value


def _number(name: str, default, help_: str):
  return flags.DEFINE(_ApiNumber(name), name, default, help_)


_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or import_hf directory.")
_PHASE = flags.DEFINE_string("phase", "", "Phase to load ('' = the run's last phase; "
                             "'pretrain' asks for the pretraining model).")
_PROMPT = flags.DEFINE_string("prompt", None, "The user's request.")
_GATE = flags.DEFINE_enum("gate", None, SCHEDULES,
                          "Re-classification schedule ('off': the gate never acts; "
                          "api.resolve_gate; default: the model's, calibrated or annealing).")
_CALIBRATION = flags.DEFINE_enum("gate_calibration", "on", ["on", "off"],
                                 "on: θ, τ and schedule from DIR/calibration.json when it has "
                                 "one for the checkpoint; off: the uncalibrated defaults.")
_MAX_NEW = _number("max_new_tokens", 64, "Tokens to generate after the prefill.")
_TEMPERATURE = _number("temperature", 0.0, "0 = greedy.")
_TOP_K = _number("top_k", 0, "Sample from the k most likely tokens (0 = all).")
_TOP_P = _number("top_p", 1.0, "Nucleus sampling mass, in (0, 1].")
_SEED = _number("seed", 0, "Sampling seed.")
_PREFILL = flags.DEFINE_string("prefill", "", "Text forced at the start of the response.")


def report(model: api.SafetyModel, prompt: str, *, prefill: str = "", **settings) -> str:
  """The printed report of one generation."""
  gen = model.generate([prompt], prefill=[prefill] if prefill else None, **settings)[0]
  if gen.refused:
    where = model.tokenizer.decode(gen.tokens[:gen.refusal_step])
    verdict = (f"refused: yes, prefix inserted at response token {gen.refusal_step} "
               f"(after {where!r})")
  else:
    verdict = "refused: no"
  if settings.get("gate") == "off":
    gate = "gate: off"
  else:
    gate = (f"gate: {gen.gate.schedule}, θ {gen.gate.threshold:.4g}, τ {gen.gate.tau}"
            + (f" (calibrated: {model.loaded_from['path']}/calibration.json)"
               if model.calibration else ""))
  trace = "\n".join(f"  step {s:4d}: P(malicious) = {p:.4f}"
                    for s, p in zip(gen.cls_steps, gen.cls_probs)) or "  (gate off)"
  return f"{gen.text}\n\n{verdict}\n{gate}\n[CLS] trace:\n{trace}"


def main(argv):
  del argv
  console.configure()
  try:
    model = api.load(_WORKDIR.value, phase=_PHASE.value or None,
                     calibrated=None if _CALIBRATION.value == "on" else False)
    source = model.loaded_from
    print(f"loaded {source['path']}: phase {source['phase']}, step {source['step']}",
          file=sys.stderr)
    print(report(model, _PROMPT.value, prefill=_PREFILL.value, gate=_GATE.value,
                 max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                 top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value))
  except (ValueError, OSError) as e:  # a bad prompt or workdir: the sentence, no traceback
    sys.exit(f"generate: {e}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "prompt"])
  app.run(main)
