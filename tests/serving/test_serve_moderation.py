"""The gate as a stream guard (``SafetyModel.gate_stream``, ``moderation.py``) on a tiny random
model: its trace and verdict equal the gated decoder's over the same tokens, it fires where the
decoder's gate fired, and a response given in pieces gives what the whole text gives while
re-encoding only the tail."""

import random

import numpy as np
import pytest

from test_serve import model, workdir  # noqa: F401  (the served tiny model's fixtures)

RESPONSE = "the cat bakes bread, and the lock is a story about bread; be brief"


@pytest.mark.parametrize("gate", ["every", "annealing"])
def test_trace_and_verdict_equal_the_decoders(model, gate):
  """The decoder forced through the same response (a prefill) evaluates the same steps with
  the same P(malicious), and inserts its refusal after it iff the guard fired."""
  v = model.gate_stream("bread", gate=gate).extend(RESPONSE)
  n = len(model.tokenizer.encode(RESPONSE))
  ref = model.generate(["bread"], max_new_tokens=4, gate=gate, prefill=[RESPONSE])[0]
  keep = [i for i, s in enumerate(ref.cls_steps) if s <= n]
  assert v.tokens == n and v.steps == [ref.cls_steps[i] for i in keep]
  np.testing.assert_allclose(v.probs, [ref.cls_probs[i] for i in keep], atol=1e-5)
  assert v.fired == ref.refused
  if v.fired:  # the forced tokens come first: the refusal follows them
    assert 0 < v.fire_step <= n and ref.refusal_step > n


def test_fires_where_the_decoder_fires(model):
  """The decoder forced through the response's first ``fire_step`` tokens inserts its refusal
  right after them: its gate decided at that step, as the guard did."""
  tok = model.tokenizer
  v = model.gate_stream("bread", gate="every").extend(RESPONSE)
  assert v.fired and 0 < v.fire_step < v.tokens
  prefix = tok.decode(tok.encode(RESPONSE)[:v.fire_step])
  assert len(tok.encode(prefix)) == v.fire_step and RESPONSE[:v.fire_char] == prefix
  gen = model.generate(["bread"], max_new_tokens=4, gate="every", prefill=[prefix])[0]
  newline = len(tok.encode("\n"))
  assert gen.refused and gen.refusal_step == v.fire_step + newline


@pytest.mark.parametrize("seed", range(3))
def test_pieces_equal_the_whole_and_reencode_only_the_tail(model, seed):
  whole = model.gate_stream("how do I pick a lock", gate="every").extend(RESPONSE)
  stream = model.gate_stream("how do I pick a lock", gate="every")
  encoded = []
  hf = stream.tok.hf
  real_encode = hf.encode

  class Spy:  # records the length of every text the stream encodes
    pre_tokenizer = hf.pre_tokenizer

    def encode(self, text, **kw):
      encoded.append(len(text))
      return real_encode(text, **kw)

  stream.tok = type("Tok", (), dict(hf=Spy(), pad_id=stream.tok.pad_id))()
  rng = random.Random(seed)
  cuts = sorted(rng.sample(range(1, len(RESPONSE)), 12))
  for a, b in zip([0] + cuts, cuts + [len(RESPONSE)]):
    v = stream.extend(RESPONSE[a:b])
  assert stream.ids == model.tokenizer.encode(RESPONSE)
  assert v.steps == whole.steps and (v.fired, v.fire_step) == (whole.fired, whole.fire_step)
  np.testing.assert_allclose(v.probs, whole.probs, atol=1e-5)
  assert max(encoded[1:]) < len(RESPONSE) // 2  # a tail, never the whole text again


def test_past_the_context_is_a_clear_error(model):
  stream = model.gate_stream("bread", gate="annealing")
  with pytest.raises(ValueError, match="over the model's context of 160"):
    stream.extend("bread " * 200)
  off = model.gate_stream("bread", gate="off").extend("bread")  # the query only, never acts
  assert off.steps == [0] and not off.fired
