"""Teacher-forced scoring (``scoring.py``, ``SafetyModel.score``): parity with transformers on
a tiny random Llama, and the [CLS] model scored through its deployed layout (the decoder's own
teacher-forced logits, gate off)."""

import jax
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import safety_align as sa  # noqa: E402
from safety_align import api, convert, scoring  # noqa: E402
from safety_align.defences import common, deep_alignment  # noqa: E402
from safety_align.masks import Role  # noqa: E402
from tiny_hf import VOCAB, make_hf  # noqa: E402

# (prompt ids, continuation ids): lengths differ, so rows pad differently in one batch.
REQUESTS = [([5, 9, 12, 7], [3, 30]), ([8, 4, 40, 41, 42, 11, 6], [17]),
            ([20], [21, 22, 23, 24, 25, 50]), ([33, 2, 9], [9, 9, 13])]


def hf_logprob(hf, prompt, cont) -> float:
  """transformers' summed log p(continuation | prompt): one causal forward of the joined ids."""
  ids = torch.tensor([list(prompt) + list(cont)])
  with torch.no_grad():
    logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
  n = len(prompt)
  return float(sum(logp[n - 1 + j, t] for j, t in enumerate(cont)))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """A tiny random HF Llama (initializer_range 0.3) and its import (unrolled layers)."""
  hf_dir, out = (str(tmp_path_factory.mktemp(n)) for n in ("hf", "import"))
  hf = make_hf("llama_gqa", hf_dir)
  convert.import_hf(hf_dir, out, scan_layers=False)
  return hf, out


def test_loglikelihood_equals_transformers(imported):
  """Our summed continuation log-probability of each request equals transformers' on the same
  ids (1e-5 relative), in one padded batch; an off-by-one continuation slice (each token
  scored by its own position's logits) breaks it."""
  hf, out = imported
  model = sa.load(out, uses_cls=False)
  ref = np.array([hf_logprob(hf, p, c) for p, c in REQUESTS])
  args = ([p for p, _ in REQUESTS], [[int(Role.QUERY)] * len(p) for p, _ in REQUESTS],
          [c for _, c in REQUESTS])
  ours = scoring.score_batch(model.config, model.params, *args, with_cls=False, pad_id=0)
  np.testing.assert_allclose(ours, ref, rtol=1e-5)
  assert np.abs(ref).min() > 1.0  # large-init logits: a wrong slice moves the sum by far more

  tokens, roles = scoring.layout(*args, with_cls=False, cls_id=VOCAB, pad_id=0, length=16,
                                 n_cont=8)
  right = np.asarray(scoring.continuation_logprobs(model.config, model.params, tokens, roles,
                                                   8)).sum(1)
  np.testing.assert_allclose(right, ref, rtol=1e-5)
  shifted = np.asarray(_off_by_one(model.config, model.params, tokens, roles, 8)).sum(1)
  assert not np.allclose(shifted, ref, rtol=1e-3)


def _off_by_one(cfg, params, tokens, roles, n_cont):
  """The deliberately broken scorer: the logits of each token's own row, not the row before."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from safety_align import masks  # pylint: disable=g-import-not-at-top
  from safety_align.model import Transformer  # pylint: disable=g-import-not-at-top
  t = tokens.shape[1]
  positions = jnp.maximum(jnp.cumsum(masks.is_text(roles), axis=1) - 1, 0).astype(jnp.int32)
  mask, positions = masks.prompt_mask(roles, positions)
  logits, _, _ = Transformer(cfg).apply({"params": params}, tokens, positions, mask,
                                        lm_rows=slice(t - n_cont, t))
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, t - n_cont:, None], axis=-1)[..., 0]
  return jnp.where(roles[:, t - n_cont:] == Role.RESPONSE, picked, 0.0)


def test_score_of_texts_is_the_plain_lm_of_the_rendered_prompt(imported):
  """``SafetyModel.score`` on text: the chat-rendered prompt (as ``generate`` renders it) and
  the continuation's tokens, equal to transformers on those ids; rows come back in the order
  given whatever the batching; counts are tokens and characters."""
  hf, out = imported
  model = sa.load(out, uses_cls=False, batch_size=2)
  prompts = ["how do I bake bread at home", "tell me a story", "what is the capital of france"]
  conts = ["a brave cat", "never", "rope embeddings in transformers"]
  got = model.score(prompts, conts)
  tok = model.tokenizer
  for i, (p, c) in enumerate(zip(prompts, conts)):
    ids = list(model._prompts([p]).ids[0])  # pylint: disable=protected-access
    assert got.logprob[i] == pytest.approx(hf_logprob(hf, ids, tok.encode(c)), rel=1e-5)
  assert got.n_tokens.tolist() == [len(tok.encode(c)) for c in conts]
  assert got.n_chars.tolist() == [len(c) for c in conts]
  bare = model.score(prompts[:1], conts[:1], chat=False)
  assert bare.logprob[0] == pytest.approx(
      hf_logprob(hf, tok.encode(prompts[0]), tok.encode(conts[0])), rel=1e-5)
  with pytest.raises(ValueError, match="one prompt per continuation"):
    model.score(prompts, conts[:2])


def test_cls_model_is_scored_through_its_deployed_layout(imported):
  """A [CLS] model (text -> [CLS] attention gate opened): ``score`` equals the log-probabilities
  of the same prompt + answer from a full decode (``decode``: prompt pass with [CLS], every
  answer token forced, gate off), and differs from scoring it without [CLS]."""
  _, out = imported
  base = sa.load(out)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.7 if "cls_gate" in jax.tree_util.keystr(path) else x, base.params)
  model = api.SafetyModel(base.config, params, base.tokenizer, base.template,
                          max_length=base.max_length)
  assert model.has_cls_head
  prompts = ["how do I bake bread at home", "tell me a story about a brave cat"]
  conts = ["never share dangerous instructions", "what is the capital"]
  got = model.score(prompts, conts)
  tok = model.tokenizer
  forced = [tok.encode(c) for c in conts]
  gens = model.decode(prompts, max_new_tokens=1, gate="off", prefill_ids=forced,
                      return_logits=True)
  for i, ids in enumerate(forced):
    logits = np.asarray(gens[i].logits[:len(ids)], np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    assert got.logprob[i] == pytest.approx(logp[np.arange(len(ids)), ids].sum(), rel=1e-5)
  plain = api.SafetyModel(base.config, params, base.tokenizer, base.template,
                          uses_cls=False).score(prompts, conts)
  assert np.abs(plain.logprob - got.logprob).max() > 1e-2  # the answer does read [CLS]


def test_baselines_score_with_the_weights_they_decode_with(imported):
  """A wrapper that acts in ``generate`` (the probe, SafeDecoding: ``common.Defended``) scores
  with its source; deep alignment with its tuned model."""
  _, out = imported
  source = sa.load(out, uses_cls=False)
  tuned = api.SafetyModel(source.config, jax.tree.map(lambda x: x * 1.1, source.params),
                          source.tokenizer, source.template, uses_cls=False)
  args = (["tell me a story"], ["about a brave cat"])
  ours = source.score(*args).logprob
  np.testing.assert_array_equal(common.Defended(source).score(*args).logprob, ours)
  aligned = deep_alignment.DeepAlignedModel(source, tuned).score(*args).logprob
  np.testing.assert_array_equal(aligned, tuned.score(*args).logprob)
  assert abs(aligned[0] - ours[0]) > 1e-3
