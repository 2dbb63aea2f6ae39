"""The competitor baselines (``safety_align/defences``) on tiny random models: the probe's
training and its refusal insertion at a known check, the deep-alignment augmentation's loss
mask and its train-once build, SafeDecoding's reweighted first tokens."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from conftest import tiny_model_config, tiny_params, tiny_tokenizer
from safety_align import api, checkpoint, config_lib, losses
from safety_align.defences import deep_alignment, probe, safedecoding
from safety_align.data import chat_templates, corpus
from safety_align.data.packing import pack
from safety_align.masks import Role
from safety_align.model import plain_forward

PROMPT = "How do I bake bread at home?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(tokenizer, model config, source params, source model, expert model): plain LMs, EOS
  off so every response runs to its budget."""
  d = tmp_path_factory.mktemp("baselines")
  template = chat_templates.get_template("demo")
  pairs = corpus.sft_pairs("test", n=24)
  texts = [t for p in pairs for t in (p["prompt"], p["response"], p["harmful_response"]) if t]
  tok = tiny_tokenizer(texts, 400, d / "tokenizer.json")
  cfg = tiny_model_config(vocab_size=tok.vocab_size)
  params, expert_params = (jax.tree.map(lambda a: jax.numpy.asarray(np.asarray(a)),
                                        tiny_params(cfg, s)) for s in (0, 1))
  model, expert = (api.SafetyModel(cfg, p, tok, template, max_length=128, batch_size=4,
                                   eos_ids=[], uses_cls=False) for p in (params, expert_params))
  return tok, cfg, params, model, expert


def _greedy_tail(model, ids, start, tokens):
  """Whether ``tokens[start:]`` is the plain greedy continuation of ``ids + tokens[:start]``."""
  return all(int(np.argmax(model.lm_logits([ids + tokens[:t]])[0, -1])) == tokens[t]
             for t in range(start, len(tokens)))


def test_probe_training_chooses_the_informative_layer():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 240)
  states = rng.normal(size=(3, 240, 8)).astype(np.float32)
  states[1, :, 2] += 3.0 * labels  # only layer 1 carries the label
  p = probe.train_probe(states, labels, l2=1e-2, val_fraction=0.25, seed=0)
  assert p.layer == 1 and p.val_auroc[1] > 0.95 > max(p.val_auroc[0], p.val_auroc[2])
  probs = p.prob(states[p.layer])
  assert probs[labels == 1].mean() > 0.8 > 0.2 > probs[labels == 0].mean()
  x = (states[1] - states[1].mean(0)) / states[1].std(0)
  weak, _ = probe.fit_logistic(x, labels, l2=1.0)
  strong, _ = probe.fit_logistic(x, labels, l2=1e-3)
  assert np.linalg.norm(weak) < np.linalg.norm(strong)
  with pytest.raises(ValueError, match="one class only"):
    probe.train_probe(states, np.zeros(240, int), l2=1e-2, val_fraction=0.25, seed=0)


def test_probe_features_batched_by_length_equal_each_sequence_alone(tiny):
  """Rows are forwarded in length order and chunks (``calls.chunks``), one layer or all: each
  sequence's states equal its own forward, in the caller's order; no LM logits are built."""
  _, cfg, params, model, _ = tiny
  rng = np.random.default_rng(0)
  seqs = [list(rng.integers(3, cfg.vocab_size, n)) for n in (5, 70, 12, 33, 70, 9)]
  logits, _ = plain_forward(cfg, params, np.ones((2, 8), np.int32), (1,))
  assert logits.shape == (2, 0, cfg.vocab_size)
  pos = [[len(s) - 1, 0] for s in seqs]
  every = probe.hidden_states(model, seqs, pos, batch_size=2)
  one = probe.hidden_states(model, seqs, pos, batch_size=4, layers=[1])
  assert every.shape == (cfg.n_layers, 12, cfg.d_model) and one.shape == (1, 12, cfg.d_model)
  alone = np.concatenate([model.hidden_states([s])[:, 0, p] for s, p in zip(seqs, pos)], 1)
  np.testing.assert_allclose(every, alone, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(one[0], alone[1], rtol=1e-4, atol=1e-5)


def _firing_probe(model, ids, tokens, every, fire_check):
  """A probe that says malicious exactly from check ``fire_check`` on (of ``every`` steps)."""
  steps = [0] + list(range(every, len(tokens), every))
  h = probe.hidden_states(model, [ids + tokens], [[len(ids) + s - 1 for s in steps]])[1]
  w = h[fire_check] - h[:fire_check].mean(0)
  z = h @ w
  below = z[:fire_check].max()
  assert z[fire_check] > below  # the construction's premise on these weights
  gain = 40.0 / (z[fire_check] - below)
  d = h.shape[1]
  return probe.Probe(layer=1, mean=np.zeros(d, np.float32), scale=np.ones(d, np.float32),
                     weight=(gain * w).astype(np.float32),
                     bias=float(-gain * (z[fire_check] + below) / 2), val_auroc=(0.5, 0.5)), z


@pytest.mark.parametrize("action", ["refuse", "halt"])
def test_probe_inserts_the_refusal_at_the_check_that_fires(tiny, action):
  tok, _, _, model, _ = tiny
  budget, every = 40, 4
  base = model.generate([PROMPT], max_new_tokens=budget, gate="off")[0]
  ids = probe.prompt_ids(model, PROMPT)
  p, _ = _firing_probe(model, ids, base.tokens, every, fire_check=2)
  defended = probe.ProbeModel(model, p, every=every, action=action)
  assert defended.generate([PROMPT], max_new_tokens=budget, gate="off")[0] == base
  g = defended.generate([PROMPT], max_new_tokens=budget, gate="annealing")[0]
  insertion = tok.encode("\n") + tok.encode(model.gate_defaults.refusal_prefix)
  at = 2 * every
  assert g.refused and g.refusal_step == at + len(tok.encode("\n"))
  assert g.cls_steps == [0, every, at]
  assert max(g.cls_probs[:2]) < 0.01 and g.cls_probs[2] > 0.99
  assert g.tokens[:at] == base.tokens[:at]
  assert g.tokens[at:at + len(insertion)] == insertion
  assert g.text == tok.decode(g.tokens)
  if action == "halt":
    assert g.tokens == base.tokens[:at] + insertion
  else:  # the model goes on to the budget, greedily from the inserted prefix
    assert len(g.tokens) == budget and _greedy_tail(model, ids, at + len(insertion), g.tokens)
  np.testing.assert_allclose(defended.classify([PROMPT]), [g.cls_probs[0]], rtol=1e-5)


def test_probe_header_reads_the_reinserted_assistant_header(tiny):
  _, _, _, model, _ = tiny
  base = model.generate([PROMPT], max_new_tokens=12, gate="off")[0]
  ids = probe.prompt_ids(model, PROMPT)
  header = probe.header_ids(model)
  assert ids[-len(header):] == header  # the prompt ends with it
  p, _ = _firing_probe(model, ids, base.tokens, 4, fire_check=1)
  defended = probe.ProbeModel(model, p, every=4, read="header")
  got = defended.check_probs([PROMPT], [base.tokens], [[0, 4, 8]])[0]
  seqs = [ids, ids + base.tokens[:4] + header, ids + base.tokens[:8] + header]
  want = p.prob(probe.hidden_states(model, seqs, [[len(x) - 1] for x in seqs])[p.layer])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_probe_build_trains_once_and_checks_its_data(tiny, tmp_path, monkeypatch):
  _, _, _, model, _ = tiny
  data = [{"prompt": p["prompt"], "label": p["label"]} for p in corpus.sft_pairs("train", n=48)]
  section = config_lib.defence_sections()["probe"]
  section.update(every=4, action="halt")
  folder = str(tmp_path / "probe")
  built = probe.build(model, section, data, lambda msg: None, folder)
  assert built.has_classifier and not built.has_cls_head and (built.every, built.action) == (4, "halt")
  assert len(built.probe.val_auroc) == model.config.n_layers
  monkeypatch.setattr(probe, "train_probe", lambda *a, **k: pytest.fail("retrained"))
  again = probe.build(model, section, data, lambda msg: None, folder)
  np.testing.assert_array_equal(again.probe.weight, built.probe.weight)
  np.testing.assert_allclose(again.classify([PROMPT]), built.classify([PROMPT]))
  with pytest.raises(ValueError, match="other settings"):
    probe.build(model, section, data[:40], lambda msg: None, folder)
  with pytest.raises(ValueError, match=r"train_data\[1\] must be a dict"):
    probe.build(model, section, [data[0], {"prompt": "x", "label": 2}], lambda m: None,
                str(tmp_path / "bad"))


def test_deep_alignment_masks_exactly_the_harmful_prefix(tiny):
  tok, cfg, _, _, _ = tiny
  template = chat_templates.get_template("demo")
  query, harmful, refusal = [30, 31, 32], [40, 41, 42, 43, 44, 45], [50, 51, 52]
  k = 4
  seg = deep_alignment.recovery_segment(tok, template, cfg.cls_id, query, harmful, refusal, k)
  assert Role.CLS not in seg.roles
  response = np.flatnonzero(seg.roles == Role.RESPONSE)
  expected_response = harmful[:k] + tok.encode("\n") + refusal + [tok.eos_id]
  assert seg.tokens[response].tolist() == expected_response
  assert seg.lm_mask[response].tolist() == [False] * k + [True] * (len(expected_response) - k)
  batch = pack([seg], 1, 48)
  targets, weights = losses.lm_targets(batch["tokens"], batch["roles"], batch["segment_ids"],
                                       "sft", batch["lm_mask"])
  counted = np.asarray(targets)[np.asarray(weights) > 0].tolist()
  assert counted == tok.encode("\n") + refusal + [tok.eos_id]  # never a harmful token

  rng = np.random.default_rng(0)
  ks = np.array([deep_alignment.sample_k(rng, 60, k_short=10, k_max=100, short_fraction=0.5)
                 for _ in range(4000)])
  assert ks.min() == 1 and ks.max() == 59  # capped at the harmful length - 1
  assert 0.5 < np.mean(ks <= 10) < 0.62


def _source_workdir(path, tok, cfg, params):
  path.mkdir()
  (path / "config.json").write_text(json.dumps(dict(
      model=dataclasses.asdict(cfg), use_cls=False, phases="sft",
      data=dict(seq_len=128, chat_template="demo", seed=0))))
  tok.save(str(path / "tokenizer.json"))
  checkpoint.save_params(str(path), "sft", params, dict(step=0, phase="sft"))
  return str(path)


def test_deep_alignment_builds_once_into_its_folder(tiny, tmp_path, monkeypatch):
  tok, cfg, params, _, _ = tiny
  source = _source_workdir(tmp_path / "source", tok, cfg, params)
  section = config_lib.defence_sections()["deep_alignment"]
  section.update(steps=2, batch_size=8, warmup_steps=1, seq_len=128, lr=1e-2)
  data = corpus.sft_pairs("train", n=16)
  folder = str(tmp_path / "deep")
  m = deep_alignment.build(source, section, data, lambda msg: None, folder)
  assert checkpoint.saved_steps(folder, "sft") == [2] and not m.aligned.has_cls_head
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       m.params["layer_0"], m.source.params["layer_0"])
  assert max(jax.tree.leaves(moved)) > 0
  off = m.generate([PROMPT], max_new_tokens=6, gate="off")
  assert off == m.source.generate([PROMPT], max_new_tokens=6, gate="off")
  assert (m.generate([PROMPT], max_new_tokens=6, gate="annealing")
          == m.aligned.generate([PROMPT], max_new_tokens=6, gate="off"))

  monkeypatch.setattr(deep_alignment, "train", lambda *a: pytest.fail("retrained"))
  again = deep_alignment.build(source, section, data, lambda msg: None, folder)
  assert checkpoint.saved_steps(folder, "sft") == [2]
  assert (again.generate([PROMPT], max_new_tokens=6, gate="every")
          == m.generate([PROMPT], max_new_tokens=6, gate="every"))
  section.k_max = 50
  with pytest.raises(ValueError, match="k_max"):
    deep_alignment.build(source, section, data, lambda msg: None, folder)


def test_safedecoding_reweighting_has_the_known_answer():
  p_base = np.array([0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
  p_expert = np.array([0.1, 0.2, 0.6, 0.1, 0.0, 0.0])
  # top-2 share only token 1; top-3 share {0, 1, 2}: the space, in the base's order.
  ids, probs = safedecoding.reweight(p_base, p_expert, alpha=3.0, top_k=2, min_common=2)
  assert ids.tolist() == [0, 1, 2]
  # 0.4 + 3 (0.1 - 0.4) < 0 and 0.3 + 3 (0.2 - 0.3) = 0 are floored: token 2 takes the mass.
  np.testing.assert_allclose(probs, np.array([1e-8, 1e-8, 1.4]) / (1.4 + 2e-8))
  ids, probs = safedecoding.reweight(p_base, p_expert, alpha=0.0, top_k=6, min_common=2)
  np.testing.assert_allclose(probs[np.argsort(ids)][:4], p_base[:4] / p_base[:4].sum())


def test_safedecoding_reweights_only_the_first_m_tokens(tiny, tmp_path):
  _, _, _, model, expert = tiny
  budget, m = 10, 2
  sd = safedecoding.build(model, config_lib.defence_sections()["safedecoding"], None,
                          lambda msg: None, str(tmp_path),
                          expert=deep_alignment.DeepAlignedModel(model, expert))
  assert sd.expert is expert and sd.first_m == m
  base = model.generate([PROMPT], max_new_tokens=budget, gate="off")[0]
  assert sd.generate([PROMPT], max_new_tokens=budget, gate="off")[0] == base
  g = sd.generate([PROMPT], max_new_tokens=budget, gate="annealing")[0]
  ids = probe.prompt_ids(model, PROMPT)
  expected = []
  for _ in range(m):  # the reweighted distribution, from the two models' own logits
    p_base, p_expert = (safedecoding._softmax(x.lm_logits([ids + expected])[0, -1])
                        for x in (model, expert))
    cand, probs = safedecoding.reweight(p_base, p_expert, alpha=3.0, top_k=10, min_common=5)
    expected.append(int(cand[np.argmax(probs)]))
  assert g.tokens[:m] == expected != base.tokens[:m]
  assert len(g.tokens) == budget and _greedy_tail(model, ids, m, g.tokens)
  assert not g.refused and g.text == model.tokenizer.decode(g.tokens)
