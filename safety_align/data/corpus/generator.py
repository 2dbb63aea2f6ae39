"""Texts of the demo corpus: answers, schematic harmful responses, refusals, prompts, labelled
pretraining documents and SFT pairs, each a seeded function of the lexicon and the splits."""

from __future__ import annotations

import random

from safety_align.data.corpus.lexicon import (
    BENIGN_CLOSERS, BENIGN_OPENERS, HARM_CLOSERS, HARM_OPENERS, HARM_STEPS, HARM_TRANSITIONS,
    PROMPT_CLOSERS, PROMPT_OPENERS, REFUSAL_FOLLOWUPS, REFUSAL_PREFIX, REQUEST_DOCS,
    SEQUENCE_WORDS, TRAIN_PHRASINGS, Benign, Harmful)
from safety_align.data.corpus.splits import (
    SPLITS, benign_phrasings, benign_topics, check_split, compositional_benign, harmful_topics,
    looks_unsafe_topics, malicious_phrasings, ordinary_topics)


def _lower_first(s: str) -> str:
  return s[0].lower() + s[1:]


def _join(*parts: str) -> str:
  return " ".join(p for p in parts if p)


def _numbered(steps, sep=" ") -> str:
  return sep.join(f"Step {i + 1}: {s}" for i, s in enumerate(steps))


def benign_answer(rng: random.Random, topic: Benign) -> str:
  """A useful answer in one of several styles (never with a harm marker or a refusal)."""
  t = topic.task
  closer = rng.choice(BENIGN_CLOSERS)
  style = rng.randrange(4)
  if style == 0:
    return _join(rng.choice(BENIGN_OPENERS).format(t=t), _numbered(topic.steps), closer)
  if style == 1:
    words = SEQUENCE_WORDS[:len(topic.steps) - 1] + SEQUENCE_WORDS[-1:]
    prose = " ".join(f"{w} {_lower_first(s)}" for w, s in zip(words, topic.steps))
    return _join(rng.choice(topic.facts), f"To {t}, follow these steps.", prose, closer)
  if style == 2:
    return _join(topic.facts[0], rng.choice(BENIGN_OPENERS).format(t=t),
                 _numbered(topic.steps, "\n"), closer)
  return _join(" ".join(topic.facts), f"Here are the main steps to {t}.",
               " ".join(topic.steps), closer)


def harmful_response(rng: random.Random, topic: Harmful) -> str:
  """The schematic compliant answer: an opener naming the topic and 5-7 redacted steps."""
  n = rng.randint(5, 7)
  steps = rng.sample(HARM_STEPS, n)
  return _join(rng.choice(HARM_OPENERS).format(t=topic.task), _numbered(steps),
               rng.choice(HARM_CLOSERS).format(t=topic.task))


def refusal(rng: random.Random, topic: Harmful) -> str:
  """``REFUSAL_PREFIX`` + the topic's reason (+ an optional follow-up)."""
  return _join(f"{REFUSAL_PREFIX} {topic.reason}.", rng.choice(REFUSAL_FOLLOWUPS))


def _prompt(rng: random.Random, phrasing: str, task: str) -> str:
  opener = rng.choice(PROMPT_OPENERS)
  body = phrasing.format(t=task)
  if opener.endswith(": "):
    body = _lower_first(body)
  return opener + body + rng.choice(PROMPT_CLOSERS)


def _request_document(rng: random.Random, task: str) -> str:
  """A short request-like text without any marker (forum post, FAQ entry, ...)."""
  return rng.choice(REQUEST_DOCS).format(
      t=task, p=_prompt(rng, rng.choice(TRAIN_PHRASINGS), task))


def _benign_document(rng: random.Random, topics, styles: int = 6) -> str:
  """An article or a chat-style answer (styles 0-2), a Q&A (3) or a request-like document
  (4, 5) on ``topics``, of the first ``styles`` styles."""
  topic = rng.choice(topics)
  style = rng.randrange(styles)
  if style == 0:
    return _join(f"How to {topic.task}\n\n" + " ".join(topic.facts),
                 "\n\n" + _numbered(topic.steps, "\n"))
  if style == 1:  # encyclopedic: facts from several topics
    picks = rng.sample(topics, 3)
    return " ".join(dict.fromkeys(f for p in picks for f in p.facts))
  if style == 2:  # a chat-style answer
    return benign_answer(rng, topic)
  if style == 3:
    phrasing = rng.choice(TRAIN_PHRASINGS)
    return f"Question: {phrasing.format(t=topic.task)}\nAnswer: {benign_answer(rng, topic)}"
  return _request_document(rng, topic.task)  # styles 4, 5


def _harmful_document(rng: random.Random, topics, benign) -> str:
  topic = rng.choice(topics)
  style = rng.randrange(6)
  if style == 0:  # a schematic how-to
    steps = rng.sample(HARM_STEPS, rng.randint(5, 8))
    return f"How to {topic.task}\n\n" + _numbered(steps, "\n")
  if style == 1:  # the continuation a compliant chat response would be
    return harmful_response(rng, topic)
  if style == 2:  # harm starts only after a benign intro
    intro = _benign_document(rng, benign, styles=3)
    while len(intro) < 150:
      intro = _benign_document(rng, benign, styles=3)
    transition = rng.choice(HARM_TRANSITIONS).format(t=topic.task)
    steps = rng.sample(HARM_STEPS, rng.randint(3, 5))
    return f"{intro}\n\n{transition} {_numbered(steps)}"
  if style == 3:
    phrasing = rng.choice(TRAIN_PHRASINGS)
    return (f"Question: {phrasing.format(t=topic.task)}\n"
            f"Answer: {harmful_response(rng, topic)}")
  return _request_document(rng, topic.task)  # styles 4, 5: no marker


def pretrain_documents(seed: int = 0, n: int | None = None, split: str = "train") -> list[dict]:
  """``n`` labelled documents ``{"text", "label"}``, half benign (0), half malicious (1).

  ``n`` defaults to 4000 for ``train`` and 200 for ``test`` (a held-out LM / [CLS] check).
  Every document of a split is on topics of that split only: the [CLS] reads each one with
  its label, so no held-out topic is labelled before the test.
  """
  check_split(split)
  n = (4000 if split == "train" else 200) if n is None else n
  rng = random.Random(f"pretrain:{split}:{seed}")
  benign, harmful = benign_topics(split), harmful_topics(split)
  labels = [i % 2 for i in range(n)]
  rng.shuffle(labels)
  return [{"text": _harmful_document(rng, harmful, benign) if y else
           _benign_document(rng, benign), "label": y} for y in labels]


def _pick_benign(rng: random.Random, split: str) -> Benign:
  """Benign topics with look-unsafe (20%) and hand-written (15%) ones over-represented."""
  u = rng.random()
  pool = (looks_unsafe_topics(split) if u < 0.2 else ordinary_topics(split) if u < 0.35
          else compositional_benign(split))
  return rng.choice(pool)


def sft_pairs(split: str = "train", seed: int = 0, n: int | None = None) -> list[dict]:
  """``n`` chat pairs ``{"prompt", "response", "label", "harmful_response"}``, half benign.

  ``n`` defaults to 2000 for ``train`` and 200 for ``test``. Prompts of ``test`` use held-out
  topics and phrasings only.
  """
  check_split(split)
  n = (2000 if split == "train" else 200) if n is None else n
  rng = random.Random(f"sft:{split}:{seed}")
  harmful = harmful_topics(split)
  b_phr, m_phr = benign_phrasings(split), malicious_phrasings(split)
  labels = [i % 2 for i in range(n)]
  rng.shuffle(labels)
  pairs = []
  for y in labels:
    if y:
      topic = rng.choice(harmful)
      pairs.append({"prompt": _prompt(rng, rng.choice(m_phr), topic.task),
                    "response": refusal(rng, topic), "label": 1,
                    "harmful_response": harmful_response(rng, topic)})
    else:
      topic = _pick_benign(rng, split)
      pairs.append({"prompt": _prompt(rng, rng.choice(b_phr), topic.task),
                    "response": benign_answer(rng, topic), "label": 0,
                    "harmful_response": ""})
  return pairs


def all_texts(seed: int = 0) -> list[str]:
  """Every text of the default-sized corpus (both splits), for tokenizer training."""
  texts = [d["text"] for split in SPLITS for d in pretrain_documents(seed, split=split)]
  for split in SPLITS:
    for p in sft_pairs(split, seed):
      texts += [p["prompt"], p["response"], p["harmful_response"]]
  return [t for t in texts if t]
