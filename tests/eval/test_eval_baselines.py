"""The competitor baselines in the evaluation (``eval/competitors.py``): the config flag's
checks, a ``run`` with ``baselines=probe,deep_alignment`` on a tiny workdir (results.json
entries with the gate's keys, the defence table, overhead through the wrapper's own
``generate``) and a second run that loads the artefacts instead of retraining."""

import dataclasses
import json

import pytest

from safety_align import checkpoint, evaluate
from safety_align.defences import deep_alignment, probe
from safety_align.eval import competitors, registry, runner
from safety_align.eval import workdir as workdir_lib
from safety_align.eval import config as eval_config
from test_eval_run import MAX_LENGTH, setup, tiny_eval_config  # noqa: F401  (fixture)

GATE_KEYS = {"attacks", "benign", "overhead"}


def _workdir(path, cfg, tok, params, data=(), **config):
  path.mkdir()
  (path / "config.json").write_text(json.dumps(dict(
      model=dataclasses.asdict(cfg), **config,
      data=dict(seq_len=MAX_LENGTH, chat_template="demo", seed=0, **dict(data)))))
  tok.save(str(path / "tokenizer.json"))
  checkpoint.save_params(str(path), "sft", params, dict(step=0, phase="sft"))
  return str(path)


def test_baselines_flag_is_checked(setup, tmp_path):  # noqa: F811
  _, cfg, params, tok, _, _ = setup
  ecfg = eval_config.load("quick")
  assert ecfg.baselines == "" and competitors.chosen(ecfg) == []
  assert {"probe", "deep_alignment", "safedecoding"} <= set(ecfg)
  ecfg.baselines = "safedecoding, probe"
  assert competitors.chosen(ecfg) == ["probe", "safedecoding"]  # the table's order
  ecfg.baselines = "probe,dpo"
  with pytest.raises(ValueError, match=r"Unknown baseline\(s\) \['dpo'\].*probe,deep_align"):
    eval_config.validate(ecfg)
  ecfg.baselines = "probe"
  with pytest.raises(ValueError, match="need a source model without"):
    competitors.source_dir(ecfg, None)
  ecfg.baselines_data = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="baselines_data=.*nowhere"):
    competitors.training_records("unused", ecfg)
  ecfg.baselines_data = ""
  real = _workdir(tmp_path / "real", cfg, tok, params,
                  data=dict(source="jsonl", data_dir=str(tmp_path / "data")))
  with pytest.raises(FileNotFoundError, match=r"data/sft.jsonl is missing: set baselines_data"):
    competitors.training_records(real, ecfg)
  (tmp_path / "data").mkdir()
  two_turn = dict(prompt="you?", response="Fine.", label=0,
                  turns=[dict(role="user", content="How are"),
                         dict(role="assistant", content="I see. Please go on.")])
  (tmp_path / "data" / "sft.jsonl").write_text(
      json.dumps(dict(prompt="Hi?", response="Hello.", label=0)) + "\n"
      + json.dumps(two_turn) + "\n")
  # the two-turn chat is left out: the baselines' trainers take one prompt per example
  assert competitors.training_records(real, ecfg) == [
      dict(prompt="Hi?", response="Hello.", harmful_response="", label=0)]
  kept = competitors.attacks_for(registry.build_attacks(tiny_eval_config(tmp_path)))
  assert [a.name for a in kept] == ["direct", "prefill_5", "prefill_deep", "decoding", "gcg",
                                    "templates"]


def test_run_with_baselines_and_cached_artefacts(setup, tmp_path, monkeypatch):  # noqa: F811
  _, cfg, params, tok, _, _ = setup
  wd = _workdir(tmp_path / "wd", cfg, tok, params)
  source = _workdir(tmp_path / "plain", cfg, tok, params, use_cls=False, phases="sft")
  ecfg = tiny_eval_config(tmp_path, "direct,prefill_5")
  ecfg.update(train_baseline=False, baseline_workdir=source, baseline_attacks="", plots=False,
              baselines="safedecoding,deep_alignment,probe")
  ecfg.overhead.update(n_prompts=2, new_tokens=10, repeats=1)
  ecfg.probe.update(n_train=64, every=4)
  ecfg.deep_alignment.update(steps=1, batch_size=8, warmup_steps=1)
  ecfg.safedecoding.expert_training = ecfg.deep_alignment  # the expert is that model
  lines = []
  monkeypatch.setattr(workdir_lib, "logger", lambda t0: lines.append)
  md = evaluate.run(wd, ecfg)
  assert "safedecoding: expert = the deep_alignment baseline" in lines
  saved = json.loads((tmp_path / "wd" / "eval" / "results.json").read_text())
  bl = saved["baselines"]
  assert list(bl) == ["probe", "deep_alignment", "safedecoding"]
  assert saved["baselines_source"] == source
  assert set(bl["probe"]) >= GATE_KEYS | {"classifier"}
  for name in ("deep_alignment", "safedecoding"):
    assert set(bl[name]) >= GATE_KEYS and "classifier" not in bl[name]
  assert set(bl["probe"]["classifier"]) == set(saved["classifier"])
  assert bl["probe"]["classifier"]["n"] == saved["classifier"]["n"]
  for name, e in bl.items():
    assert list(e["attacks"]) == ["direct", "prefill_5"], name
    for attack, a in e["attacks"].items():
      gate_entry = {k for k in saved["attacks"][attack] if "no_cls" not in k}
      assert set(a) == gate_entry and a["n"] == saved["attacks"][attack]["n"], (name, attack)
      assert set(a["asr_by_gate"]) == {"off", "annealing"}  # undefended and defence on
    assert set(e["benign"]) == set(saved["benign"]) and e["benign"]["n"] == 2
    assert set(e["overhead"]) == {"annealing"}
    # EOS disabled through the wrapper: gate off decodes the full budget.
    assert e["overhead_tokens"]["off"] == 2 * 10, name
  assert set(saved["overhead"]) == {"first", "annealing"}

  # The terminal's tables (brief: no explanation) and results.md's (with it) hold the same one.
  full = (tmp_path / "wd" / "eval" / "results.md").read_text()
  table = full[full.index("## Defences compared"):].split("\n\n")[2].splitlines()
  assert table == md[md.index("## Defences compared"):].split("\n\n")[1].splitlines()
  assert table[0] == ("| defence | direct | prefill_5 | over-refusal | self-answer NLL | "
                      "overhead |")
  # Self-answer NLL: the weights each defence decodes with (its score); the probe and
  # SafeDecoding keep the source's, which is the no-[CLS] baseline here.
  nll = {name: e["self_answer_nll"]["nll"] for name, e in bl.items()}
  assert nll["probe"] == nll["safedecoding"] == \
      saved["baseline_no_cls"]["self_answer_nll"]["nll"]
  assert all(e["self_answer_nll"]["n"] == saved["self_answer_nll"]["n"] == 48
             for e in bl.values())
  assert [row.split(" | ")[0] for row in table[2:]] == [
      "| [CLS] gate (annealing)", "| no-[CLS] SFT (gate off)", "| probe (ADA-style)",
      "| deep alignment (Qi et al.)", "| SafeDecoding"]
  assert all(row.count("(n=2)") == 3 for row in table[2:])  # 2 attacks + over-refusal
  assert (tmp_path / "wd" / "eval" / "baselines" / "probe" / probe.PROBE_FILE).exists()
  assert checkpoint.saved_steps(str(tmp_path / "wd" / "eval" / "baselines" / "deep_alignment"),
                                "sft") == [1]
  assert not (tmp_path / "wd" / "eval" / "baselines" / "safedecoding" / "expert").exists()

  # A second run loads the artefacts and the stored generations: nothing is retrained.
  monkeypatch.setattr(probe, "train_probe", lambda *a, **k: pytest.fail("probe retrained"))
  monkeypatch.setattr(deep_alignment, "train", lambda *a: pytest.fail("deep_alignment retrained"))
  monkeypatch.setattr(runner, "timing", lambda *a, **k: pytest.fail("timed again"))
  evaluate.run(wd, ecfg)
  again = json.loads((tmp_path / "wd" / "eval" / "results.json").read_text())
  assert again["baselines"] == bl
