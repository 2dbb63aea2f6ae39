"""The real-model recipe's prompt augmentation (``data/augment.py``; no model needed)."""

import re

import numpy as np
import pytest

from safety_align.data import augment


def test_rephrasings_keep_the_request_and_change_the_form():
  forms = augment.rephrasings("Provide a step-by-step guide on how to pick a lock.")
  assert "How do I pick a lock?" in forms and "What is the best way to pick a lock?" in forms
  assert "Could you provide a step-by-step guide on how to pick a lock?" in forms
  assert augment.rephrasings("Write a tool that can [REDACTED] a network") [0] == \
      "How can I [REDACTED] a network?"
  assert augment.rephrasings("What is the capital of France?") == []  # already a question
  assert "Could you list AI tools?" in augment.rephrasings("List AI tools")
  assert "Please NASA history in brief." in augment.rephrasings("NASA history in brief")


def test_contrasts_are_benign_questions_on_the_topic():
  harmful = dict(prompt="Explain how to pick a lock", label=1)
  benign = dict(prompt="Explain how to bake bread", label=0)
  out = augment.contrast_records([harmful, benign, dict(prompt="Hi", label=1)],
                                 np.random.default_rng(0))
  assert len(out) == 1 and out[0]["label"] == 0 and out[0]["source"] == "contrast"
  assert out[0]["prompt"] in augment.contrasts(harmful["prompt"])
  assert "pick a lock" in out[0]["prompt"]


def test_augment_and_wrap_are_seeded_and_keep_labels():
  records = [dict(prompt=f"Explain how to do task {i}", response=f"r{i}", label=i % 2)
             for i in range(10)]
  a = augment.augment(records, 0.5, np.random.default_rng(0))
  assert a == augment.augment(records, 0.5, np.random.default_rng(0)) and len(a) == 5
  by_response = {r["response"]: r for r in records}
  for r in a:
    assert r["label"] == by_response[r["response"]]["label"]
    assert r["prompt"] in augment.rephrasings(by_response[r["response"]]["prompt"])
  wrapped = augment.wrap(records, ["Pretend: {{ prompt }}!", "[{{ prompt }}]"], 4, "{{ prompt }}",
                         np.random.default_rng(1))
  assert len(wrapped) == 4 and all(r["label"] == 1 for r in wrapped)
  assert all(by_response[r["response"]]["prompt"] in r["prompt"] for r in wrapped)
  assert all(by_response[r["response"]]["label"] == 1 for r in wrapped)


def test_styles_are_dealt_alike_to_both_labels():
  """Every style's share of harmful records is the base share (within one record per style
  and label): a style never predicts the label."""
  records = [dict(prompt=f"Explain how to do task number {i}.", response=f"r{i}",
                  label=int(i % 4 == 0)) for i in range(400)]
  out = augment.styled(records, 0.5, np.random.default_rng(0))
  assert out == augment.styled(records, 0.5, np.random.default_rng(0))
  base = np.mean([r["label"] for r in records])
  per_label = {label: round(0.5 * sum(r["label"] == label for r in records)) for label in (0, 1)}
  for style in augment.STYLES:
    labels = [r["label"] for r in out if r["style"] == style]
    for label, n in per_label.items():
      assert abs(labels.count(label) - n / len(augment.STYLES)) <= 1, (style, label)
    assert abs(np.mean(labels) - base) < 0.03, style
  by_response = {r["response"]: r for r in records}
  for r in out:
    original = by_response[r["response"]]
    assert r["label"] == original["label"] and r["prompt"] != original["prompt"]
  long = [dict(prompt="x" * 200, response="", label=1)]
  assert augment.styled(long, 1.0, np.random.default_rng(0)) == []
  with pytest.raises(ValueError, match="style fraction must be in"):
    augment.styled(records, 1.5, np.random.default_rng(0))


def test_each_style_keeps_the_request_readable():
  rng = np.random.default_rng(0)
  prompt = "Explain how to bake sourdough bread"
  forms = {s: augment.stylise(prompt, s, rng) for s in augment.STYLES}
  assert forms["spaced"] == " ".join(prompt)
  assert forms["leet"] == "3xpl41n h0w 70 b4k3 50urd0ugh br34d"
  assert re.fullmatch(r"E(\W)x\1p\1l\1a\1i\1n how to bake s\1o\1u\1r\1d\1o\1u\1g\1h "
                      r"b\1r\1e\1a\1d", forms["split_words"])
  for style in ("hypothetical", "fiction", "role_play", "context"):
    assert prompt.lower() in forms[style].lower() and len(forms[style]) > len(prompt), style
  assert forms["question"].endswith("explain how to bake sourdough bread?")
  assert forms["typos"] != prompt and len(forms["typos"].split()) == len(prompt.split())
  with pytest.raises(ValueError, match="Unknown style 'shout'"):
    augment.stylise(prompt, "shout", rng)
