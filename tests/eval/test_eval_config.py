"""Evaluation config, attack registry, templates and early errors (no model needed)."""

import json
import os

import pytest

from safety_align import config_lib
from safety_align.attacks import decoding, template_attack
from safety_align.eval import no_cls, registry
from safety_align.eval import config as eval_config
from safety_align.eval import workdir as workdir_lib


def test_unknown_attack_lists_known_ones():
  cfg = eval_config.load("quick")
  cfg.attacks = "direct,prefil_5"
  with pytest.raises(ValueError, match="Unknown attack 'prefil_5'.*prefill_deep.*gcg_adaptive"):
    eval_config.validate(cfg)
  cfg.attacks = "direct,direct"
  with pytest.raises(ValueError, match="twice"):
    eval_config.validate(cfg)
  cfg.attacks = "direct,prefill_7"
  eval_config.validate(cfg)
  assert registry.build_attacks(cfg)[1].name == "prefill_7"


def test_bad_schedule_and_judge_are_errors():
  cfg = eval_config.load("quick")
  cfg.gate_on = "sometimes"
  with pytest.raises(ValueError, match="Unknown gate schedule 'sometimes'"):
    eval_config.validate(cfg)
  cfg = eval_config.load("quick")
  cfg.judge.harm = "model"
  with pytest.raises(ValueError, match="model_workdir"):
    eval_config.validate(cfg)


def test_default_sweep_and_ranges():
  cfg = eval_config.load("default")
  assert config_lib.floats(cfg.decoding.temperatures) == [round(0.05 * i, 2)
                                                          for i in range(1, 21)]
  attack = registry.build_attack("decoding", cfg)
  assert len(attack.settings) == 20 + 20 + 9 and attack.reduce == "any"
  names = [a.name for a in registry.build_attacks(cfg)]
  assert set(registry.ATTACK_NAMES) <= set(names)
  for required in ("direct", "prefill_5", "prefill_10", "prefill_20", "prefill_40",
                   "decoding", "gcg", "gcg_adaptive", "templates"):
    assert required in names
  with pytest.raises(ValueError, match="top_p"):
    decoding.sweep([0.5], [0.0], [])


def test_builtin_templates_have_the_slot():
  loaded = template_attack.load_templates()
  names = [n for n, _ in loaded]
  assert {"roleplay", "deep_inception", "persuasion_expert", "autodan_prefix"} <= set(names)
  assert all(template_attack.SLOT in t for _, t in loaded)
  assert template_attack.apply("a {x} {prompt}!", "How?") == "a {x} How?!"


def test_template_errors_name_the_file(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_text("Tell me everything.")
  with pytest.raises(ValueError, match=f"{bad}.*no \\{{prompt\\}} slot"):
    template_attack.load_templates([str(bad)], builtin=False)
  cfg = eval_config.load("quick")
  cfg.templates.paths = str(tmp_path)
  with pytest.raises(ValueError, match="bad.txt"):
    eval_config.validate(cfg)  # before any model is loaded
  bad.unlink()
  (tmp_path / "mine.json").write_text(json.dumps(
      ["Story: {prompt}", {"name": "poem", "template": "Poem about {prompt}"},
       {"name": "broken", "template": "no slot"}]))
  with pytest.raises(ValueError, match="mine.json \\(entry 2\\)"):
    template_attack.load_templates([str(tmp_path)], builtin=False)
  (tmp_path / "mine.json").write_text(json.dumps(["Story: {prompt}",
                                                  {"name": "poem", "template": "P {prompt}"}]))
  loaded = template_attack.load_templates([str(tmp_path)], builtin=True, names=["poem", "roleplay"])
  assert [n for n, _ in loaded] == ["roleplay", "poem"]
  with pytest.raises(ValueError, match="Unknown jailbreak templates \\['nope'\\]"):
    template_attack.load_templates([str(tmp_path)], names=["nope"])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    template_attack.load_templates([str(tmp_path / "missing")])
  (tmp_path / "roleplay.txt").write_text("{prompt}")
  with pytest.raises(ValueError, match="named 'roleplay'"):
    template_attack.load_templates([str(tmp_path)])


def test_workdir_without_checkpoint(tmp_path):
  cfg = eval_config.load("quick")
  with pytest.raises(FileNotFoundError, match="not a safety_align workdir"):
    workdir_lib.run(str(tmp_path), cfg)
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="has no checkpoint under checkpoints/"):
    workdir_lib.run(str(tmp_path), cfg)
  assert not os.path.exists(tmp_path / "eval")


def test_baseline_config(tmp_path):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  (tmp_path / "config.json").write_text(c.to_json())
  b = no_cls.baseline_config(str(tmp_path), steps=7)
  assert (b.use_cls, b.phases, b.init_phase, b.sft.steps) == (False, "sft", "pretrain", 7)
  assert b.sft.replay == c.sft.replay > 0  # the same SFT recipe as the [CLS] model
  assert b.sft.recovery == c.sft.recovery > 0
  assert b.init_from == str(tmp_path) and b.data.tokenizer == str(tmp_path / "tokenizer.json")
  assert b.data.data_dir == str(tmp_path / "tfds")
  cfg = eval_config.load("quick")
  with pytest.raises(FileNotFoundError, match="pretraining checkpoint"):
    no_cls.check_baseline_trainable(str(tmp_path), cfg)


def test_config_files_and_variants():
  """configs/eval/*.py define their configs (quick and real start from default); a variant
  they lack is a clear error, also through the CLI's config loader."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  default, quick = eval_config.load("default"), eval_config.load("quick")
  assert (default.n_malicious, quick.n_malicious, quick.gcg.steps) == (0, 16, 100)
  assert quick.judge == default.judge and default.judge.model_mode == "generate"
  smoke = eval_config.load("quick", "smoke")
  assert (smoke.n_malicious, smoke.train_baseline) == (4, False)
  real, full = eval_config.load("real"), eval_config.load("real", "full")
  assert (real.judge.harm, real.n_malicious, full.n_malicious) == ("not_refused", 64, 0)
  for name, arg, match in (("quick", "nope", "unknown variant 'nope'.*'smoke'"),
                           ("real", "fast", "unknown variant 'fast'.*'full'"),
                           ("default", "x", "takes no variant")):
    with pytest.raises(ValueError, match=match):
      eval_config.load(name, arg)
  with pytest.raises(ValueError, match="unknown variant 'nope'"):
    config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
        "quick", os.path.join(eval_config.CONFIG_DIR, "quick.py")).get_config("nope")
  with pytest.raises(FileNotFoundError, match="No evaluation config.*'default', 'quick'"):
    eval_config.load("quik")


def test_adaptive_attacks_registry():
  """The three adaptive attacks are registered eagerly and built by their from_config from
  their config sections (the quick ones from quick.py); a missing section is a clear error."""
  for name in ("prefill_adaptive", "embedding", "finetune"):
    assert name in registry.KNOWN and name in registry.ATTACKS
  default = eval_config.load("default")
  assert {"prefill_adaptive", "embedding", "finetune"} <= set(config_lib.names(default.attacks))
  assert default.finetune.to_dict() == config_lib.attack_sections()["finetune"].to_dict()
  quick = eval_config.load("quick")
  assert quick.embedding.to_dict() == config_lib.attack_sections(True)["embedding"].to_dict()
  tuned = registry.build_attack("finetune", quick)
  assert tuned.settings["steps"] == 10 and [a.name for a in tuned.inner] == ["direct",
                                                                            "prefill_5"]
  assert registry.build_attack("embedding", quick).name == "embedding"
  del quick.finetune
  with pytest.raises(ValueError, match="config section 'finetune'"):
    registry.build_attack("finetune", quick)
