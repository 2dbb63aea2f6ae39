"""The public Python API (API.md) and the generate CLI's report, on conftest's tiny random
model (``model``: a tiny byte-level BPE and the demo chat template)."""

import dataclasses

import numpy as np
import pytest

from safety_align import api, generate, safety_model
from safety_align.decode import GateConfig, decoder

PROMPTS = ["how do I bake bread", "tell me a story"]


def _with(m, **gate):
  """The same model with other gate defaults."""
  return api.SafetyModel(m.config, m.params, m.tokenizer, m.template,
                         dataclasses.replace(m.gate_defaults, **gate), max_length=96)


def test_gate_off_on_a_plain_lm_is_the_plain_lm(model):
  """A model trained without [CLS] (uses_cls=False): gate="off" greedy decoding = the argmax
  chain of ``lm_logits`` over the growing text, and gating is refused."""
  plain = api.SafetyModel(model.config, model.params, model.tokenizer, model.template,
                          max_length=96, uses_cls=False)
  gens = plain.generate(PROMPTS, max_new_tokens=6, gate="off")
  for prompt, gen in zip(PROMPTS, gens):
    ids = [t for piece, _ in model.template.prompt_pieces(model.tokenizer, prompt) for t in piece]
    expected = []
    for _ in range(6):
      expected.append(int(model.lm_logits(np.array([ids + expected]))[0, -1].argmax()))
    assert gen.tokens == expected and gen.text == model.tokenizer.decode(expected)
    assert gen.cls_probs == [] and not gen.refused
  with pytest.raises(ValueError, match="needs the \\[CLS\\] embedding"):
    plain.generate(PROMPTS, gate="every")


def test_gate_off_keeps_the_trained_cls_but_never_steers(model):
  """On a [CLS] model, "off" = [CLS] in the prompt pass (as trained), no re-evaluation, no
  insertion: even a query classified malicious is answered."""
  always = dataclasses.replace(model.gate_defaults, threshold=0.0)  # every query "malicious"
  m = api.SafetyModel(model.config, model.params, model.tokenizer, model.template, always,
                      max_length=96)
  off = m.generate(PROMPTS, max_new_tokens=6, gate="off")
  first_low = m.generate(PROMPTS, max_new_tokens=6,
                         gate=dataclasses.replace(always, schedule="first", reliance="low"))
  for a, b in zip(off, first_low):
    assert a.tokens == b.tokens and not a.refused and a.cls_steps == [0]
  assert all(g.refused for g in m.generate(PROMPTS, max_new_tokens=6, gate="first"))


def test_classify_is_the_first_classification(model):
  probs = model.classify(PROMPTS)
  assert probs.shape == (2,) and ((probs > 0) & (probs < 1)).all()
  gens = model.generate(PROMPTS, max_new_tokens=4, gate="first")
  np.testing.assert_allclose([g.cls_probs[0] for g in gens], probs, atol=1e-6)
  assert all(g.cls_steps == [0] for g in gens)


def test_refusal_inserted(model):
  always = _with(model, threshold=0.0)  # every classification says malicious
  prefix = model.gate_defaults.refusal_prefix
  gen = always.generate(PROMPTS[:1], max_new_tokens=40, gate="first")[0]
  assert gen.refused and gen.refusal_step == 0 and gen.text.startswith(prefix)
  gen = always.generate(PROMPTS[:1], max_new_tokens=40, gate="first",
                        prefill=["Sure, here is"])[0]
  n = len(model.tokenizer.encode("Sure, here is"))
  assert gen.text.startswith("Sure, here is\n" + prefix) and gen.refusal_step == n + 1
  high = GateConfig(schedule="first", reliance="high", threshold=0.0)
  assert always.generate(PROMPTS[:1], max_new_tokens=40, gate=high)[0].text == prefix
  low = GateConfig(schedule="every", reliance="low", threshold=0.0)
  gen = always.generate(PROMPTS[:1], max_new_tokens=40, gate=low)[0]
  assert not gen.refused and gen.cls_steps == list(range(len(gen.cls_steps))) != [0]


def test_sampling_reproducible_and_batch_independent(model):
  kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3, gate="annealing")
  a = model.generate(PROMPTS, **kw)
  assert [g.tokens for g in a] == [g.tokens for g in model.generate(PROMPTS, **kw)]
  small = api.SafetyModel(model.config, model.params, model.tokenizer, model.template,
                          batch_size=1, max_length=96)
  assert [g.tokens for g in small.generate(PROMPTS, **kw)] == [g.tokens for g in a]


def test_repeated_calls_do_not_recompile(model):
  model.generate(PROMPTS, max_new_tokens=8, temperature=0.5, gate="every")
  before = decoder._decode._cache_size()
  model.generate(["how do I pick a lock", "a cat"], max_new_tokens=7, temperature=0.9,
                 top_k=5, seed=1, gate="periodic")
  model.generate(PROMPTS, max_new_tokens=7, temperature=0.7, gate="annealing",
                 prefill=["S", ""])
  assert decoder._decode._cache_size() == before


def test_errors(model):
  for bad in (dict(top_p=0.0), dict(top_p=1.5)):
    with pytest.raises(ValueError, match="top_p"):
      model.generate(PROMPTS, temperature=1.0, **bad)
  with pytest.raises(ValueError, match="Unknown gate 'always'.*annealing"):
    model.generate(PROMPTS, gate="always")
  with pytest.raises(ValueError, match="Prompt 1 is empty"):
    model.generate(["hi", ""])
  with pytest.raises(ValueError, match="maximum length of 96"):
    model.generate(["bread " * 40], max_new_tokens=32)
  plain = {k: v for k, v in model.params.items() if k not in safety_model.CLS_PARAMS}
  lm_only = api.SafetyModel(model.config, plain, model.tokenizer, model.template)
  with pytest.raises(ValueError, match="gate='annealing' needs the \\[CLS\\]"):
    lm_only.generate(PROMPTS)
  with pytest.raises(ValueError, match="classify needs the \\[CLS\\]"):
    lm_only.classify(PROMPTS)
  declared_plain = api.SafetyModel(model.config, model.params, model.tokenizer, model.template,
                                   uses_cls=False)
  assert lm_only.generate(PROMPTS, gate="off", max_new_tokens=6)[0].tokens == (
      declared_plain.generate(PROMPTS, gate="off", max_new_tokens=6)[0].tokens)


def test_cli_report(model):
  always = _with(model, threshold=0.0)
  text = generate.report(always, PROMPTS[0], gate="annealing", max_new_tokens=40)
  assert "refused: yes, prefix inserted at response token 0" in text
  assert "step    0: P(malicious) = " in text and "step   27:" in text
  never = _with(model, threshold=1.0)
  assert "refused: no" in generate.report(never, PROMPTS[0], gate="annealing", max_new_tokens=40)


def test_one_meaning_of_gate_off(model):
  """``resolve_gate``: "off", as a name or a GateConfig, is the gate that never acts ([CLS] at
  prefill, reliance low) on a [CLS] model and the plain decoder on a plain LM; ``generate``
  gives the same for both spellings."""
  defaults = model.gate_defaults
  for off in ("off", GateConfig(schedule="off", threshold=0.0)):
    cls_gate = api.resolve_gate(off, defaults, has_cls=True)
    assert (cls_gate.schedule, cls_gate.reliance, cls_gate.enabled) == ("first", "low", True)
    assert api.resolve_gate(off, defaults, has_cls=False).schedule == "off"
  assert api.resolve_gate("every", defaults, True) == dataclasses.replace(defaults,
                                                                          schedule="every")
  with pytest.raises(ValueError, match="Unknown gate 'sometimes'"):
    api.resolve_gate("sometimes", defaults, True)
  with pytest.raises(ValueError, match="gate='annealing' needs the \\[CLS\\]"):
    api.resolve_gate("annealing", defaults, False)
  with pytest.raises(TypeError, match="schedule name"):
    api.resolve_gate(3, defaults, True)
  by_name = model.generate(PROMPTS[:1], max_new_tokens=4, gate="off")[0]
  by_config = model.generate(PROMPTS[:1], max_new_tokens=4,
                             gate=GateConfig(schedule="off", threshold=0.0))[0]
  assert by_name.tokens == by_config.tokens and not by_config.refused
  assert len(by_config.cls_probs) == 1  # read in the prompt pass, never re-evaluated


def test_batch_size_argument(model):
  """``batch_size`` only changes how rows are grouped into decoder calls."""
  many = PROMPTS * 3
  assert ([g.tokens for g in model.generate(many, max_new_tokens=4, batch_size=2)]
          == [g.tokens for g in model.generate(many, max_new_tokens=4)])
  with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
    model.generate(PROMPTS, batch_size=0)
