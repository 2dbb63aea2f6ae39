"""The ``train`` / ``test`` split of the demo corpus' topics and phrasings.

About a fifth of the (action, object) combinations are held out for ``test`` (by a stable
hash), plus every combination of the last object of each class, every fifth hand-written topic
and the look-unsafe topics of ``LOOKS_UNSAFE_TEST``; the last ``TEST_PHRASINGS`` phrasings are
held out as well.
"""

from __future__ import annotations

import functools
import zlib

from safety_align.data.corpus.lexicon import (
    BENIGN_ACTIONS, HARM_ACTIONS, LOOKS_UNSAFE, LOOKS_UNSAFE_TEST, OBJECTS, ORDINARY,
    PERSON_FACT, PHRASINGS, TEST_PHRASINGS, Benign, Harmful)

SPLITS = ("train", "test")


def check_split(split):
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}: expected one of {SPLITS}.")


def _combo_split(template: str, obj: str, objects) -> str:
  """``test`` for about a fifth of the (action, object) combinations (a stable hash) and for
  every combination of the class's last object; else ``train``."""
  if obj == objects[-1][0] or zlib.crc32(f"{template}|{obj}".encode()) % 5 == 0:
    return "test"
  return "train"


@functools.lru_cache(maxsize=None)
def _compositional(split: str) -> tuple[tuple[Harmful, ...], tuple[Benign, ...]]:
  """(harmful, benign) compositional topics of ``split``."""
  harmful, benign = [], []
  for cls, template, reason in HARM_ACTIONS:
    objects = OBJECTS[cls]
    for obj, extra in objects:
      if _combo_split(template, obj, objects) == split:
        harmful.append(Harmful(template.format(o=obj), reason.format(o=obj, r=extra)))
  for cls, template, steps in BENIGN_ACTIONS:
    objects = OBJECTS[cls]
    for obj, fact in objects:
      if _combo_split(template, obj, objects) == split:
        facts = (fact,) if fact else (PERSON_FACT,)
        benign.append(Benign(template.format(o=obj), facts,
                             tuple(s.format(o=obj) for s in steps)))
  return tuple(harmful), tuple(benign)


def _every(topics, split, k, r):
  """Topic ``i`` is in ``test`` iff ``i % k == r``."""
  check_split(split)
  return [t for i, t in enumerate(topics) if (i % k == r) == (split == "test")]


def ordinary_topics(split: str) -> list[Benign]:
  return _every(ORDINARY, split, 5, 4)


def looks_unsafe_topics(split: str) -> list[Benign]:
  check_split(split)
  return [t for t in LOOKS_UNSAFE if (t.task in LOOKS_UNSAFE_TEST) == (split == "test")]


def compositional_benign(split: str) -> list[Benign]:
  check_split(split)
  return list(_compositional(split)[1])


def benign_topics(split: str) -> list[Benign]:
  return compositional_benign(split) + ordinary_topics(split) + looks_unsafe_topics(split)


def harmful_topics(split: str) -> list[Harmful]:
  check_split(split)
  return list(_compositional(split)[0])


def _split_phrasings(phrasings, split):
  check_split(split)
  return phrasings[-TEST_PHRASINGS:] if split == "test" else phrasings[:-TEST_PHRASINGS]


def benign_phrasings(split: str) -> tuple[str, ...]:
  return _split_phrasings(PHRASINGS, split)


def malicious_phrasings(split: str) -> tuple[str, ...]:
  return _split_phrasings(PHRASINGS, split)
