"""The attacks that know the whole defence, on a tiny random model: adaptive prefill (beam
search against the gate's window rows), soft-prompt embedding attack, fine-tuning attack; GCG's
search shared by the baselines that wrap one source model."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_model_config, tiny_params, tiny_tokenizer
from safety_align import api, config_lib
from safety_align.attacks import gcg as gcg_lib
from safety_align.attacks import gcg_layout as layout_lib
from safety_align.attacks import embedding, finetune, prefill_adaptive
from safety_align.attacks.base import GATE_OFF, Item, RunSettings
from safety_align.attacks.gcg_attack import GCGAttack
from safety_align.data import chat_templates, corpus
from safety_align.decode import GateConfig
from safety_align.defences import common
from safety_align.eval import config as eval_config
from safety_align.eval import registry

GATES = [GATE_OFF, "annealing"]
SETTINGS = RunSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  d = tmp_path_factory.mktemp("adaptive")
  template = chat_templates.get_template("demo")
  pairs = corpus.sft_pairs("train", n=24)
  texts = [t for p in pairs for t in (p["prompt"], p["response"], p["harmful_response"]) if t]
  tok = tiny_tokenizer(texts, 400, d / "tokenizer.json")
  cfg = tiny_model_config(vocab_size=tok.vocab_size)
  params = tiny_params(cfg)
  # A [CLS] head whose window rows sit near the threshold and follow what they read.
  head = params["cls_head"]
  params = {**params, "cls_head": {"kernel": head["kernel"] * 3.0,
                                   "bias": jnp.array([0.0, 0.3], jnp.float32)}}
  gate = GateConfig(schedule="annealing", r1=4, r2=4)
  return api.SafetyModel(cfg, params, tok, template, gate, max_length=160, batch_size=8)


@pytest.fixture(scope="module")
def items():
  return [Item.from_pair(p) for p in corpus.sft_pairs("test", n=12) if p["label"] == 1][:2]


def _beam(model, item, **kw):
  tok = model.tokenizer
  opening = tok.encode(tok.decode(tok.encode(item.harmful_response)[:3]))
  settings = {**dict(n_tokens=8, width=3, topk=4, penalty=4.0), **kw}
  return prefill_adaptive.beam_prefill(
      model.config, model.params, tok, model.template.prompt_pieces(tok, item.prompt), opening,
      gate=dataclasses.replace(model.gate_defaults, schedule="every"),
      allowed=gcg_lib.allowed_tokens(tok, model.config.vocab_size, True), **settings)


def test_beam_prefill_keeps_the_windows_lower_than_greedy(model, items):
  for item in items:
    adaptive = _beam(model, item)
    greedy = _beam(model, item, width=1, topk=1, penalty=0.0)
    assert len(adaptive.ids) == len(greedy.ids) == 3 + 8
    assert adaptive.ids[:3] == greedy.ids[:3]
    assert adaptive.steps == greedy.steps == tuple(range(1, 12))  # "every": each step
    assert len(adaptive.window_probs) == 11
    assert adaptive.max_prob <= greedy.max_prob
    assert sum(adaptive.window_probs) < sum(greedy.window_probs)
    # Greedy with no penalty is the model's own continuation: its argmax at every step.
    assert greedy.logp >= adaptive.logp


def test_prefill_adaptive_attack_records(model, items):
  cfg = ml_collections.ConfigDict(
      dict(prefill_adaptive=config_lib.attack_sections(True)["prefill_adaptive"]))
  cfg.prefill_adaptive.update(n_tokens=4, width=2, topk=2)
  attack = prefill_adaptive.PrefillAdaptiveAttack.from_config(cfg)
  assert attack.name == "prefill_adaptive"
  recs = attack.run(model, items, GATES, SETTINGS)
  assert sorted((r.gate, r.item) for r in recs) == sorted((g, i) for g in GATES for i in (0, 1))
  for r in recs:
    assert r.n_forced == len(model.tokenizer.encode(r.prefill)) == 5 + 4
    assert r.extra["n_opening"] == 5 and r.extra["n_chosen"] == 4
    assert r.extra["prefill_cls_max"] == max(r.extra["prefill_cls_probs"])
    assert r.extra["prefill_cls_steps"] == [1, 2, 3, 5, 8]  # annealing within 9 tokens
  assert set(attack.summary(recs, np.zeros(len(recs), bool))) == {"mean_prefill_cls_max",
                                                                  "mean_prefill_tokens"}
  # Without [CLS]: a plain likelihood beam, no gate term.
  plain = api.SafetyModel(model.config, model.params, model.tokenizer, model.template,
                          max_length=160, uses_cls=False)
  base = attack.run_baseline(plain, items, [], SETTINGS)
  assert {r.gate for r in base} == {GATE_OFF} and len(base) == 2
  assert all(r.extra["prefill_cls_probs"] == [] and r.extra["first_cls_prob"] is None
             for r in base)
  cfg.prefill_adaptive = dict(config_lib.attack_sections()["prefill_adaptive"], widht=3)
  with pytest.raises(ValueError, match="widht"):
    prefill_adaptive.PrefillAdaptiveAttack.from_config(cfg)


def _target(model, item, n=6):
  return model.tokenizer.encode(item.target)[:n]


def test_soft_prompt_beats_init_and_discrete_gcg_on_the_same_budget(model, items):
  tok, item = model.tokenizer, items[0]
  pieces = model.template.prompt_pieces(tok, item.prompt)
  target, gate = _target(model, item), model.gate_defaults
  result = embedding.soft_prompt(model.config, model.params, tok, pieces, target, steps=8,
                                 lr=0.3, n_suffix=4, cls_weight=1.0, window_weight=1.0,
                                 gate=gate, success_ce=0.5)
  config = gcg_lib.GCGConfig(steps=8, search_width=16, topk=16, n_suffix=4, early_stop=False)
  discrete = gcg_lib.gcg(model.config, model.params, tok, pieces, target, config,
                         adaptive=True, gate=gate)
  # The same objective: at the initial suffix ("!" x 4) both losses agree, [CLS] terms included.
  np.testing.assert_allclose(result.losses[0], discrete.losses[0], rtol=1e-5)
  layout = layout_lib.build_layout(model.config, pieces, target, 4,
                                   layout_lib.gate_windows(gate, len(target)))
  cache = layout_lib.prefill(model.config, model.params, layout)
  init = np.full((1, 4), tok.encode("!")[0], np.int32)
  ce_only = gcg_lib.candidate_metrics(model.config, model.params, cache, layout, init, 0.0)
  assert result.losses[0] > float(ce_only.loss[0]) + 0.1  # the [CLS] terms are in it
  assert result.loss == result.losses.min() < result.losses[0]
  assert result.loss < discrete.best_loss


def test_embedding_attack_generates_under_each_gate(model, items):
  cfg = ml_collections.ConfigDict(dict(embedding=config_lib.attack_sections(True)["embedding"]))
  cfg.embedding.update(n_prompts=1, steps=2, n_suffix=3, target_tokens=4)
  attack = embedding.EmbeddingAttack.from_config(cfg)
  # "every" re-evaluates at each step: its trace is the prefill + one per generated token.
  recs = attack.run(model, items, GATES + ["every"], SETTINGS)
  assert [r.gate for r in recs] == GATES + ["every"] and {r.item for r in recs} == {0}
  off, _, every = recs
  assert off.cls_steps == [0] and off.prefill == "" and not off.refused
  assert every.cls_steps[:2] == [0, 1] and len(every.cls_probs) == len(every.cls_steps)
  assert all(r.extra["upper_bound"] == embedding.UPPER_BOUND for r in recs)
  summary = attack.summary(recs, np.zeros(3, bool))
  assert summary["upper_bound"] == embedding.UPPER_BOUND and 0 <= summary["loss_success"] <= 1
  # Without [CLS] (the no-[CLS] baseline): cross-entropy only, no gate trace.
  plain = api.SafetyModel(model.config, model.params, model.tokenizer, model.template,
                          max_length=160, uses_cls=False)
  base = attack.run_baseline(plain, items, [], SETTINGS)
  assert [r.gate for r in base] == [GATE_OFF] and base[0].cls_probs == []
  # A soft prompt equal to real token embeddings reproduces generate() on that text under
  # every gate (the compiled gated decoder, re-evaluations included): same tokens, trace.
  tok, item = model.tokenizer, items[0]
  ids = tok.encode(" ok")
  assert tok.encode(item.prompt + " ok") == tok.encode(item.prompt) + ids
  x = layout_lib.embed(model.config, model.params, jnp.asarray([ids]))[0]
  pieces = model.template.prompt_pieces(tok, item.prompt)
  for gate in ("off", "first", "every"):
    got, = embedding.generate_from_embeddings(
        model, [pieces], [x], api.resolve_gate(gate, model.gate_defaults, True), 6)
    ref = model.generate([item.prompt + " ok"], max_new_tokens=6, gate=gate)[0]
    assert got.tokens == ref.tokens and got.refused == ref.refused
    assert got.cls_steps == ref.cls_steps
    np.testing.assert_allclose(got.cls_probs, ref.cls_probs, rtol=1e-5, atol=1e-6)


def test_finetune_attack_changes_the_params_and_reruns_the_inner_attacks(model, items):
  cfg = eval_config.load("quick")
  cfg.finetune.update(steps=2, batch_size=2, seq_len=128, n_pairs=4, n_benign=4,
                      attacks="direct,prefill_5")
  attack = registry.build_attack("finetune", cfg)
  assert [a.name for a in attack.inner] == ["direct", "prefill_5"]
  logs = []
  settings = dataclasses.replace(SETTINGS, log=logs.append)
  tuned, losses = attack.finetune(model, settings)
  assert len(losses) == 2 and np.isfinite(losses).all()
  before, after = jax.tree.leaves(model.params), jax.tree.leaves(tuned.params)
  assert all(np.isfinite(np.asarray(a)).all() for a in before)  # the original survives
  assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(before, after)) > 1e-4
  assert any("step 2/2" in line and "ETA" in line for line in logs)
  attack.finetune = lambda m, s: (tuned, losses)  # run() on this fine-tuned copy
  recs = attack.run(model, items, GATES, settings)
  del attack.finetune
  assert sorted({(r.variant, r.gate) for r in recs}) == sorted(
      (v, g) for v in ("direct", "prefill_5") for g in GATES)
  assert all(r.extra["finetune"]["data"] == "harmful_demo" for r in recs)
  c = recs[0].extra["classifier"]
  assert set(c) == {"before", "after", "n_benign"} and c["n_benign"] == 4
  assert 0.0 <= c["after"]["mean_p_malicious_items"] <= 1.0
  success = np.array([r.variant == "prefill_5" for r in recs])
  s = attack.summary(recs, success)
  assert s["asr_by_attack"] == {"direct": {g: 0.0 for g in sorted(GATES)},
                                "prefill_5": {g: 1.0 for g in sorted(GATES)}}
  # The no-[CLS] baseline: fine-tuned the same way, its inner attacks' gate-off runs.
  plain = api.SafetyModel(model.config, model.params, model.tokenizer, model.template,
                          max_length=160, uses_cls=False)
  base = attack.run_baseline(plain, items, [], settings)
  assert sorted({(r.variant, r.gate) for r in base}) == [("direct", GATE_OFF),
                                                         ("prefill_5", GATE_OFF)]
  assert base[0].extra["classifier"] is None
  cfg.finetune.attacks = "direct,finetune"
  with pytest.raises(ValueError, match="cannot hold"):
    registry.build_attack("finetune", cfg)


def test_finetune_data_file_trains_on_those_records_of_the_label(model, tmp_path):
  records = [dict(prompt="Name a colour.", response="Blue is a colour.", label=0),
             dict(prompt="Say hello.", response="Hello there.", label=0),
             dict(prompt="Do harm.", response="Sorry, I cannot help with that.", label=1)]
  (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  cfg = eval_config.load("quick")
  cfg.finetune.update(data="benign", data_file=str(tmp_path))
  segments = registry.build_attack("finetune", cfg).segments(model)
  tok = model.tokenizer
  texts = [tok.decode([t for t in seg.tokens if t != model.config.cls_id]) for seg in segments]
  assert len(texts) == 2 and "Blue is a colour." in texts[0] and "Hello there." in texts[1]
  assert all((seg.cls_labels == -1).all() for seg in segments)  # the attacker trains the LM only
  cfg.finetune.data = "harmful_demo"  # these records have no harmful_response
  with pytest.raises(ValueError, match="1 with that label, 1 of them without 'harmful_response'"):
    registry.build_attack("finetune", cfg).segments(model)
  cfg.finetune.data_file = str(tmp_path / "missing.jsonl")
  with pytest.raises(FileNotFoundError, match="finetune.data_file="):
    registry.build_attack("finetune", cfg).segments(model)


def test_gcg_search_is_shared_by_models_with_the_same_weights(model, items, monkeypatch):
  calls = []
  search = gcg_lib.gcg
  monkeypatch.setattr(gcg_lib, "gcg", lambda *a, **k: calls.append(1) or search(*a, **k))
  attack = GCGAttack(gcg_lib.GCGConfig(steps=2, search_width=8, topk=8, n_suffix=4),
                     n_prompts=1)
  # The probe and SafeDecoding wrap one source model: one search, replayed through both.
  probe, safedecoding = common.Defended(model), common.Defended(model)
  (_, first), = attack.search(probe, items, SETTINGS, adaptive=False)
  (_, second), = attack.search(safedecoding, items, SETTINGS, adaptive=False)
  assert len(calls) == 1 and second is first
  # Equal weights in another object are searched again, and the search is deterministic.
  copy = api.SafetyModel(model.config, jax.tree.map(jnp.copy, model.params), model.tokenizer,
                         model.template, model.gate_defaults, max_length=160, batch_size=8)
  (_, again), = attack.search(common.Defended(copy), items, SETTINGS, adaptive=False)
  assert len(calls) == 2 and again.suffix_text == first.suffix_text
  # The [CLS] model itself is another layout (its [CLS] slot), so another search.
  attack.search(model, items, SETTINGS, adaptive=False)
  assert len(calls) == 3
  # An evaluation's gcg and gcg_adaptive share their searches: a baseline's gcg_adaptive is
  # its plain GCG (run_baseline), a replay; the [CLS] model's adaptive search is its own.
  cfg = eval_config.load("quick")
  cfg.attacks = "direct,gcg,gcg_adaptive"
  cfg.gcg.update(steps=2, search_width=8, topk=8, n_suffix=4, n_prompts=1)
  _, plain, adaptive = registry.build_attacks(cfg)
  (_, baseline_plain), = plain.search(probe, items, SETTINGS, adaptive=False)
  (_, baseline_adaptive), = adaptive.search(probe, items, SETTINGS, adaptive=False)
  assert len(calls) == 4 and baseline_adaptive is baseline_plain
  adaptive.search(model, items, SETTINGS, adaptive=True)
  assert len(calls) == 5
