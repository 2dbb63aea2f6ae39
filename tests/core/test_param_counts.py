"""Published parameter counts of the 7B configs and their memory estimate (nothing allocated)."""

import dataclasses
import importlib.util
import os

import jax
import pytest

from safety_align import model as model_lib
from safety_align.tools import memory_estimate as memory

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs")


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name, arg, published", [
    ("llama2_7b", None, 6_738_415_616),   # meta-llama/Llama-2-7b-hf
    ("mistral_7b", None, 7_241_732_096),  # mistralai/Mistral-7B-v0.1 and v0.2
    ("mistral_7b", "v0.1", 7_241_732_096),
])
def test_param_count(name, arg, published):
  cfg = model_lib.ModelConfig.from_config(load_config(name, arg).model)
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  n = model_lib.count_params(shapes)
  assert abs(n - published) <= 0.01 * published, n
  # The [CLS] branch adds one embedding row and a D x 2 head.
  assert n - published == cfg.d_model + cfg.d_model * 2 + 2


def test_mistral_variants():
  assert load_config("mistral_7b").model.rope_theta == 1e6
  assert load_config("mistral_7b", "v0.1").model.rope_theta == 1e4


def test_memory_estimate_7b():
  cfg = model_lib.ModelConfig.from_config(load_config("llama2_7b").model)
  bf16 = dataclasses.replace(cfg, param_dtype="bfloat16")
  e = memory.estimate(bf16, devices=8, batch_size=8, seq_len=2048, grad_accum=8)
  assert 13.4e9 < e.param_bytes < 13.6e9  # 2 bytes x 6.74B
  assert e.params == e.grads == e.param_bytes / 8
  # AdamW mu, nu in float32, plus the MultiSteps accumulator when accumulating
  assert e.opt_state == pytest.approx(3 * 4 * e.n_params / 8)
  assert memory.estimate(bf16, devices=8, batch_size=8, seq_len=2048).opt_state == pytest.approx(
      2 * 4 * e.n_params / 8)
  e32 = memory.estimate(cfg, devices=8, batch_size=8, seq_len=2048, grad_accum=8)
  assert e32.param_bytes == pytest.approx(2 * e.param_bytes)
  # One 2048-token row per device: saved activations of 32 layers, a few GiB to tens of GiB.
  assert 4 * memory.GIB < e32.activations < 40 * memory.GIB
  policies = [memory.estimate(dataclasses.replace(cfg, remat=r), devices=8,
                           batch_size=8, seq_len=2048).activations
              for r in ("full", "dots_no_batch", "dots", "none")]
  assert policies == sorted(policies)
  assert memory.estimate(cfg, devices=16, batch_size=64, seq_len=2048).params == e32.params / 2
