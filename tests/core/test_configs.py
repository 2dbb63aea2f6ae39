"""configs/*.py (outside configs/eval): loaded as train.py loads them, their values pinned, and
the shared helpers of ``safety_align.config_lib``."""

import hashlib
import importlib.util
import json
import pathlib

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from configs import smollm2_135m_cls
from conftest import tiny_model_config
from safety_align import config_lib, optim
from safety_align import model as model_lib
from safety_align.decode import GateConfig

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
IMPORT = "IMPORT_DIR"  # stands for the import directory the test makes

# SHA-256 of each config's ``to_dict()`` (as ``_digest``). Pinned from the configs as they were
# before config_lib replaced their copied helpers, with two deliberate changes: the 7B base's
# pretraining λ1 (``pretrain.cls_weight`` of llama2_7b and mistral_7b) 0.1 -> 0.01, METHOD.md's
# value; and tiny's ``pretrain.recovery`` (an SFT-only field, never read there) is gone. Then:
# every phase gains ``window_cls_weight`` (= its ``cls_weight``: the window [CLS] rows' own
# mean, losses.py); the 7B base trains with ``model.attention="blockwise"``; llama2_7b_cls's
# checkpoint/log intervals count optimiser steps (50 and 1, were 450 and 9 micro-steps);
# smollm2_135m_cls trains its [CLS] embedding too and labels a harmful continuation's window
# rows by span (sft.harmful_opener, issue 25) and trains no LM target over the refusals'
# prefix (sft.untrained_refusal_prefix: the validation ablations); finetune_imported (and so
# smollm2_135m_cls) gains init_cls_embed ("": the import's [CLS] embedding, as before), and
# smollm2_135m_cls trains every parameter (sft.trainable "": the validation ablations). A
# config change updates the digest here and says why.
PINNED = {
    ("tiny", ""): "10d62ee0d10f4da84caad16d04e137fc69f97ea87c735bfedcb4419bcff8cce5",
    ("tiny", "smoke"): "aff27e0541f8729bdc825db7ce94f280f3b5cf067d2da12d6308433f25942a62",
    ("llama2_7b", ""): "1c576726e524597cf3b01346392c569b78535643a539a0d56f192e2932e629a8",
    ("llama2_7b_cls", ""): "ecf61640f1996ffcf11dc459dba8d8bff20fedd72dedd069ce44def944625958",
    ("mistral_7b", ""): "139e4d0c193d542c9401027261f677a171c578a0f0f6618c8211ea3e2d80ad1d",
    ("mistral_7b", "v0.1"): "206db811e2069068bfe01f6bad201b766694502fb5f332b95b0b71efc3b3a9f8",
    ("mistral_7b_instruct_cls", ""):
        "47ce3adba4bb91e0aa15adcd38b8b0845e386593bb0fabfcc29bad5e16874f5c",
    ("mistral_7b_instruct_cls", "v0.1"):
        "60a13a2390026a9cb529084437ae8a4ebb662c978d2f924a9899ea02ce900fa1",
    ("finetune_imported", IMPORT):
        "cc62c456bdd2639ee3d376f9f78a23f5f1b62b97694192c59757c04967fff5d0",
    ("smollm2_135m_cls", IMPORT):
        "ffe35ff020a8748cf26c3a450908fb7a08cad6062dd1020acbc79d7c4d172677",
}


@pytest.fixture(scope="module")
def import_dir(tmp_path_factory):
  """A minimal `convert import_hf` output: the config.json the finetuning configs read."""
  path = tmp_path_factory.mktemp("import")
  (path / "config.json").write_text(json.dumps({
      "model": dict(vocab_size=100, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32),
      "chat_template": "chatml"}))
  return str(path)


def load(name, arg=""):
  """``--config=configs/<name>.py[:arg]`` through the flag train.py defines."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", lock_config=True, flag_values=values)
  spec = str(CONFIGS / f"{name}.py") + (f":{arg}" if arg else "")
  values(["train", f"--config={spec}"])
  return values.config


def _digest(config, import_dir) -> str:
  text = json.dumps(config.to_dict(), sort_keys=True).replace(import_dir, IMPORT)
  return hashlib.sha256(text.encode()).hexdigest()


def test_every_config_is_pinned(import_dir):
  assert sorted(p.stem for p in CONFIGS.glob("*.py")) == sorted({n for n, _ in PINNED})
  got = {(name, arg): _digest(load(name, import_dir if arg == IMPORT else arg), import_dir)
         for name, arg in PINNED}
  assert got == PINNED


def test_paper_values():
  """METHOD.md: λ1 = 0.01 (pretraining), λ2 = 0.1 (SFT), effective batch 72, lr 2e-5."""
  for name in ("llama2_7b", "llama2_7b_cls", "mistral_7b", "mistral_7b_instruct_cls"):
    c = load(name)
    assert (c.pretrain.cls_weight, c.sft.cls_weight) == (0.01, 0.1), name
    for phase in (c.pretrain, c.sft):
      assert (phase.lr, phase.weight_decay, phase.batch_size * phase.grad_accum) == (
          2e-5, 0.1, 72), name
  base, recipe = load("llama2_7b"), load("llama2_7b_cls")
  assert (base.model, base.mesh) == (recipe.model, recipe.mesh)
  assert (recipe.pretrain.schedule, recipe.sft.schedule) == ("step", "step")


@pytest.mark.parametrize("name, arg, error, match", [
    ("tiny", "big", ValueError, r"configs/tiny\.py: unknown variant 'big'; expected '' or "
                                r"'smoke'\."),
    ("mistral_7b", "v0.3", ValueError, r"unknown variant 'v0\.3'; expected '' or 'v0\.1'"),
    ("mistral_7b_instruct_cls", "v0.3", ValueError,
     r"configs/mistral_7b_instruct_cls\.py: unknown variant 'v0\.3'"),
    ("llama2_7b", "cls", ValueError, r"configs/llama2_7b\.py takes no variant, got 'cls'"),
    ("llama2_7b_cls", "fast", ValueError, "takes no variant.*--config.<field>"),
    ("finetune_imported", "no/such/dir", FileNotFoundError, "convert import_hf"),
    ("smollm2_135m_cls", "no/such/dir", FileNotFoundError, "convert import_hf"),
])
def test_unknown_variant_is_a_clear_error(name, arg, error, match):
  with pytest.raises(error, match=match):
    config_lib.sibling_config(str(CONFIGS / "tiny.py"), name, arg)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(CONFIGS.parent)) for p in
                                        CONFIGS.glob("**/*.py")))
def test_every_config_file_rejects_an_unknown_variant(path):
  spec = importlib.util.spec_from_file_location("config_under_test", CONFIGS.parent / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with pytest.raises((ValueError, FileNotFoundError)):
    module.get_config("no_such_variant")


def test_phase_config_and_sibling_config(tmp_path):
  phase = config_lib.phase_config(split="sft", steps=3, batch_size=2, cls_weight=0.1, lr=1e-3,
                                  warmup_steps=1, window=10)
  assert phase.to_dict() == dict(
      split="sft", steps=3, batch_size=2, cls_weight=0.1, lr=1e-3, schedule="cosine",
      warmup_steps=1, end_lr_fraction=0.1, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0,
      grad_accum=1, window=10, window_cls_weight=0.1)
  assert config_lib.phase_config(split="sft", steps=3, batch_size=2, cls_weight=0.1, lr=1e-3,
                                 window_cls_weight=0.5).window_cls_weight == 0.5
  assert config_lib.sibling_config(str(CONFIGS / "tiny.py"), "tiny", "smoke").to_dict() == (
      load("tiny", "smoke").to_dict())
  with pytest.raises(FileNotFoundError, match="nope.py not found.*builds on it"):
    config_lib.sibling_config(str(tmp_path / "mine.py"), "nope")
  tiny = load("tiny", "smoke")
  config_lib.set_paths(tiny, {"sft.steps": 7, "seed": 3})  # the smollm2 variants' form
  assert (tiny.sft.steps, tiny.seed) == (7, 3)
  for typo in ("sft.stepz", "sfft.steps", "seed.x"):  # a variant's typo adds no silent field
    with pytest.raises(KeyError, match="is not a key of the config"):
      config_lib.set_paths(tiny, {typo: 1})


def test_smollm2_variants(import_dir):
  """``configs/smollm2_135m_cls.py:VARIANT[+VARIANT][:DIR]``: the ablation's trainable sets,
  λ2 values and whole-response window labels, each changing only its own fields."""
  base = load("smollm2_135m_cls", import_dir)
  assert base.sft.trainable == ""  # every parameter
  assert base.init_from == import_dir and base.sft.harmful_opener == "Sure, here is"
  assert base.sft.untrained_refusal_prefix == GateConfig().refusal_prefix
  changed = {}
  for variant in ("top10", "top20", "lambda0.3", "whole_windows", "trained_prefix",
                  "top20+lambda0.1"):
    c = load("smollm2_135m_cls", f"{variant}:{import_dir}")
    assert c.init_from == import_dir
    changed[variant] = {k: v for k, v in c.sft.items() if base.sft[k] != v}
    assert {k: v for k, v in c.items() if k != "sft"} == {
        k: v for k, v in base.items() if k != "sft"}
  assert changed == {
      "top20": dict(trainable=r"^(cls_embed|cls_head|layer_[12][0-9])(/|$)"),
      "top10": dict(trainable=r"^(cls_embed|cls_head|layer_2[0-9])(/|$)"),
      "lambda0.3": dict(cls_weight=0.3),
      "whole_windows": dict(harmful_opener=""),
      "trained_prefix": dict(untrained_refusal_prefix=""),
      "top20+lambda0.1": dict(trainable=r"^(cls_embed|cls_head|layer_[12][0-9])(/|$)",
                              cls_weight=0.1)}
  eot = load("smollm2_135m_cls", f"eot_cls:{import_dir}")  # a key of the config itself
  assert (eot.init_cls_embed, base.init_cls_embed) == ("<|im_end|>", "")
  assert eot.sft.to_dict() == base.sft.to_dict()
  assert smollm2_135m_cls.parse_arg("top20") == (["top20"], "runs/smollm2/import")
  assert smollm2_135m_cls.parse_arg("some/dir") == ([], "some/dir")
  cfg = tiny_model_config(n_layers=30, scan_layers=False)
  params = jax.eval_shape(lambda rng: model_lib.init_params(cfg, rng), jax.random.PRNGKey(0))
  for variant, layers in (("top10", range(20, 30)), ("top20", range(10, 30))):
    pattern = load("smollm2_135m_cls", f"{variant}:{import_dir}").sft.trainable
    mask = optim.trainable_mask(params, pattern)
    trained = {optim.param_path(p).split("/")[0]
               for p, on in jax.tree_util.tree_flatten_with_path(mask)[0] if on}
    assert trained == {"cls_embed", "cls_head", *(f"layer_{i}" for i in layers)}, variant
  with pytest.raises(ValueError, match="unknown variant 'top30'"):
    config_lib.sibling_config(str(CONFIGS / "tiny.py"), "smollm2_135m_cls", f"top30:{import_dir}")
