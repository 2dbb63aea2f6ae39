"""The competitor baselines (``safety_align.defences``) in the evaluation:
``--config.baselines=probe,deep_alignment,safedecoding`` builds each (``build``) and the runner
evaluates it as the [CLS] model (``runner.evaluate_defence``) into
``results["baselines"][name]``.

* source (``source_dir``): a model without [CLS], ``baselines_source`` or else the no-[CLS]
  baseline the run resolves (``eval.no_cls``: ``baseline_workdir`` or
  ``WORKDIR/baseline_no_cls``); for an imported real model, its import directory (e.g.
  ``runs/smollm2/import``), run as the plain LM (its untrained [CLS] left out);
* training data (``training_records``): ``baselines_data`` (a chat JSONL file, or a folder
  holding ``sft.jsonl``), else the [CLS] run's own SFT records: the demo corpus' train split
  (``corpus.sft_pairs("train", data.seed)``) or ``<data.data_dir>/<sft.split>.jsonl``
  (``make demo-real``'s ``WORKDIR/data/sft.jsonl``);
* artefacts: ``WORKDIR/eval/baselines/<name>/`` (a second run loads them, never retrains).
  SafeDecoding's expert is the ``deep_alignment`` model when both run with the same settings
  (``safedecoding.expert_training`` equal to ``deep_alignment``), else its own in
  ``safedecoding/expert`` (or ``safedecoding.expert``, a path).

Attacks: all of the suite's but ``SKIPPED``, which act outside a wrapper's ``generate``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

from safety_align import defences
from safety_align import workdir as workdir_lib
from safety_align.defences import deep_alignment, safedecoding
from safety_align.config_lib import names
from safety_align.data import corpus, tfds_builders
from safety_align.data.tfds_builders import CHAT_FILE
from safety_align.eval.store import fingerprint, key, require_checkpoint

NAMES = tuple(defences.BUILDERS)  # also the results table's order
DIR = "baselines"
# Attacks a baseline is not run on: a wrapper's defence lives in its ``generate``.
SKIPPED = {
    "gcg_adaptive": "its loss targets the [CLS] head; against a baseline it is gcg",
    "embedding": "decodes soft prompts with the model's own decoder, around generate",
    "finetune": "fine-tunes the weights into a plain model, without the wrapper",
    "two_turn": "sends chats through SafetyModel.render and decode; a wrapper takes prompts",
}


def chosen(cfg) -> list[str]:
  """The baselines ``cfg.baselines`` names, checked."""
  listed = names(cfg.baselines)
  unknown = [n for n in listed if n not in NAMES]
  if unknown:
    raise ValueError(f"Unknown baseline(s) {unknown} in baselines={cfg.baselines!r}: expected "
                     f"a comma-separated subset of {','.join(NAMES)} (or '' for none).")
  if len(set(listed)) != len(listed):
    raise ValueError(f"Baseline listed twice in baselines={cfg.baselines!r}.")
  for n in listed:
    if n not in cfg:
      raise ValueError(f"baselines={cfg.baselines!r} needs the config section {n!r} "
                       "(config_lib.defence_sections()): add it to the eval config.")
  return [n for n in NAMES if n in listed]


def attacks_for(attacks) -> list:
  return [a for a in attacks if a.name not in SKIPPED]


def source_dir(cfg, no_cls_dir: str | None) -> str:
  """The baselines' source model (module doc)."""
  src = cfg.baselines_source or no_cls_dir
  if not src:
    raise ValueError(f"baselines={cfg.baselines!r} need a source model without [CLS]: set "
                     "baselines_source=<its workdir or import directory> (e.g. "
                     "runs/smollm2/import), or baseline_workdir=... / train_baseline=True "
                     "(the no-[CLS] baseline is then the source).")
  require_checkpoint(src, "baselines_source")
  return src


def training_records(workdir: str, cfg) -> list[dict]:
  """The baselines' training records (module doc): the single-turn ones, since their trainers
  take one prompt per example (the two-turn chats, ``data/multi_turn.py``, are copies of
  single-turn records in another layout)."""
  return [r for r in _records(workdir, cfg) if not r.get("turns")]


def _records(workdir: str, cfg) -> list[dict]:
  if cfg.baselines_data:
    return tfds_builders.read_chat_records(cfg.baselines_data, "baselines_data")
  config = workdir_lib.read_config(workdir)
  data = config.get("data", {})
  source = data.get("source", "demo")
  if source == "demo":
    return corpus.sft_pairs("train", data.get("seed", 0))
  split = config.get("sft", {}).get("split", "sft")
  file = os.path.join(data["data_dir"], f"{split}.jsonl") if data.get("data_dir") else ""
  if not (file and os.path.isfile(file)):
    raise FileNotFoundError(
        f"The baselines train on {workdir}'s SFT records (data.source={source!r}), but "
        f"{file or 'its config has no data.data_dir'}"
        f"{' is missing' if file else ''}: set baselines_data=<a chat JSONL file, or a folder "
        f"with {CHAT_FILE}> (make demo-real writes WORKDIR/data/{CHAT_FILE}).")
  return tfds_builders.read_jsonl(file, "chat")


def _digest(records) -> str:
  return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def build(which, cfg, source: str, records, folder: str, *, gate,
          log: Callable[[str], None]) -> dict[str, tuple[object, str]]:
  """{name: (model-like object, model id for the result store)} of the baselines ``which``
  over ``source`` (a path), trained on ``records`` into ``folder/<name>`` (or loaded)."""
  import safety_align as sa  # pylint: disable=g-import-not-at-top
  # An import directory's [CLS] head is the importer's random init, with the text -> [CLS]
  # gate closed: the source is the plain LM, run without [CLS].
  plain = dict(uses_cls=False) if workdir_lib.serving_phase(source) == "import" else {}
  model = sa.load(source, gate_defaults=gate, batch_size=cfg.batch_size, **plain)
  if model.has_cls_head:
    raise ValueError(f"The baselines' source {source} has a [CLS] head: give the model "
                     "without [CLS] (baselines_source=..., e.g. the no-[CLS] baseline or the "
                     "imported source model).")
  common = dict(source=require_checkpoint(source, "baselines_source"), data=_digest(records))
  out = {}
  for name in which:
    section, sub = cfg[name], os.path.join(folder, name)
    if name == "deep_alignment":
      built = deep_alignment.build(source, section, records, log, sub)
      m = deep_alignment.DeepAlignedModel(model, built.aligned)  # the one source model
      extra = fingerprint(sub)
    elif name == "safedecoding":
      expert, extra = _expert(cfg, out, model, source, records, sub, log)
      m = safedecoding.build(model, section, records, log, sub, expert=expert)
    else:
      m = defences.BUILDERS[name](model, section, records, log, sub)
      extra = None
    out[name] = (m, f"{name}:" + key(dict(common, section=section.to_dict(), artefacts=extra)))
  return out


def _expert(cfg, built: dict, model, source: str, records, folder: str, log):
  """(SafeDecoding's expert, its fingerprint): module doc."""
  import safety_align as sa  # pylint: disable=g-import-not-at-top
  section = cfg.safedecoding
  if section.expert:
    require_checkpoint(section.expert, "safedecoding.expert")
    expert = sa.load(section.expert, max_length=model.max_length)
    return expert, fingerprint(section.expert)
  shared = built.get("deep_alignment")
  if shared and section.expert_training.to_dict() == cfg.deep_alignment.to_dict():
    log("safedecoding: expert = the deep_alignment baseline")
    return shared[0].aligned, shared[1]
  sub = os.path.join(folder, "expert")
  expert = deep_alignment.build(source, section.expert_training, records, log, sub)
  return expert.aligned, fingerprint(sub)
