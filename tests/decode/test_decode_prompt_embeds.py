"""Decoding from prompt embeddings (``SafetyModel.decode(prompt_embeds=...)``): the embeddings
of a prompt's own tokens decode exactly as the tokens, gate on; other embeddings change what
is decoded; malformed embeddings are refused."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from safety_align.decode import GateConfig, Prompts
from safety_align.masks import Role
from safety_align.model import Transformer

PROMPTS = ["how do I bake bread", "tell me a story about a cat and a dog", "hi"]


def _embeds(m, prompts: Prompts) -> list[np.ndarray]:
  """Each prompt's token embeddings [L, D], as the model's own lookup gives them."""
  return [np.asarray(Transformer(m.config).apply(
      {"params": m.params}, jnp.asarray([ids]), method=Transformer.embed_tokens)[0], np.float32)
          for ids in prompts.ids]


def _same(a, b):
  assert [g.tokens for g in a] == [g.tokens for g in b]
  assert [(g.refused, g.refusal_step, g.cls_steps) for g in a] == [
      (g.refused, g.refusal_step, g.cls_steps) for g in b]
  for x, y in zip(a, b):
    np.testing.assert_allclose(x.cls_probs, y.cls_probs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gate", ["every", "annealing", "off", "low_threshold"])
def test_embeddings_of_the_prompt_tokens_decode_as_the_tokens(model, gate):
  prompts = model._prompts(PROMPTS)  # pylint: disable=protected-access
  if gate == "low_threshold":  # the gate fires: the refusal is inserted as for the tokens
    gate = dataclasses.replace(model.gate_defaults, schedule="every", threshold=0.3)
  kw = dict(max_new_tokens=10, gate=gate)
  from_ids = model.decode(prompts, **kw)
  _same(model.decode(prompts, prompt_embeds=_embeds(model, prompts), **kw), from_ids)
  if isinstance(gate, GateConfig):
    assert any(g.refused for g in from_ids)
  if gate in ("every", "annealing"):
    assert max(len(g.cls_steps) for g in from_ids) > 1  # re-evaluations ran


def test_other_embeddings_decode_as_their_tokens(model):
  """Prompt A's ids with the embeddings of B (A's query tokens replaced, same length and
  roles) decode as B: the embeddings, not the ids, are read."""
  a = model._prompts(PROMPTS[:1])  # pylint: disable=protected-access
  query = [i for i, r in enumerate(a.roles[0]) if r == Role.QUERY]
  ids = list(a.ids[0])
  for i in query:
    ids[i] = (ids[i] + 7) % model.config.vocab_size
  b = Prompts.from_arrays([ids], a.roles)
  kw = dict(max_new_tokens=10, gate="every")
  as_b = model.decode(a, prompt_embeds=_embeds(model, b), **kw)
  _same(as_b, model.decode(b, **kw))
  assert as_b[0].cls_probs != model.decode(a, **kw)[0].cls_probs


def test_malformed_prompt_embeddings_are_refused(model):
  prompts = model._prompts(PROMPTS[:2])  # pylint: disable=protected-access
  x = _embeds(model, prompts)
  with pytest.raises(ValueError, match="one \\[L, D\\] array per prompt"):
    model.decode(prompts, max_new_tokens=4, prompt_embeds=x[:1])
  with pytest.raises(ValueError, match=r"prompt_embeds\[1\] has shape"):
    model.decode(prompts, max_new_tokens=4, prompt_embeds=[x[0], x[1][:-1]])
