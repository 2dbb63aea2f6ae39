"""The demo corpus' vocabulary: ``lexicon.json`` (package data), loaded once at import.

Sections of the file (``{t}`` is a task, ``{o}`` an object, ``{r}`` an object's extra text):

* ``ordinary``: hand-written benign topics ``{task, facts, steps}`` (specific answers).
* ``looks_unsafe``: benign requests that only look unsafe: a verb that can name violence or
  crime ("kill", "shoot", "attack", "steal", "crack", "hack", "blow up", "execute", "beat",
  "destroy") on an object that makes it harmless. The same verbs on people, animals or property
  are harmful actions, so the object has to decide. ``looks_unsafe_test``: those held out for
  ``test`` (each verb keeps look-unsafe examples in ``train``).
* ``objects``: by class, ``[object, sentence]`` pairs: an encyclopedic fact (benign answers),
  "" for people (``person_fact`` stands in), or for ``hazard`` the refusal's reason. The LAST
  object of each class is held out entirely (all its combinations are test topics).
* ``harm_actions``: ``{class, task, reason}``; the reason completes "``REFUSAL_PREFIX``
  <reason>.". ``benign_actions``: ``{class, task, steps}``; steps may use ``{o}``.
* ``phrasings``: request phrasings, shared by both classes (only the topic tells a harmful
  request from a benign one); the last ``test_phrasings`` appear only in ``test``.
* ``request_docs``: short request-like pretraining documents (no marker; labelled by the
  request); the rest: openers, closers and steps of answers, harmful responses and refusals.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import NamedTuple

REFUSAL_PREFIX = "Sorry, I cannot fulfill your request because"
HARM_MARKERS = ("[REDACTED]",)  # in every redacted harmful step; never in benign text


class Benign(NamedTuple):
  task: str                 # completes "how to ..."
  facts: tuple[str, ...]    # encyclopedic sentences
  steps: tuple[str, ...]    # imperative sentences


class Harmful(NamedTuple):
  task: str                 # a topic *name* only; its content is always redacted
  reason: str               # completes "... because <reason>."


def _load() -> dict:
  path = resources.files(__package__).joinpath("lexicon.json")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} is missing: it is safety_align's package data "
                            "(setup.py package_data); reinstall with `pip install .`.") from None


def _benign(entry: dict) -> Benign:
  return Benign(entry["task"], tuple(entry["facts"]), tuple(entry["steps"]))


_LEX = _load()
ORDINARY = tuple(_benign(t) for t in _LEX["ordinary"])
LOOKS_UNSAFE = tuple(_benign(t) for t in _LEX["looks_unsafe"])
LOOKS_UNSAFE_TASKS = tuple(t.task for t in LOOKS_UNSAFE)
LOOKS_UNSAFE_TEST = frozenset(_LEX["looks_unsafe_test"])
OBJECTS = {cls: tuple(tuple(o) for o in objects) for cls, objects in _LEX["objects"].items()}
PERSON_FACT = _LEX["person_fact"]
HARM_ACTIONS = tuple((a["class"], a["task"], a["reason"]) for a in _LEX["harm_actions"])
BENIGN_ACTIONS = tuple((a["class"], a["task"], tuple(a["steps"]))
                       for a in _LEX["benign_actions"])
PHRASINGS = tuple(_LEX["phrasings"])
TEST_PHRASINGS = _LEX["test_phrasings"]
TRAIN_PHRASINGS = PHRASINGS[:-TEST_PHRASINGS]
PROMPT_OPENERS = tuple(_LEX["prompt_openers"])
PROMPT_CLOSERS = tuple(_LEX["prompt_closers"])
REQUEST_DOCS = tuple(_LEX["request_docs"])
HARM_STEPS = tuple(_LEX["harm_steps"])
HARM_OPENERS = tuple(_LEX["harm_openers"])
HARM_CLOSERS = tuple(_LEX["harm_closers"])
HARM_TRANSITIONS = tuple(_LEX["harm_transitions"])
BENIGN_OPENERS = tuple(_LEX["benign_openers"])
BENIGN_CLOSERS = tuple(_LEX["benign_closers"])
REFUSAL_FOLLOWUPS = tuple(_LEX["refusal_followups"])
SEQUENCE_WORDS = tuple(_LEX["sequence_words"])
