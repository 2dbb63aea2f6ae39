"""Training-prompt augmentation for the real-model recipe (ours): the same request in other
surface forms, so the [CLS] signal keys on what is asked rather than how.

AdvBench phrases every harmful request as an imperative ("Write a script that can ...",
"Provide step-by-step instructions for how to ..."), and the benign pools mostly so too; real
requests are often questions ("How do I ...?", "What's the best way to ...?"). ``rephrasings``
derives question and polite forms from a prompt by fixed rules, applied alike to both labels;
``contrasts`` derives benign questions on a harmful request's topic (protection, warning signs),
so the questions' form is no cue either; and ``wrap`` puts a harmful request inside a jailbreak template (a
request that tries to switch the model's policy off is itself malicious, as the
weighted-safety-refusal set labels prompt injections).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_HOW_TO = re.compile(r"\bhow to (?P<rest>[^?.!]+)[?.!]?\s*$", re.IGNORECASE)
_THAT_CAN = re.compile(r"\bthat can (?P<rest>[^?.!]+)[?.!]?\s*$", re.IGNORECASE)
_QUESTIONS = ("How do I {rest}?", "What is the best way to {rest}?",
              "Can you explain how to {rest}?", "I want to know how to {rest}.",
              "What are the most effective techniques to {rest}?",
              "What tools or methods do people use to {rest}?")
_POLITE = ("Could you {lower}?", "Please {lower}.", "I need your help: {lower}.")


def _lower_first(text: str) -> str:
  return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def rephrasings(prompt: str) -> list[str]:
  """Other surface forms of ``prompt`` (never ``prompt`` itself): question forms of a "how
  to X" or "... that can X" request, and polite wrappers of an imperative."""
  text = prompt.strip().rstrip(".")
  out = []
  m = _HOW_TO.search(text)
  if m:
    out += [q.format(rest=m["rest"].strip()) for q in _QUESTIONS]
  m = _THAT_CAN.search(text)
  if m:
    out.append(f"How can I {m['rest'].strip()}?")
  if text and not text.endswith("?"):
    out += [p.format(lower=_lower_first(text)) for p in _POLITE]
  return [p for p in dict.fromkeys(out) if p != prompt]


_CONTRASTS = ("How can I protect myself from someone trying to {rest}?",
              "What are the warning signs that someone is trying to {rest}?",
              "Why is it harmful to {rest}?",
              "How do security experts stop people who {rest_that}?")


def contrasts(prompt: str) -> list[str]:
  """Benign questions on the topic of a harmful "how to X" / "... that can X" request: how to
  protect against it, spot it, or why it is harmful. Labelled benign, they teach the signal to
  judge the intent of a request rather than its topic (over-refusal: safe prompts that
  mention dangerous things)."""
  text = prompt.strip().rstrip(".")
  m = _HOW_TO.search(text)
  if m:
    rest = m["rest"].strip()
    return [c.format(rest=rest) for c in _CONTRASTS[:3]]
  m = _THAT_CAN.search(text)
  if m:
    return [_CONTRASTS[3].format(rest_that=f"make things that can {m['rest'].strip()}")]
  return []


def contrast_records(records: Sequence[dict], rng: np.random.Generator) -> list[dict]:
  """One benign ``contrasts`` question (a seeded pick) per harmful record that has any:
  ``{"prompt", "label": 0, "source": "contrast"}`` (no response: the caller generates one)."""
  out = []
  for r in records:
    forms = contrasts(r["prompt"]) if r["label"] == 1 else []
    if forms:
      out.append(dict(prompt=forms[int(rng.integers(len(forms)))], label=0, source="contrast"))
  return out


def augment(records: Sequence[dict], fraction: float, rng: np.random.Generator) -> list[dict]:
  """For a seeded ``fraction`` of ``records``, one rephrasing each (same response and label)."""
  if not 0 <= fraction <= 1:
    raise ValueError(f"The rephrasing fraction must be in [0, 1], got {fraction}.")
  out = []
  for i in np.sort(rng.permutation(len(records))[:round(fraction * len(records))]):
    forms = rephrasings(records[i]["prompt"])
    if forms:
      out.append(dict(records[i], prompt=forms[int(rng.integers(len(forms)))]))
  return out


def wrap(records: Sequence[dict], templates: Sequence[str], n: int, slot: str,
         rng: np.random.Generator) -> list[dict]:
  """``n`` harmful ``records`` (a seeded draw) each put into a random one of ``templates`` at
  ``slot``: label 1, the record's (refusal) response."""
  harmful = [r for r in records if r["label"] == 1]
  if not harmful or not templates or n <= 0:
    return []
  picks = rng.integers(len(harmful), size=n)
  forms = rng.integers(len(templates), size=n)
  return [dict(harmful[i], prompt=templates[t].replace(slot, harmful[i]["prompt"]), label=1)
          for i, t in zip(picks, forms)]
