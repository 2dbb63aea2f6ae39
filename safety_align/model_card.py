"""``MODEL_CARD.md`` beside a trained model: where it came from, what it learned from, how it was
trained, what it measured and where it stops.

Every fact is read from the run itself: the source model and each data package from their
pinned wheels (licence from the wheel's own metadata: ``License-Expression``, ``License`` or the
licence classifier; "not stated" when the wheel says nothing), the recipe from the workdir's
``config.json``, the gate from ``calibration.json`` when the run was calibrated, the figures from
``report.json`` and ``eval/results.json`` (95% Wilson intervals where the evaluation wrote them).
"""

from __future__ import annotations

import email.parser
import json
import os
import zipfile
from typing import Mapping, Sequence

from safety_align.data import json_files

CARD_FILE = "MODEL_CARD.md"
LIMITS = (
    "English only: every training and test prompt is English.",
    "135M parameters, trained for a few hundred CPU steps: a demonstration of the method at "
    "small scale, not a production safety filter.",
    "Judged by refusal, not by a harm classifier: on real text an attack succeeds when the "
    "model does not refuse or writes at least `judge.leak_min_tokens` tokens of its own before "
    "the gate inserts its refusal. A response that refuses in words but helps anyway can be "
    "missed; `judge.harm=model` with Llama-Guard-3 is the stronger judge where it can run.",
    "Held-out figures are on the sources named as test sources below; other prompt "
    "distributions (other languages, long multi-turn chats, new jailbreak styles) can differ.",
)


def wheel_licence(path: str) -> str:
  """The licence a wheel's METADATA states, or "not stated in its metadata"."""
  with zipfile.ZipFile(path) as wheel:
    name = next((n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")), None)
    if name is None:
      return "not stated in its metadata"
    meta = email.parser.Parser().parsestr(wheel.read(name).decode("utf-8", "replace"))
  for field in ("License-Expression", "License"):
    value = (meta.get(field) or "").strip()
    if value and "\n" not in value and len(value) < 80:
      return value
  classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                 if c.startswith("License ::")]
  return ", ".join(classifiers) or "not stated in its metadata"


def _pct(value, ci) -> str:
  if value is None or value != value:  # None or NaN
    return "–"
  text = f"{100 * value:.1f}%"
  if ci and len(ci) == 2 and None not in ci:
    text += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
  return text


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _figures(report: Mapping, results: Mapping) -> list[str]:
  lines = []
  for split, m in report.get("classifier", {}).items():
    if isinstance(m, dict) and "auroc" in m:
      lines.append(f"- `[CLS]` first classification, {split.replace('_', ' ')}: AUROC "
                   f"{m['auroc']:.3f}, accuracy {_pct(m.get('accuracy'), m.get('accuracy_ci'))}"
                   f" (n = {m.get('n', '?')})")
  c = results.get("classifier", {})
  if "test_cross_source" not in report.get("classifier", {}) and c.get("auroc") is not None:
    lines.append(f"- `[CLS]` first classification, held-out sources (the evaluation): AUROC "
                 f"{c['auroc']:.3f}, accuracy {_pct(c.get('accuracy'), c.get('accuracy_ci'))}"
                 f" (n = {c.get('n', '?')})")
  attacks = results.get("attacks", {})
  if attacks:
    lines += ["", "| attack | n | ASR gate off | ASR gate on | refused (gate on) |",
              "| --- | --- | --- | --- | --- |"]
    for name, a in attacks.items():
      lines.append(f"| {name} | {a.get('n', '?')} | "
                   f"{_pct(a.get('asr_gate_off'), a.get('asr_gate_off_ci'))} | "
                   f"{_pct(a.get('asr_gate_on'), a.get('asr_gate_on_ci'))} | "
                   f"{_pct(a.get('refused_gate_on'), a.get('refused_gate_on_ci'))} |")
  benign = results.get("benign")
  if benign:
    lines += ["", f"- Over-refusal on held-out safe prompts (n = {benign.get('n', '?')}): gate "
              f"on {_pct(benign.get('over_refusal_gate_on'), benign.get('over_refusal_gate_on_ci'))}"
              f", gate off {_pct(benign.get('over_refusal_gate_off'), benign.get('over_refusal_gate_off_ci'))}"]
  for task, u in results.get("utility_benchmarks", {}).items():
    if isinstance(u, dict) and "acc" in u:
      lines.append(f"- {task}: acc {_pct(u['acc'], u.get('acc_ci'))}"
                   + (f", n = {u['n']}" if "n" in u else ""))
  return lines or ["- No evaluation has been run in this workdir yet."]


def render(workdir: str, *, source: Mapping[str, str], sources: Sequence[Mapping[str, str]]) -> str:
  """The card's markdown. ``source``: ``{name, package, version, licence, member}`` of the model
  the run started from; ``sources``: one ``{name, package, version, licence, role}`` per data
  source (role: train / validation / test)."""
  config = _read_json(os.path.join(workdir, "config.json"))
  report = _read_json(os.path.join(workdir, "report.json"))
  results = _read_json(os.path.join(workdir, "eval", "results.json"))
  calibration = _read_json(os.path.join(workdir, "calibration.json"))
  model = config.get("model", {})
  lines = [f"# Model card: {os.path.basename(os.path.abspath(workdir))}", "",
           "## Model",
           f"- Source: {source['name']} ({source['member']} in the `{source['package']}=="
           f"{source['version']}` wheel), licence {source['licence']}.",
           f"- Architecture: {model.get('n_layers', '?')} layers, width "
           f"{model.get('d_model', '?')}, vocabulary {model.get('vocab_size', '?')}; plus a "
           "`[CLS]` token and a benign/malicious head (Li & Kim, ICML 2025; "
           "explicit safety signals).", "",
           "## Data", "| source | package | licence | role |", "| --- | --- | --- | --- |"]
  lines += [f"| {s['name']} | `{s['package']}=={s['version']}` | {s['licence']} | {s['role']} |"
            for s in sources]
  lines += ["", "Data are read from the pinned wheels at run time; nothing is copied into the "
            "repository. Benign training answers are the source model's own; harmful prompts are "
            "answered with a refusal that explains why.", "", "## Recipe"]
  for name in [p.strip() for p in str(config.get("phases", "")).split(",") if p.strip()]:
    phase = config.get(name, {})
    keys = ("steps", "batch_size", "learning_rate", "cls_weight", "window_cls_weight",
            "trainable", "cls_lr_scale")
    lines.append(f"- {name}: " + ", ".join(f"{k} {phase[k]}" for k in keys if k in phase))
  if config.get("data"):
    lines.append(f"- sequence length {config['data'].get('seq_len', '?')}")
  gate = calibration or {}
  lines += ["", "## Gate",
            ("- Calibrated on validation data: " + json.dumps(
                {k: gate[k] for k in gate if k in ("threshold", "tau", "schedule", "budget")})
             if gate else "- Defaults (not calibrated): θ 0.5, τ 3, annealing schedule."),
            "", "## Measured", *_figures(report, results), "", "## Limits",
            *[f"- {limit}" for limit in LIMITS], ""]
  return "\n".join(lines)


def write(workdir: str, **kwargs) -> str:
  """Write ``render(workdir, **kwargs)`` to ``workdir/MODEL_CARD.md`` atomically; its path."""
  path = os.path.join(workdir, CARD_FILE)
  json_files.write_atomic(path, render(workdir, **kwargs))
  return path
