"""GCG on a tiny random model: cached-prefix parity, gradients, progress, acceptance rules,
adaptivity (first classification and the gate's window rows), filter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from conftest import tiny_model_config
from safety_align.attacks import gcg as gcg_lib
from safety_align.attacks import gcg_layout as layout_lib
from safety_align.data.packing import build_segment, pack
from safety_align.decode import GateConfig
from safety_align.masks import Role
from safety_align.model import Transformer, forward_batch, init_params

TEXTS = ["how do I pick a lock on a door", "Sure, here is how to pick a lock",
         "the quick brown fox jumps over the lazy dog", "tell me a story about a dragon!",
         "here is a recipe for bread: flour, water, salt and yeast."] * 4


class _Tokenizer:
  """encode/decode over a byte-level BPE with <pad>, <s>, </s> at ids 0, 1, 2."""

  def __init__(self, hf):
    self.hf, self.vocab_size = hf, hf.get_vocab_size()
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

  def encode(self, text):
    return self.hf.encode(text, add_special_tokens=False).ids

  def decode(self, ids):
    return self.hf.decode([int(i) for i in ids])


@pytest.fixture(scope="module")
def tok():
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.train_from_iterator(TEXTS, trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return _Tokenizer(hf)


@pytest.fixture(scope="module")
def setup(tok):
  cfg = tiny_model_config(vocab_size=tok.vocab_size, init_scale=0.3)
  params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(0)))
  pieces = [([tok.bos_id], Role.BOS), (tok.encode("<user> "), Role.TEMPLATE),
            (tok.encode("how do I pick a lock"), Role.QUERY),
            (tok.encode(" <bot>:"), Role.TEMPLATE)]
  return cfg, params, pieces, tok.encode("Sure, here is how")


def _full_forward(cfg, params, pieces, suffix, target, windows=()):
  """(target cross-entropy, P(malicious), window rows' P(malicious) [W]) from a
  training-layout forward (sft mask; ``windows``: (lo, hi) response-index window rows)."""
  prefix, closing = layout_lib.split_prompt(pieces)
  seg = build_segment(cfg.cls_id, prefix + [(list(suffix), Role.QUERY)] + closing
                      + [(list(target), Role.RESPONSE)], label=-1,
                      windows=[(lo, hi, -1) for lo, hi in windows])
  batch = pack([seg], 1, len(seg))
  forward = jax.jit(forward_batch, static_argnums=(0, 3))
  lm, cls = forward(Transformer(cfg), params, batch, "sft")
  logp = jax.nn.log_softmax(lm[0, -len(target) - 1:-1], axis=-1)
  ce = -jnp.mean(logp[jnp.arange(len(target)), jnp.array(target)])
  probs = np.asarray(jax.nn.softmax(cls[0, :1 + len(windows)])[:, 1])
  return float(ce), float(probs[0]), probs[1:]


def _malicious_head(params):
  """A head that calls the query malicious (P ~ 0.9) and is sensitive to what [CLS] reads."""
  head = params["cls_head"]
  return {**params, "cls_head": {"kernel": head["kernel"] * 2.0,
                                 "bias": jnp.array([0.0, 2.2], jnp.float32)}}


def test_cached_prefix_equals_full_forward(setup):
  cfg, params, pieces, target = setup
  layout = layout_lib.build_layout(cfg, pieces, target, n_suffix=4)
  cache = layout_lib.prefill(cfg, params, layout)
  cands = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(3, 4)).astype(np.int32)
  out = gcg_lib.candidate_metrics(cfg, params, cache, layout, cands, 0.0)
  for i, cand in enumerate(cands):
    ce, p_mal, _ = _full_forward(cfg, params, pieces, cand, target)
    np.testing.assert_allclose(out.ce[i], ce, rtol=1e-5)
    np.testing.assert_allclose(out.p_malicious[i], p_mal, rtol=1e-5, atol=1e-6)
  # The adaptive loss adds cls_weight * -log P(benign).
  adaptive = gcg_lib.candidate_metrics(cfg, params, cache, layout, cands, 2.0)
  np.testing.assert_allclose(adaptive.loss, out.ce - 2.0 * np.log1p(-out.p_malicious), rtol=1e-5)


def test_onehot_gradient_matches_finite_differences(setup):
  cfg, params, pieces, target = setup
  layout = layout_lib.build_layout(cfg, pieces, target, n_suffix=4)
  cache = layout_lib.prefill(cfg, params, layout)
  suffix = np.array([40, 50, 60, 70], np.int32)
  metrics, grad = gcg_lib.token_gradients(cfg, params, cache, layout, suffix, 1.0)
  # At an exact one-hot the relaxed loss is the discrete loss.
  discrete = gcg_lib.candidate_metrics(cfg, params, cache, layout, suffix[None], 1.0)
  np.testing.assert_allclose(metrics.loss, discrete.loss, rtol=1e-5)
  onehot = jax.nn.one_hot(suffix, cfg.vocab_size)
  loss = jax.jit(lambda oh: gcg_lib.suffix_loss(cfg, params, cache, layout, oh, 1.0)[0])
  h = 1e-2
  for pos, tok_id in [(0, 100), (2, 7), (3, 200)]:
    d = jnp.zeros_like(onehot).at[pos, tok_id].set(1.0).at[pos, suffix[pos]].set(-1.0)
    fd = (loss(onehot + h * d) - loss(onehot - h * d)) / (2 * h)
    np.testing.assert_allclose(fd, grad[pos, tok_id] - grad[pos, suffix[pos]], rtol=2e-2,
                               atol=1e-4)


def test_gcg_lowers_the_loss_without_recompiling(setup, tok):
  cfg, params, pieces, target = setup
  config = gcg_lib.GCGConfig(steps=6, search_width=24, topk=16, n_suffix=5, early_stop=False)
  fns = (layout_lib.prefill, gcg_lib._top_tokens, gcg_lib.candidate_metrics)
  before = [f._cache_size() for f in fns]
  result = gcg_lib.gcg(cfg, params, tok, pieces, target, config)
  assert [f._cache_size() - b for f, b in zip(fns, before)] == [1, 1, 1]
  assert result.steps_run == 6 and len(result.losses) == 7
  # best_seen: the returned suffix is the last kept one, and the lowest loss recorded.
  assert result.best_loss == result.losses[-1] == result.losses.min() < result.losses[0]
  assert len(result.suffix_ids) == 5 and result.suffix_text == tok.decode(result.suffix_ids)
  # The reported loss is the suffix's loss, re-evaluated from scratch.
  ce, _, _ = _full_forward(cfg, params, pieces, result.suffix_ids, target)
  np.testing.assert_allclose(result.best_loss, ce, rtol=1e-4)


def test_always_move_can_rise_and_returns_the_best_seen(setup, tok):
  cfg, params, pieces, target = setup
  config = gcg_lib.GCGConfig(steps=8, search_width=2, topk=16, n_suffix=5, early_stop=False,
                             acceptance="always_move")
  result = gcg_lib.gcg(cfg, params, tok, pieces, target, config)
  assert np.any(np.diff(result.losses) > 0)  # moved to a worse candidate at least once
  assert result.best_loss == result.losses.min()
  ce, _, _ = _full_forward(cfg, params, pieces, result.suffix_ids, target)
  np.testing.assert_allclose(ce, result.best_loss, rtol=1e-4)
  with pytest.raises(ValueError, match="acceptance"):
    gcg_lib.GCGConfig(acceptance="greedy")


@pytest.mark.parametrize("acceptance", gcg_lib.ACCEPTANCE)
def test_one_token_suffix_reaches_the_brute_force_optimum(setup, tok, acceptance):
  cfg, params, pieces, target = setup
  layout = layout_lib.build_layout(cfg, pieces, target, n_suffix=1)
  cache = layout_lib.prefill(cfg, params, layout)
  query = layout_lib.split_prompt(pieces)[0][-1][0]
  allowed = np.nonzero(gcg_lib.allowed_tokens(tok, cfg.vocab_size, False))[0]
  allowed = allowed[gcg_lib.retokenizes(tok, allowed[:, None], query)]
  losses = gcg_lib.candidate_metrics(cfg, params, cache, layout, allowed[:, None], 0.0).loss
  # Every allowed token is a top-k token; 2048 draws cover them all, so one step finds the best.
  config = gcg_lib.GCGConfig(steps=1, search_width=2048, topk=len(allowed), n_suffix=1,
                             early_stop=False, acceptance=acceptance)
  result = gcg_lib.gcg(cfg, params, tok, pieces, target, config)
  assert result.suffix_ids == (int(allowed[np.argmin(losses)]),)
  np.testing.assert_allclose(result.best_loss, float(np.min(losses)), rtol=1e-5)


def test_adaptive_gcg_lowers_p_malicious(setup, tok):
  cfg, params, pieces, target = setup
  params = _malicious_head(params)
  config = gcg_lib.GCGConfig(steps=6, search_width=24, topk=16, n_suffix=5, early_stop=False,
                             cls_weight=2.0)
  plain = gcg_lib.gcg(cfg, params, tok, pieces, target, config)
  adaptive = gcg_lib.gcg(cfg, params, tok, pieces, target, config, adaptive=True)
  assert plain.cls_probs[0] == pytest.approx(adaptive.cls_probs[0]) and plain.cls_probs[0] > 0.5
  assert adaptive.cls_prob < adaptive.cls_probs[0]
  assert adaptive.cls_prob < plain.cls_prob


GATE = GateConfig(schedule="every", r1=2, r2=2)


def test_gate_windows_follow_the_schedule():
  w = layout_lib.gate_windows(GateConfig(r1=3, r2=2), 6)  # annealing: steps 1, 2, 3, 5
  rows = list(zip(np.asarray(w.sees_query).tolist(), np.asarray(w.lo).tolist(),
                  np.asarray(w.hi).tolist()))
  assert rows == [(False, 0, 0), (True, 0, 0), (False, 0, 1), (True, 0, 1), (False, 1, 2),
                  (True, 0, 2), (False, 3, 4)]
  assert not len(layout_lib.gate_windows(GateConfig(schedule="first"), 6))


def test_window_rows_match_training_layout_and_enter_the_loss(setup):
  cfg, params, pieces, target = setup
  params = _malicious_head(params)
  windows = layout_lib.gate_windows(GATE, len(target))
  layout = layout_lib.build_layout(cfg, pieces, target, n_suffix=4, windows=windows)
  cache = layout_lib.prefill(cfg, params, layout)
  suffix = np.array([40, 50, 60, 70], np.int32)
  m = gcg_lib.candidate_metrics(cfg, params, cache, layout, suffix[None], 2.0, 0.5)
  # Rule-2 rows (no QUERY) are exactly the SFT window-augmentation rows of training.
  rule2 = ~np.asarray(windows.sees_query)
  spans = list(zip(np.asarray(windows.lo)[rule2], np.asarray(windows.hi)[rule2]))
  ce, p0, p_win = _full_forward(cfg, params, pieces, suffix, target, spans)
  np.testing.assert_allclose(m.window_p[0, rule2], p_win, rtol=1e-5, atol=1e-6)
  # Rule-1 rows also read the QUERY (suffix included): different from the rule-2 row of the
  # same span.
  assert not np.allclose(m.window_p[0, ~rule2], m.window_p[0, rule2][:(~rule2).sum()])
  # loss = CE + cls_weight * (-log P_benign(first) + window_weight * mean -log P_benign(window)).
  # (From float32 probabilities near 1, so to 5e-4: a wrong weight is off by whole units.)
  hand = ce + 2.0 * (-np.log1p(-p0) + 0.5 * np.mean(-np.log1p(-np.asarray(m.window_p[0]))))
  np.testing.assert_allclose(m.loss[0], hand, rtol=5e-4)
  # The window term reaches the suffix's gradient (rule 1 reads it; rule 2 through the target).
  _, g_off = gcg_lib.token_gradients(cfg, params, cache, layout, suffix, 2.0, 0.0)
  _, g_on = gcg_lib.token_gradients(cfg, params, cache, layout, suffix, 2.0, 1.0)
  assert np.abs(np.asarray(g_on - g_off)).max() > 1e-3


def test_adaptive_gcg_with_the_gate_lowers_the_window_rows(setup, tok):
  cfg, params, pieces, target = setup
  params = _malicious_head(params)
  config = gcg_lib.GCGConfig(steps=6, search_width=24, topk=16, n_suffix=5, early_stop=False,
                             cls_weight=2.0, window_weight=4.0, window_schedule="every")
  first_only = gcg_lib.gcg(cfg, params, tok, pieces, target, config, adaptive=True)
  gated = gcg_lib.gcg(cfg, params, tok, pieces, target, config, adaptive=True, gate=GATE)
  assert first_only.window_probs.max() == 0.0  # no window rows without a gate
  assert gated.window_prob < gated.window_probs[0]
  # Its reported window max is the one of its suffix's window rows, recomputed.
  layout = layout_lib.build_layout(cfg, pieces, target, 5,
                                   layout_lib.gate_windows(GATE, len(target)))
  m = gcg_lib.candidate_metrics(cfg, params, layout_lib.prefill(cfg, params, layout), layout,
                                np.array([gated.suffix_ids]), 0.0)
  np.testing.assert_allclose(gated.window_prob, float(m.window_p.max()), rtol=1e-5)


def test_plain_lm_layout_has_no_cls(setup, tok):
  cfg, params, pieces, target = setup
  layout = layout_lib.build_layout(cfg, pieces, target, n_suffix=4, use_cls=False)
  assert not np.any(np.asarray(layout.block_tokens) == cfg.cls_id)
  cache = layout_lib.prefill(cfg, params, layout)
  suffix = np.array([[40, 50, 60, 70]], np.int32)
  m = gcg_lib.candidate_metrics(cfg, params, cache, layout, suffix, 0.0)
  # The plain causal LM over the same tokens (no [CLS] anywhere).
  prefix, closing = layout_lib.split_prompt(pieces)
  ids = [t for p, _ in prefix for t in p] + suffix[0].tolist() + [
      t for p, _ in closing for t in p] + list(target)
  n = len(ids)
  lm, _, _ = Transformer(cfg).apply({"params": params}, jnp.array([ids]),
                                    jnp.arange(n)[None], jnp.tril(jnp.ones((1, n, n), bool)))
  logp = jax.nn.log_softmax(lm[0, n - len(target) - 1:-1], axis=-1)
  ce = -np.mean(np.asarray(logp)[np.arange(len(target)), target])
  np.testing.assert_allclose(m.ce[0], ce, rtol=1e-5)
  assert np.isnan(m.p_malicious[0])
  with pytest.raises(ValueError, match="needs a model with"):
    gcg_lib.gcg(cfg, params, tok, pieces, target, gcg_lib.GCGConfig(steps=1), adaptive=True,
                use_cls=False)


def test_retokenization_filter(tok):
  merged = next(i for i in range(3, tok.vocab_size)
                if len(tok.decode([i])) == 2 and tok.decode([i]).isalpha())
  a, b = (tok.encode(c)[0] for c in tok.decode([merged]))
  assert tok.encode(tok.decode([merged])) == [merged]
  keep = gcg_lib.retokenizes(tok, np.array([[merged], [a], [b]]))
  assert keep.tolist() == [True, True, True]
  # Two single characters re-encode as their merge, alone or after a query ending in one.
  assert not gcg_lib.retokenizes(tok, np.array([[a, b]]))[0]
  assert not gcg_lib.retokenizes(tok, np.array([[b]]), context_ids=[a])[0]


def test_allowed_tokens_exclude_specials(tok):
  allowed = gcg_lib.allowed_tokens(tok, tok.vocab_size + 5, allow_non_ascii=False)
  assert not allowed[[0, 1, 2]].any() and not allowed[tok.vocab_size:].any()
  assert allowed[tok.encode("!")[0]]
  assert not allowed[tok.encode("é")].any()
  assert gcg_lib.allowed_tokens(tok, tok.vocab_size, allow_non_ascii=True).sum() > allowed.sum()
