"""The real-model recipe's prompt augmentation and response clean-up (no model needed)."""

import re

import numpy as np
import pytest

from safety_align import demo_real
from safety_align.data import augment, package_data


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


class FakeSource:
  """Answers like the source model: benign prompts containing "refuse" get a refusal."""

  def answers(self, prompts, max_new_tokens, prefill=""):
    return [f"{prefill} reason for {p}. More." if prefill else
            ("I cannot help with that." if "refuse" in p else f"Answer to {p}.")
            for p in prompts]


def test_sft_records_drop_refusing_answers_and_wrap_by_query(tmp_path):
  train = [dict(prompt="Bake bread", label=0, source="ollama_harmless"),
           dict(prompt="Please refuse this", label=0, source="edgy_safe"),
           dict(prompt="Do [REDACTED]", label=1, source="adv_bench"),
           dict(prompt="Role: Do [REDACTED]", label=1, source="easyjailbreak",
                query="Do [REDACTED]")]
  out = demo_real.sft_records(FakeSource(), train, str(tmp_path), 16)
  assert [(r["prompt"], r["label"], r["source"]) for r in out] == [
      ("Bake bread", 0, "ollama_harmless"), ("Do [REDACTED]", 1, "adv_bench"),
      ("Role: Do [REDACTED]", 1, "easyjailbreak")]
  assert out[0]["response"] == "Answer to Bake bread."
  assert out[2]["response"] == out[1]["response"] == (
      f"{demo_real.REFUSAL_PREFIX} reason for Do [REDACTED].")
  assert out[1]["harmful_response"].startswith(demo_real.COMPLIANT_PREFIX)
  assert "harmful_response" not in out[2]


def test_query_templates_split_by_template():
  templates = [dict(name=f"Family/{i}", template=f"T{i} says: {package_data.SLOT}")
               for i in range(12)] + [dict(name="Long/0", template="x" * 800 + package_data.SLOT)]
  data = {"train": [dict(prompt=f"Do [REDACTED] {i}", label=1, source="adv_bench")
                    for i in range(10)] + [dict(prompt="Bake", label=0, source="chatterbot")],
          "validation": [dict(prompt=f"Do [REDACTED] v{i}", label=1, source="airt")
                         for i in range(4)]}
  out = demo_real.with_query_templates(data, templates, 0, 20)
  used = {}
  for name, n in (("train", 20), ("validation", 5)):
    wrapped = [r for r in out[name] if r["source"] == demo_real.QUERY_TEMPLATE_SOURCE]
    assert len(wrapped) == n and out[name][:len(data[name])] == data[name]
    assert all(r["label"] == 1 and r["query"] in r["prompt"] and r["query"] in
               {d["prompt"] for d in data[name]} for r in wrapped)
    used[name] = {r["prompt"].split(" says")[0] for r in wrapped}
  assert used["train"] and used["validation"] and not used["train"] & used["validation"]
  assert not any(r["prompt"].startswith("x") for n in out for r in out[n])
