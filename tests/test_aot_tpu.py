"""The TPU compiler on this CPU machine (tools/aot.py --target): the tiny config's training step
and gated decoding loop compiled for a v5e:2x2 slice, in a process of their own
(tests/aot_tpu_worker.py) so libtpu never loads into pytest's. libtpu missing fails the test:
`make test` installs it (the tpu extra)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).with_name("aot_tpu_worker.py")


@pytest.fixture(scope="module")
def compiled():
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                        env=env, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, (
      f"compiling for a TPU failed (is libtpu installed? pip install -e '.[tpu]'):\n"
      f"{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def test_the_slice_is_a_tpu(compiled):
  assert compiled["topology"] == "v5e:2x2"
  assert compiled["device_kind"].startswith("TPU v5 lite")


def test_training_step_fits_the_formula_and_shards_its_collectives(compiled):
  """The sharded step's per-chip arguments are within the formula's bound; FSDP gathers the
  weights and reduces the gradients; XLA's FLOPs agree with 6·N·tokens + attention."""
  sharded = compiled["sharded"]
  assert 0 < sharded["arguments"] <= sharded["bound"], sharded
  assert sharded["problem"] is None
  assert sharded["collectives"]["all-gather"] > 0
  assert sharded["collectives"].get("all-reduce", 0) + sharded["collectives"].get(
      "reduce-scatter", 0) > 0
  assert sharded["flops_agree"], (sharded["xla_flops"], sharded["analytic_flops"])


def test_an_unsharded_parameter_fails_the_memory_check(compiled):
  """The embedding and LM head replicated over `tensor` (their rule dropped): the check names
  the problem."""
  bad = compiled["vocab_replicated"]
  assert bad["arguments"] > 1.5 * compiled["sharded"]["arguments"]
  assert bad["arguments"] > bad["bound"]
  assert "not sharded" in bad["problem"]


def test_decode_loop_compiles_sharded(compiled):
  """The gated decoding loop compiles for the slice and each chip holds a share of the
  parameters, not all of them."""
  d = compiled["decode"]
  assert 0 < d["peak"] < d["hbm"]
  assert 0 < d["arguments"] < 0.75 * d["weights_and_cache"]
