"""The real-model recipe's prompt augmentation and response clean-up (no model needed)."""

import numpy as np

from safety_align import demo_real
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


def test_answers_lose_their_unfinished_sentence():
  assert demo_real.complete("It is dark. It is a time when the") == "It is dark."
  assert demo_real.complete("Steps:\n- mix flour\n- add wa") == "Steps:\n- mix flour"
  assert demo_real.complete("All done.") == "All done."
  assert demo_real.complete("no end at all") == "no end at all"
  assert demo_real.first_sentences("I cannot. Because it harms. More.") == "I cannot."
  assert demo_real.first_sentences("I cannot\n\nSecond part") == "I cannot"
