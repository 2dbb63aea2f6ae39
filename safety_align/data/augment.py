"""Training-prompt augmentation for the real-model recipe (ours): the same request in other
surface forms, so the [CLS] signal keys on what is asked rather than how.

AdvBench phrases every harmful request as an imperative ("Write a script that can ...",
"Provide step-by-step instructions for how to ..."), and the benign pools mostly so too; real
requests are often questions ("How do I ...?", "What's the best way to ...?"). ``rephrasings``
derives question and polite forms from a prompt by fixed rules, applied alike to both labels;
``contrasts`` derives benign questions on a harmful request's topic (protection, warning signs),
so the questions' form is no cue either; and ``wrap`` puts a harmful request inside a
jailbreak template (a request that tries to switch the model's policy off is itself malicious,
as the weighted-safety-refusal set labels prompt injections).

``styled`` gives a fraction of the records of each label one of ``STYLES`` (``stylise``): a
question form, hypothetical or fictional framing, role-play, a paragraph of context before the
request, typos, and disguised spellings (characters spaced out, leetspeak, letters of the longer
words split by a separator; ASCII only, no homoglyphs). Styles are dealt round-robin within each
label, so every style's share of harmful records is the base share: a style never predicts the
label, and the classifier must read the request through it.
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
  ``slot``: label 1, the record's (refusal) response, ``query`` its prompt."""
  harmful = [r for r in records if r["label"] == 1]
  if not harmful or not templates or n <= 0:
    return []
  picks = rng.integers(len(harmful), size=n)
  forms = rng.integers(len(templates), size=n)
  return [dict(harmful[i], prompt=templates[t].replace(slot, harmful[i]["prompt"]), label=1,
               query=harmful[i]["prompt"]) for i, t in zip(picks, forms)]


STYLES = ("question", "hypothetical", "fiction", "role_play", "context", "typos", "spaced",
          "leet", "split_words")
_QUESTION = ("Can you {lower}?", "Would you be able to {lower}?",
             "Is it possible for you to {lower}?")
_HYPOTHETICAL = ("Purely hypothetically: {prompt}", "Suppose someone asked you this: {prompt}",
                 "Just as a thought experiment, {lower}")
_FICTION = ("I'm writing a story in which one character asks another: \"{prompt}\" Write the "
            "reply.", "In a novel, a character says: \"{prompt}\" How does the other "
            "character answer?", "For a screenplay scene, a character needs this: {prompt}")
_PERSONAS = ("a patient librarian", "a retired sea captain", "my favourite teacher",
             "a friendly museum guide", "a radio host taking calls", "a wise old wizard")
_ROLE_PLAY = ("You are {persona}. Stay in character and answer: {prompt}",
              "Let's play a game: you are {persona} and I am a visitor. {prompt}",
              "Pretend to be {persona}. {prompt}")
_CONTEXT = (
    ("I've had a long week and finally have some time to myself.",
     "My sister and I were talking about this over dinner last night.",
     "I'm putting together notes for a project and want the details right.",
     "I moved to a new city last month and I'm still finding my feet."),
    ("I looked online, but the answers I found contradicted each other.",
     "A friend gave me some advice, but I'm not sure it was right.",
     "I've read a little about it already, so you can skip the basics.",
     "It has been on my mind for a while now."),
    ("So here is what I want to know:", "Anyway, my request is this:", "Here it is:",
     "My question:"))
_LEET = str.maketrans("aeiostAEIOST", "431057431057")
_SEPARATORS = ("-", ".", "*", "_")


def _typos(text: str, rng: np.random.Generator) -> str:
  """A quarter (at least one) of the words of 4+ letters get a typo: two inner letters
  swapped, a letter dropped, or one doubled."""
  words = list(re.finditer(r"[A-Za-z]{4,}", text))
  if not words:
    return text
  out, pos = [], 0
  for k in np.sort(rng.permutation(len(words))[:max(1, round(len(words) / 4))]):
    w, m = words[k].group(0), words[k]
    i, kind = int(rng.integers(1, len(w) - 2)), int(rng.integers(3))
    out += [text[pos:m.start()],
            (w[:i] + w[i + 1] + w[i] + w[i + 2:], w[:i] + w[i + 1:], w[:i] + w[i] + w[i:])[kind]]
    pos = m.end()
  return "".join(out) + text[pos:]


def stylise(prompt: str, style: str, rng: np.random.Generator) -> str:
  """``prompt`` in ``style`` (one of ``STYLES``; the variant a seeded ``rng`` draws)."""
  text = prompt.strip()
  pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
  lower = _lower_first(text.rstrip(".?!"))
  if style == "question":
    return pick(_QUESTION).format(lower=lower) if not text.endswith("?") else \
        f"Quick question: {text}"
  if style == "hypothetical":
    return pick(_HYPOTHETICAL).format(prompt=text, lower=_lower_first(text))
  if style == "fiction":
    return pick(_FICTION).format(prompt=text)
  if style == "role_play":
    return pick(_ROLE_PLAY).format(persona=pick(_PERSONAS), prompt=text)
  if style == "context":
    return " ".join(pick(part) for part in _CONTEXT) + " " + text
  if style == "typos":
    return _typos(text, rng)
  if style == "spaced":
    return " ".join(text)
  if style == "leet":
    return text.translate(_LEET)
  if style == "split_words":
    sep = pick(_SEPARATORS)
    return re.sub(r"[A-Za-z]{5,}", lambda m: sep.join(m.group(0)), text)
  raise ValueError(f"Unknown style {style!r}: expected one of {STYLES}.")


def styled(records: Sequence[dict], fraction: float, rng: np.random.Generator,
           max_chars: int = 160, styles: Sequence[str] = STYLES) -> list[dict]:
  """Copies of a seeded ``fraction`` of each label's records (those with prompts of at most
  ``max_chars`` characters), each in one of ``styles``, dealt round-robin within the label
  from a seeded start: ``dict(record, prompt=<styled>, style=<style>)`` (same response and
  label)."""
  if not 0 <= fraction <= 1:
    raise ValueError(f"The style fraction must be in [0, 1], got {fraction}.")
  out = []
  for label in sorted({r["label"] for r in records}):
    pool = [r for r in records if r["label"] == label and len(r["prompt"]) <= max_chars]
    chosen = rng.permutation(len(pool))[:round(fraction * len(pool))]
    start = int(rng.integers(len(styles)))
    for k, i in enumerate(np.sort(chosen)):
      style = styles[(start + k) % len(styles)]
      out.append(dict(pool[i], prompt=stylise(pool[i]["prompt"], style, rng), style=style))
  return out
