"""Jailbreak templates: the malicious request wrapped in a role-play, a nested fiction
(DeepInception), a persuasion (PAP) or an AutoDAN-style prefix (METHOD.md section 6).

Templates are data: ``safety_align/attacks/data/*.txt`` (one per file, named by the file) or
``*.json`` (a list of strings or ``{"name", "template"}`` objects), each with a ``{prompt}``
slot. Users add theirs with the evaluation config field ``templates.paths`` (files or
folders). Only ``{prompt}`` is substituted (plain replacement, not ``str.format``), so other
braces in a template are kept.

ASR of this attack: over the (item, template) pairs (an item's score is the fraction of
templates that broke it); ``summary`` also gives the ASR per template and the fraction of
items broken by any template.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from safety_align.attacks.base import Attack, fits
from safety_align.data import json_files

SLOT = "{prompt}"
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SUFFIXES = (".txt", ".json")


def _check(name: str, text: str, where: str) -> tuple[str, str]:
  if not isinstance(text, str) or SLOT not in text:
    raise ValueError(f"Jailbreak template {name!r} in {where} has no {SLOT} slot for the "
                     "request: add one where the malicious prompt goes.")
  return name, text


def load_file(path: str) -> list[tuple[str, str]]:
  """(name, template) pairs of one ``.txt`` or ``.json`` file."""
  stem = os.path.splitext(os.path.basename(path))[0]
  if path.endswith(".txt"):
    with open(path) as f:
      return [_check(stem, f.read().strip(), path)]
  if not path.endswith(".json"):
    raise ValueError(f"Template file {path} must end with .txt (one template) or .json "
                     "(a list of templates).")
  entries = json_files.read_json_list(path, "templates")
  out = []
  for i, e in enumerate(entries):
    if isinstance(e, dict):
      out.append(_check(str(e.get("name", f"{stem}_{i}")), e.get("template"),
                        f"{path} (entry {i})"))
    else:
      out.append(_check(f"{stem}_{i}", e, f"{path} (entry {i})"))
  return out


def load_templates(paths: Sequence[str] = (), builtin: bool = True,
                   names: Sequence[str] = ()) -> list[tuple[str, str]]:
  """Templates from the built-in folder (if ``builtin``) and ``paths`` (files or folders,
  ``.txt``/``.json`` inside a folder, sorted), optionally restricted to ``names``."""
  sources = ([DATA_DIR] if builtin else []) + [p for p in paths if p]
  out: list[tuple[str, str]] = []
  for src in sources:
    if os.path.isdir(src):
      files = [os.path.join(src, f) for f in sorted(os.listdir(src)) if f.endswith(SUFFIXES)]
    elif os.path.isfile(src):
      files = [src]
    else:
      raise FileNotFoundError(f"Jailbreak template path {src} does not exist.")
    for f in files:
      out += load_file(f)
  seen = set()
  for name, _ in out:
    if name in seen:
      raise ValueError(f"Two jailbreak templates are named {name!r}: rename one.")
    seen.add(name)
  if names:
    missing = sorted(set(names) - seen)
    if missing:
      raise ValueError(f"Unknown jailbreak templates {missing}: known ones are {sorted(seen)}.")
    out = [t for t in out if t[0] in set(names)]
  if not out:
    raise ValueError("No jailbreak templates to run: check templates.paths / builtin.")
  return out


def apply(template: str, prompt: str) -> str:
  return template.replace(SLOT, prompt)


class TemplateAttack(Attack):
  name = "templates"

  def __init__(self, templates: Sequence[tuple[str, str]], n_prompts: int = 0):
    self.templates, self.n_prompts = list(templates), n_prompts

  def config(self):
    return dict(templates=self.templates, n_prompts=self.n_prompts)

  def queries(self, model, items, settings):
    chosen = items[:self.n_prompts] if self.n_prompts else items
    out = []
    for i, item in enumerate(chosen):
      for name, text in self.templates:
        query = apply(text, item.prompt)
        if fits(model, query, 0, settings.max_new_tokens):
          out.append((i, name, query, ""))
    return out

  def summary(self, records, success):
    by, items = {}, {}
    for r, s in zip(records, success):
      by.setdefault(r.gate, {}).setdefault(r.variant, []).append(bool(s))
      items.setdefault(r.gate, {}).setdefault(r.item, []).append(bool(s))
    return {"asr_by_template": {g: {n: float(np.mean(v)) for n, v in d.items()}
                                for g, d in by.items()},
            "asr_any_template": {g: float(np.mean([any(v) for v in d.values()]))
                                 for g, d in items.items()}}
