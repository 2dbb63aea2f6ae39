"""Evaluation config, attack registry, templates and early errors (no model needed)."""

import json
import os

import pytest

from safety_align import evaluate
from safety_align.attacks import decoding, templates


def test_unknown_attack_lists_known_ones():
  cfg = evaluate.quick_config()
  cfg.attacks = "direct,prefil_5"
  with pytest.raises(ValueError, match="Unknown attack 'prefil_5'.*prefill_deep.*gcg_adaptive"):
    evaluate.validate(cfg)
  cfg.attacks = "direct,direct"
  with pytest.raises(ValueError, match="twice"):
    evaluate.validate(cfg)
  cfg.attacks = "direct,prefill_7"
  evaluate.validate(cfg)
  assert evaluate.build_attacks(cfg)[1].name == "prefill_7"


def test_bad_schedule_and_judge_are_errors():
  cfg = evaluate.quick_config()
  cfg.gate_on = "sometimes"
  with pytest.raises(ValueError, match="Unknown gate schedule 'sometimes'"):
    evaluate.validate(cfg)
  cfg = evaluate.quick_config()
  cfg.judge.harm = "model"
  with pytest.raises(ValueError, match="model_workdir"):
    evaluate.validate(cfg)


def test_default_sweep_and_ranges():
  cfg = evaluate.default_config()
  assert evaluate._floats(cfg.decoding.temperatures) == [round(0.05 * i, 2)
                                                          for i in range(1, 21)]
  attack = evaluate.build_attack("decoding", cfg)
  assert len(attack.settings) == 20 + 20 + 9 and attack.reduce == "any"
  names = [a.name for a in evaluate.build_attacks(cfg)]
  assert set(evaluate.ATTACK_NAMES) <= set(names)
  for required in ("direct", "prefill_5", "prefill_10", "prefill_20", "prefill_40",
                   "decoding", "gcg", "gcg_adaptive", "templates"):
    assert required in names
  with pytest.raises(ValueError, match="top_p"):
    decoding.sweep([0.5], [0.0], [])


def test_builtin_templates_have_the_slot():
  loaded = templates.load_templates()
  names = [n for n, _ in loaded]
  assert {"roleplay", "deep_inception", "persuasion_expert", "autodan_prefix"} <= set(names)
  assert all(templates.SLOT in t for _, t in loaded)
  assert templates.apply("a {x} {prompt}!", "How?") == "a {x} How?!"


def test_template_errors_name_the_file(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_text("Tell me everything.")
  with pytest.raises(ValueError, match=f"{bad}.*no \\{{prompt\\}} slot"):
    templates.load_templates([str(bad)], builtin=False)
  cfg = evaluate.quick_config()
  cfg.templates.paths = str(tmp_path)
  with pytest.raises(ValueError, match="bad.txt"):
    evaluate.validate(cfg)  # before any model is loaded
  bad.unlink()
  (tmp_path / "mine.json").write_text(json.dumps(
      ["Story: {prompt}", {"name": "poem", "template": "Poem about {prompt}"},
       {"name": "broken", "template": "no slot"}]))
  with pytest.raises(ValueError, match="mine.json \\(entry 2\\)"):
    templates.load_templates([str(tmp_path)], builtin=False)
  (tmp_path / "mine.json").write_text(json.dumps(["Story: {prompt}",
                                                  {"name": "poem", "template": "P {prompt}"}]))
  loaded = templates.load_templates([str(tmp_path)], builtin=True, names=["poem", "roleplay"])
  assert [n for n, _ in loaded] == ["roleplay", "poem"]
  with pytest.raises(ValueError, match="Unknown jailbreak templates \\['nope'\\]"):
    templates.load_templates([str(tmp_path)], names=["nope"])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    templates.load_templates([str(tmp_path / "missing")])
  (tmp_path / "roleplay.txt").write_text("{prompt}")
  with pytest.raises(ValueError, match="named 'roleplay'"):
    templates.load_templates([str(tmp_path)])


def test_workdir_without_checkpoint(tmp_path):
  cfg = evaluate.quick_config()
  with pytest.raises(FileNotFoundError, match="not a safety_align workdir"):
    evaluate.run(str(tmp_path), cfg)
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="has no checkpoint under checkpoints/"):
    evaluate.run(str(tmp_path), cfg)
  assert not os.path.exists(tmp_path / "eval")


def test_baseline_config(tmp_path):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  (tmp_path / "config.json").write_text(c.to_json())
  b = evaluate.baseline_config(str(tmp_path), steps=7)
  assert (b.use_cls, b.phases, b.init_phase, b.sft.steps) == (False, "sft", "pretrain", 7)
  assert b.sft.replay == c.sft.replay > 0  # the same SFT recipe as the [CLS] model
  assert b.sft.recovery == c.sft.recovery > 0
  assert b.init_from == str(tmp_path) and b.data.tokenizer == str(tmp_path / "tokenizer.json")
  assert b.data.data_dir == str(tmp_path / "tfds")
  cfg = evaluate.quick_config()
  with pytest.raises(FileNotFoundError, match="pretraining checkpoint"):
    evaluate.check_baseline_trainable(str(tmp_path), cfg)
