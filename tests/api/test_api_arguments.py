"""The Python API's bad arguments get one sentence that names the argument and the fix (a
model loaded from conftest's ``trained`` run; its maximum length is 128)."""

import re

import pytest

import safety_align as sa
from safety_align import generate


@pytest.fixture(scope="module")
def model(trained):
  return sa.load(str(trained))


def test_api_arguments_get_a_sentence(model):
  with pytest.raises(ValueError, match=r"Prompt 0 \(\d+ tokens\) exceeds the model's maximum "
                                       "length of 128 tokens"):
    model.classify(["bread " * 200])
  with pytest.raises(TypeError, match=r"prefill must be a list of strings, not one string: "
                                      r"wrap it, prefill=\['Sure'\]"):
    model.generate(["hi"], prefill="Sure")
  with pytest.raises(ValueError, match="1 prefills for 2 prompts"):
    model.generate(["hi", "there"], prefill=["Sure"])
  with pytest.raises(TypeError, match=r"prompts\[1\] is int, not str"):
    model.classify(["hi", 3])
  with pytest.raises(TypeError, match="prompts must be a list of strings, not one string"):
    model.generate("hi")
  positive, count = "an integer >= 1", "an integer >= 0 (0 = no limit)"
  bad = [("max_new_tokens", 3.5, TypeError, positive), ("max_new_tokens", 0, ValueError, positive),
         ("temperature", float("inf"), ValueError, "a finite number >= 0 (0 = greedy)"),
         ("temperature", "1", TypeError, "a finite number >= 0 (0 = greedy)"),
         ("top_p", 0.0, ValueError, "a number in (0, 1]"),
         ("top_k", -1, ValueError, count), ("top_k", 2.5, TypeError, count)]
  for name, value, error, expected in bad:
    with pytest.raises(error, match=re.escape(f"{name} must be {expected}, got {value!r}.")):
      model.generate(["hi"], **{name: value})
  with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 .*got inf"):
    generate._ApiNumber("temperature").parse("inf")  # the CLI flag: the same sentence
  assert generate._ApiNumber("max_new_tokens").parse("12") == 12
