"""The evaluation end to end on a tiny random model: results.json schema (API.md), outputs,
resume from the cache, and ``run`` on a minimal workdir."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_model_config, tiny_params, tiny_tokenizer
from safety_align import api, checkpoint, evaluate
from safety_align.attacks import decoding, judges
from safety_align.attacks.base import AttackedGeneration
from safety_align.attacks.direct import DirectAttack
from safety_align.eval import config as eval_config
from safety_align.eval import data, report, runner, utility
from safety_align.data import chat_templates, corpus

API_KEYS = {"model", "n_malicious", "n_benign", "classifier", "attacks", "benign", "overhead"}
MAX_LENGTH = 160


def _texts():
  pairs = corpus.sft_pairs("test", n=24)
  return [t for p in pairs for t in (p["prompt"], p["response"], p["harmful_response"]) if t]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("evalmodel")
  template = chat_templates.get_template("demo")
  tok = tiny_tokenizer(_texts(), 400, d / "tokenizer.json")
  cfg = tiny_model_config(vocab_size=tok.vocab_size)
  params = tiny_params(cfg)
  # Uncommitted arrays, as sa.load gives: the loaded model in test_run_on_a_workdir then
  # reuses this model's compiled programs.
  params = jax.tree.map(lambda a: jax.numpy.asarray(np.asarray(a)), params)
  model = api.SafetyModel(cfg, params, tok, template, max_length=MAX_LENGTH, batch_size=8)
  plain = api.SafetyModel(cfg, params, tok, template, max_length=MAX_LENGTH, batch_size=8,
                          uses_cls=False)
  return d, cfg, params, tok, model, plain


def tiny_eval_config(tmp_path, attacks="direct,prefill_5,prefill_deep,decoding,gcg,"
                     "gcg_adaptive,templates"):
  c = eval_config.load("quick")
  c.attacks = attacks
  c.n_malicious, c.n_benign, c.max_new_tokens = 2, 2, 10
  c.schedules = "first"
  c.schedule_attacks = "direct"
  c.prefill.update(deep_tokens=6, deep_keep=4, deep_min_tokens=6)  # buckets as prefill_5
  c.decoding.update(temperatures="0.5", top_ps="0.9", top_ks="5", n_prompts=2, batch_size=8)
  c.gcg.update(n_prompts=1, steps=2, search_width=8, topk=8, n_suffix=3, target_tokens=6)
  user = tmp_path / "user_templates.json"  # short ones: the tiny BPE makes long prompts
  user.write_text(json.dumps(["Story: {prompt}", {"name": "play", "template": "Play {prompt}"}]))
  c.templates.update(paths=str(user), builtin=False, n_prompts=1)
  c.overhead.update(n_prompts=2, new_tokens=10, repeats=1, schedules="first,annealing")
  c.n_traces = 2
  c.baseline_attacks = "direct,prefill_5,gcg"  # gcg: the baseline's own white-box search
  return c


class _Counting:
  """Counts decoder calls (``generate`` and the decoding sweep both go through it)."""

  def __init__(self, decoder):
    self.inner, self.calls = decoder, 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self.inner(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.inner, name)


def _run(model, plain, cfg, out, log=lambda m: None):
  items, benign, pairs = data.held_out(0)
  return runner.evaluate_model(model, cfg, str(out), model_id="tiny", items=items,
                                 benign=benign, all_pairs=pairs[:6], baseline=plain,
                                 baseline_id="tiny_plain", log=log)


def _strict(value):
  raise ValueError(f"non-JSON constant {value}")


def test_end_to_end_schema_outputs_and_resume(setup, tmp_path):
  _, _, _, _, model, plain = setup
  cfg = tiny_eval_config(tmp_path)
  lines = []
  results, records = _run(model, plain, cfg, tmp_path, log=lines.append)
  # Progress: one result line per attack (the baseline's prefixed); the per-step lines
  # ("[1/14] direct: starting ...") only with --verbosity >= 1, a progress bar instead.
  assert [line.split(":")[0] for line in lines if ": ASR" in line] == [
      "direct", "prefill_5", "prefill_deep", "decoding", "gcg", "gcg_adaptive", "templates",
      "no_cls_direct", "no_cls_prefill_5", "no_cls_gcg"]
  assert not any("starting" in line for line in lines)
  md = report.write_outputs(results, records, str(tmp_path), cfg)

  saved = json.loads((tmp_path / "results.json").read_text(), parse_constant=_strict)
  assert API_KEYS <= set(saved)
  assert (saved["n_malicious"], saved["n_benign"]) == (2, 2)
  assert set(saved["classifier"]) >= {"auroc", "accuracy", "f1"}
  assert set(saved["benign"]) >= {"over_refusal_gate_off", "over_refusal_gate_on", "n"}
  assert set(saved["overhead"]) == {"first", "annealing"}
  assert list(saved["attacks"]) == ["direct", "prefill_5", "prefill_deep", "decoding", "gcg",
                                    "gcg_adaptive", "templates"]
  for name, a in saved["attacks"].items():
    assert {"asr_gate_off", "asr_gate_on", "refused_gate_on", "n", "asr_gate_off_ci",
            "asr_gate_on_ci"} <= set(a), name
    assert 0.0 <= a["leak_gate_on"] <= a["refused_gate_on"] and "leak_gate_on_k32" in a
    assert a["refusal_steps_gate_on"]["n"] <= a["n_generations"]
    for k in ("asr_gate_off", "asr_gate_on", "asr_no_cls"):
      assert 0.0 <= a.get(k, 0.0) <= 1.0, (name, k)
      if k in a:
        lo, hi = a[k + "_ci"]
        assert 0.0 <= lo <= a[k] <= hi <= 1.0, (name, k)
    assert a["n"] >= 1
  assert all("asr_no_cls" in saved["attacks"][n] and saved["attacks"][n]["n_no_cls"] >= 1
             for n in ("direct", "prefill_5", "gcg"))
  assert saved["baseline_no_cls"]["n"] == 2 and saved["benign"]["n"] == 2
  assert saved["classifier"]["n"] == 6
  assert set(saved["attacks"]["direct"]["asr_by_gate"]) == {"off", "annealing", "first"}
  assert saved["attacks"]["gcg_adaptive"]["suffixes"]
  # The trade-off replays the gate's recorded decisions exactly at its own θ.
  curves = saved["tradeoff"]["curves"]["gate"]
  at = saved["tradeoff"]["theta"].index(cfg.gate.threshold)
  assert curves["full"]["exact_share"]["direct"][at] == 1.0
  assert curves["full"]["asr"]["direct"][at] == pytest.approx(saved["attacks"]["direct"]
                                                              ["asr_gate_on"])
  assert (tmp_path / "tradeoff_decoding.png").stat().st_size > 0
  for f in ("results.md", "asr_by_attack.png", "cls_trace.png"):
    assert (tmp_path / f).stat().st_size > 0
  assert "| prefill_deep |" in md and "## Gate overhead" in md

  # The decoding sweep: one row per (prompt, setting) and gate, prefill text is not judged.
  dec = records["decoding"]
  assert len(dec) == 2 * 3 * 2 and {r.variant for r in dec} == {
      "temperature=0.5", "top_p=0.9", "top_k=5"}
  assert all(r.n_forced == 0 for r in dec)
  assert all(r.prefill and r.n_forced == 5 for r in records["prefill_5"])
  assert "asr_no_cls" not in saved["attacks"]["decoding"]
  assert {r.gate for r in records["no_cls_direct"]} == {"off"}
  # The baseline's GCG searched its own suffixes (white box; attacks/gcg_attack.py).
  assert {r.gate for r in records["no_cls_gcg"]} == {"off"} and records["no_cls_gcg"]
  assert all(r.extra["white_box_baseline"] for r in records["no_cls_gcg"])
  assert all(r.cls_probs == [] for r in records["no_cls_direct"])

  # Resume: nothing is generated again ...
  counting = _Counting(model._decoder)
  model._decoder = counting
  try:
    again, _ = _run(model, plain, cfg, tmp_path)
    assert counting.calls == 0
    assert again["attacks"] == results["attacks"]
    # ... until an attack's own settings change: only that attack runs again.
    cfg.decoding.top_ks = "7"
    _run(model, plain, cfg, tmp_path)
    assert counting.calls == 2  # gate off and gate on, one batch each
  finally:
    model._decoder = counting.inner


def test_row_sampling_matches_per_call_sampling(setup):
  """One generate call with per-row settings gives each row what generate() with that row's
  setting gives (same prompts and shapes as the end-to-end test's sweep, so its programs are
  reused); a temperature-0 row is greedy."""
  _, _, _, _, model, _ = setup
  prompts = [i.prompt for i in data.held_out(0)[0][:2]] * 3
  settings = decoding.sweep([0.5], [0.9], [5])
  rows = model.generate(prompts, max_new_tokens=10, seed=3, gate="annealing", batch_size=8,
                        sampling=[s for s in settings for _ in range(2)])
  for k, s in enumerate(settings):
    gens = model.generate(prompts, max_new_tokens=10, seed=3, gate="annealing",
                          temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    for i in (2 * k, 2 * k + 1):
      assert rows[i].tokens == gens[i].tokens, (s, i)
      assert rows[i].cls_probs == pytest.approx(gens[i].cls_probs)
  mixed = model.generate(prompts[:2], max_new_tokens=10, seed=3, gate="annealing",
                         sampling=[decoding.Setting(0.0), settings[0]])
  assert mixed[0].tokens == model.generate(prompts[:1], max_new_tokens=10,
                                           gate="annealing")[0].tokens
  assert mixed[1].tokens == rows[1].tokens
  with pytest.raises(ValueError, match="either per-prompt sampling or temperature"):
    model.generate(prompts[:1], temperature=0.5, sampling=settings[:1])
  with pytest.raises(ValueError, match="1 sampling settings for 2 prompts"):
    model.generate(prompts[:2], sampling=settings[:1])
  with pytest.raises(ValueError, match="top_p must be"):
    model.generate(prompts[:1], sampling=[decoding.Setting(0.5, top_p=0.0)])


def test_model_judge_on_a_tiny_model(setup):
  _, _, _, _, model, _ = setup
  judge = judges.ModelJudge(model, mode="classify", threshold=0.5)
  scores = judge.scores(["How?", "Why?"], ["Step 1.", "Because."])
  np.testing.assert_allclose(scores, model.classify(["User: How?\nAgent: Step 1.",
                                                     "User: Why?\nAgent: Because."]))
  assert judges.ModelJudge(model, "classify", 1.0)(["a"], ["b"]).tolist() == [False]
  assert judges.ModelJudge(model, "classify", 0.0)(["a"], ["b"]).tolist() == [True]


def test_run_on_a_workdir(setup, tmp_path):
  """``run``: load a minimal workdir (config.json, tokenizer.json, an sft checkpoint)."""
  d, cfg, params, tok, _, _ = setup
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "config.json").write_text(json.dumps(dict(
      model=dataclasses.asdict(cfg), data=dict(seq_len=MAX_LENGTH, chat_template="demo",
                                               seed=0))))
  tok.save(str(wd / "tokenizer.json"))
  checkpoint.save_params(str(wd), "sft", params, dict(step=0, phase="sft"))
  ecfg = tiny_eval_config(tmp_path, "direct")
  ecfg.train_baseline = False
  ecfg.overhead.n_prompts = 0  # no timing
  ecfg.plots = False
  md = evaluate.run(str(wd), ecfg)
  saved = json.loads((wd / "eval" / "results.json").read_text())
  assert saved["model"] == str(wd) and "baseline_no_cls" not in saved
  assert saved["overhead"] == {}
  assert "| direct | 2 |" in md
  assert os.path.exists(wd / "eval" / "cache" / "direct.json")


def test_baseline_key_depends_on_main_records_only_for_replays():
  """A baseline attack that replays the main model's records is stored under a key of them;
  one that does not (e.g. a white-box search of its own) is not rerun when they change."""

  class Replaying(DirectAttack):
    replays_main_records = True

  def main(text):
    return {"direct": [AttackedGeneration(item=0, gate="off", variant="", query="q",
                                          prefill="", response=text, refused=False,
                                          refusal_step=None, n_forced=0, cls_probs=[],
                                          cls_steps=[])]}

  own, replay = DirectAttack(), Replaying()
  assert (runner.attack_payload({}, own, ["off"], main("one"))
          == runner.attack_payload({}, own, ["off"], main("two")))
  assert (runner.attack_payload({}, replay, ["off"], main("one"))
          != runner.attack_payload({}, replay, ["off"], main("two")))
  assert "main" not in runner.attack_payload({}, replay, ["off"])


def test_self_answer_nll_matches_a_full_forward_and_is_reported_per_defence(setup, tmp_path):
  _, _, _, tok, model, plain = setup
  answers = utility.reference_answers("", 0, 3)
  assert len(answers) == 3 and all(a["response"] for a in answers)
  prompts, responses = [a["prompt"] for a in answers], [a["response"][:60] for a in answers]
  # The teacher-forced score equals a plain forward of prompt + answer.
  total, count = 0.0, 0
  for p, r in zip(prompts, responses):
    prompt_ids = [t for ids, _ in plain.template.prompt_pieces(tok, p) for t in ids]
    target = tok.encode(r)
    logits = plain.lm_logits([prompt_ids + target])[0].astype(np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    rows = np.arange(len(prompt_ids) - 1, len(prompt_ids) + len(target) - 1)
    total -= float(logp[rows, target].sum())
    count += len(target)
  np.testing.assert_allclose(utility.self_answer_nll(plain, prompts, responses), total / count,
                             rtol=1e-4)
  # Reported for the [CLS] model and its baseline, and in the defence table's column.
  cfg = tiny_eval_config(tmp_path, attacks="direct")
  cfg.update(baseline_attacks="")
  cfg.overhead.n_prompts = 0
  items, benign, pairs = data.held_out(0)
  results, _ = runner.evaluate_model(model, cfg, str(tmp_path), model_id="tiny", items=items,
                                     benign=benign, all_pairs=pairs[:6], baseline=plain,
                                     baseline_id="tiny_plain", answers=answers)
  assert results["self_answer_nll"]["n"] == 3 and "utility" not in results
  assert results["baseline_no_cls"]["self_answer_nll"]["nll"] == pytest.approx(
      utility.self_answer_nll(plain, prompts, [a["response"] for a in answers]))
  row = [line for line in report.defence_table(results) if line.startswith("| [CLS] gate")]
  assert f"| {results['self_answer_nll']['nll']:.3f} |" in row[0]
  # A held-out folder without utility.jsonl reports none; a row without an answer is refused.
  assert utility.reference_answers(str(tmp_path), 0, 0) == []
  (tmp_path / utility.FILE).write_text(json.dumps({"prompt": "Hi.", "response": ""}) + "\n")
  with pytest.raises(ValueError, match="non-empty 'response'"):
    utility.reference_answers(str(tmp_path), 0, 0)
