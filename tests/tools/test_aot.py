"""The compiler's memory analysis of the sharded train step (tools/memory_estimate.py) on fake
devices."""

import dataclasses

import pytest

from configs import tiny
from safety_align import model as model_lib
from safety_align.tools import memory_estimate as memory


def _config(batch_size=8, seq_len=128, grad_accum=2):
  config = tiny.get_config("smoke")
  config.model.update(vocab_size=512, d_model=64, n_layers=2, d_ff=128)
  config.data.seq_len = seq_len
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.sft.update(batch_size=batch_size, grad_accum=grad_accum)
  return config


def test_compiled_memory_shrinks_per_device_with_more_devices():
  """One global batch sharded over 2, then 8 devices: every per-device size is positive, and
  the activations (temp) and the sharded state (arguments) shrink per device by close to the
  ideal 0.25x (~0.27x; 0.64x when the model's activation constraints were not applied)."""
  config = _config()
  two, eight = (memory.compiled_memory(config, "sft", devices=n) for n in (2, 8))
  for c in (two, eight):
    assert min(c.arguments, c.outputs, c.temp, c.peak) > 0
    assert c.peak >= c.temp
  assert eight.temp < 0.4 * two.temp, eight.temp / two.temp
  assert eight.arguments < 0.5 * two.arguments
  # Longer rows need more temporaries: the analysis follows the step's shapes.
  assert memory.compiled_memory(_config(seq_len=256), "sft", devices=8).temp > eight.temp


def test_compiled_memory_checks_its_inputs():
  with pytest.raises(ValueError, match=r"batch_size=4 is not divisible by the 8 data-parallel "
                                       r"devices.*--config.sft.batch_size=8"):
    memory.compiled_memory(_config(batch_size=4), "sft", devices=8)
  with pytest.raises(ValueError, match="16 devices asked for, 8 present: set XLA_FLAGS"):
    memory.compiled_memory(_config(), "sft", devices=16)


def test_with_attention_passes_the_field_through():
  cfg = model_lib.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                              d_ff=64)
  assert memory.with_attention(cfg, "") is cfg
  if "attention" in {f.name for f in dataclasses.fields(cfg)}:
    assert memory.with_attention(cfg, "blockwise").attention == "blockwise"
  else:
    with pytest.raises(ValueError, match="no attention field"):
      memory.with_attention(cfg, "blockwise")
