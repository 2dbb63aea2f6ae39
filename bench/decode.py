"""Decoding benchmarks: the gate's overhead per schedule, and our decoder vs transformers.

One interleaved timing round per (model, batch) covers every variant: our decoder with the
gate off (``schedule="off"``: no [CLS] at all, the plain decoder) and with each schedule, and
``LlamaForCausalLM.generate`` (greedy, KV cache) on the same weights and prompt ids. Every row
generates exactly ``new_tokens`` tokens (no EOS: ``eos_ids=[]``; HF: ``min_new_tokens``).
The gate runs with ``threshold=1.0``: every evaluation reads benign, so nothing is inserted
and no suspicion forces extra re-evaluations (the benign-prompt case); the compiled program
and its work per evaluation are the same as at any threshold (it is traced), and the number
of evaluations and refusals are checked and reported.

A ``prefill`` variant (gate off, one new token: the prompt pass alone) runs in the same
rounds, so the decode loop's own time per step, (decode - prompt pass) / (new_tokens - 1),
can be set against ``matmul_floor_s`` (a per-step floor) apart from the prompt pass, which
the whole-decode time per token also holds.

With ``slots_chunk``, the server's loop runs in the same rounds too: every row started in a
``SlotDecoder`` (``decode/slots.py``, the serving engine's decoder, a 2,048-token slot
context) and advanced ``slots_chunk`` steps a call until done (``slots_<schedule>``), beside
the starts alone (``slots_start``), so its loop per step is (slots - starts) /
(new_tokens - 1).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from safety_align.decode import Decoder, GateConfig, Prompts
from safety_align.decode.sampling import Greedy
from safety_align.decode.slots import SlotDecoder, SlotRequest
from safety_align.masks import Role
from safety_align.model import ModelConfig, count_params, unroll_layers

SCHEDULES = ("first", "periodic", "every", "annealing")
BENIGN = ["How do I bake bread at home?", "Tell me a story about a brave cat.",
          "What is the capital of France?", "Give me three tips for learning to swim.",
          "Explain how a rainbow forms.", "Write a short poem about autumn leaves.",
          "How can I keep my houseplants healthy?", "What is a good name for a pet rabbit?"]


@dataclasses.dataclass
class Workload:
  """A model and a batch of prompts, encoded for both sides."""

  name: str
  cfg: ModelConfig
  params: Any
  prompts: Prompts  # ours (roles: BOS, TEMPLATE, QUERY)
  refusal_ids: list[int]
  newline_ids: list[int]


def demo_workload(demo, batch: int, name: str = "demo") -> Workload:
  """Benign chat prompts through ``demo``'s (a ``models.Demo``) chat template and tokenizer."""
  tok = demo.tokenizer
  pieces = [demo.template.prompt_pieces(tok, BENIGN[i % len(BENIGN)]) for i in range(batch)]
  return Workload(name, demo.cfg, demo.params, Prompts.from_pieces(pieces),
                  tok.encode(GateConfig().refusal_prefix), tok.encode("\n"))


def random_workload(name: str, cfg: ModelConfig, params, batch: int, prompt_len: int,
                    seed: int = 0) -> Workload:
  """Random prompt ids of one length (BOS, 3 TEMPLATE, QUERY, 3 TEMPLATE)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, cfg.vocab_size, (batch, prompt_len))
  ids[:, 0] = 1
  roles = np.full((batch, prompt_len), int(Role.QUERY))
  roles[:, 0] = Role.BOS
  roles[:, 1:4] = Role.TEMPLATE
  roles[:, -3:] = Role.TEMPLATE
  return Workload(name, cfg, params, Prompts.from_arrays(ids, roles),
                  rng.integers(3, cfg.vocab_size, 9).tolist(), [4])


def gate(schedule: str) -> GateConfig:
  return GateConfig(schedule=schedule, threshold=1.0)


def ours(w: Workload, schedule: str, new_tokens: int):
  """A closure decoding ``w`` under ``schedule`` (returns the host-side DecodeOutput)."""
  cfg, params = unroll_layers(w.cfg, w.params)  # once, as ``SafetyModel`` does at load
  decoder = Decoder(cfg, eos_ids=[], pad_id=0)
  g = gate(schedule)

  def run():
    return decoder(params, w.prompts, max_new_tokens=new_tokens, gate=g, sampler=Greedy(),
                   refusal_ids=w.refusal_ids, newline_ids=w.newline_ids)
  return run


@dataclasses.dataclass
class SlotsOutput:
  """The slots variant's tokens [B, N] and counts, as ``DecodeOutput`` names them."""

  tokens: np.ndarray
  lengths: np.ndarray
  refused: np.ndarray
  n_evals: np.ndarray


SLOT_CONTEXT = 2048  # the slots' context (the server's default is the model's)


def slot_decoder(w: Workload) -> SlotDecoder:
  """One ``SlotDecoder`` for ``w``'s batch, as the serving engine builds it: every slots
  variant runs its requests (their own gates) through it."""
  cfg, params = unroll_layers(w.cfg, w.params)
  return SlotDecoder(cfg, params, max_batch=len(w.prompts), max_len=SLOT_CONTEXT, pad_id=0,
                     eos_ids=[], with_cls=True, resolve_gate=lambda g: g,
                     refusal_ids=lambda g: w.refusal_ids, newline_ids=w.newline_ids,
                     insertion_width=len(w.newline_ids) + len(w.refusal_ids))


def slots(w: Workload, decoder: SlotDecoder, schedule: str, new_tokens: int, chunk: int, *,
          start_only: bool = False):
  """A closure that starts every prompt of ``w`` in a slot of ``decoder`` under ``schedule``
  and, unless ``start_only``, advances all slots ``chunk`` steps a call until each has
  ``new_tokens`` tokens; the slots are freed after."""
  requests = [SlotRequest(prompt_ids=ids, roles=roles, max_new_tokens=new_tokens,
                          gate=gate(schedule), eos=False, row=i)
              for i, (ids, roles) in enumerate(zip(w.prompts.ids, w.prompts.roles))]

  def run():
    events = [decoder.start(i, r) for i, r in enumerate(requests)]
    tokens = [list(e.tokens) for e in events]
    evals = [len(e.cls) for e in events]
    refused = [e.refused for e in events]
    while not start_only and (advanced := decoder.advance(chunk)):
      for e in advanced:  # the events the engine streams after each chunk
        tokens[e.slot] += e.tokens
        evals[e.slot] += len(e.cls)
        refused[e.slot] |= e.refused
    for i in range(len(requests)):
      decoder.free(i)
    width = max(len(t) for t in tokens)
    return SlotsOutput(tokens=np.array([t + [0] * (width - len(t)) for t in tokens]),
                       lengths=np.array([len(t) for t in tokens]),
                       refused=np.array(refused), n_evals=np.array(evals))
  return run


def hf_generate(hf_model, w: Workload, new_tokens: int):
  """A closure running ``generate`` on ``w``'s prompts (left-padded; greedy, KV cache)."""
  import torch  # pylint: disable=g-import-not-at-top
  lengths = w.prompts.lengths
  width = int(lengths.max())
  ids = np.zeros((len(lengths), width), np.int64)
  attn = np.zeros((len(lengths), width), np.int64)
  for i, row in enumerate(w.prompts.ids):
    ids[i, width - len(row):] = row
    attn[i, width - len(row):] = 1
  device = hf_model.device
  ids, attn = torch.from_numpy(ids).to(device), torch.from_numpy(attn).to(device)
  hf_model.generation_config.eos_token_id = None
  hf_model.generation_config.pad_token_id = 0

  def run():
    with torch.no_grad():
      out = hf_model.generate(ids, attention_mask=attn, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                              use_cache=True, eos_token_id=None, pad_token_id=0)
    common.torch_sync()
    return out[:, width:].cpu().numpy()
  return run


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
  """Leading greedy-token agreement of two [B, N] token arrays."""
  same = a == b
  lead = np.where(same.all(axis=1), a.shape[1], np.argmin(same, axis=1))
  return dict(min_leading_tokens_equal=int(lead.min()),
              mean_leading_tokens_equal=float(lead.mean()),
              fraction_tokens_equal=float(same.mean()))


def measure(w: Workload, hf_model, *, new_tokens: int, reps: int, schedules=SCHEDULES,
            hf_reps: int | None = None, slots_chunk: int | None = None) -> dict:
  """Times (s) of every variant on ``w`` in one interleaved round, the guard checks, and
  per-schedule evaluation counts. The HF side has no compilation, so its first call (which
  also gives the tokens for the agreement check) is a timing sample; it then runs in
  ``hf_reps`` (default ``reps``) more rounds. ``slots_chunk``: the slots variants too
  (module doc), their tokens checked equal to the whole decoder's under each schedule (the
  gate-off slots keep [CLS] in the prompt pass, as the server does for a [CLS] model, where
  the whole decoder's ``off`` has none: the loops' steps are the same work)."""
  fns = {"off": ours(w, "off", new_tokens), "prefill": ours(w, "off", 1)}
  fns.update({s: ours(w, s, new_tokens) for s in schedules})
  slot_variants = ()
  if slots_chunk:
    slot_variants, decoder = ("off",) + tuple(schedules), slot_decoder(w)
    fns["slots_start"] = slots(w, decoder, "off", new_tokens, slots_chunk, start_only=True)
    fns.update({f"slots_{s}": slots(w, decoder, s, new_tokens, slots_chunk)
                for s in slot_variants})
  if hf_model is not None:
    fns["hf"] = hf_generate(hf_model, w, new_tokens)
  outputs, first = {}, {}
  for name, fn in fns.items():  # compile + warm, and keep the results
    t0 = time.perf_counter()
    outputs[name] = fn()
    first[name] = time.perf_counter() - t0
  for name, out in outputs.items():
    if name != "hf":
      want = 1 if name in ("prefill", "slots_start") else new_tokens
      if not (out.lengths == want).all():
        raise RuntimeError(f"{name}: lengths {out.lengths}, expected all {want}.")
      if out.refused.any():
        raise RuntimeError(f"{name}: the gate inserted a refusal in a timing run.")
  for sched in schedules if slot_variants else ():  # slots_off keeps [CLS] in its prompt pass
    if not np.array_equal(outputs[f"slots_{sched}"].tokens, outputs[sched].tokens[:, :new_tokens]):
      raise RuntimeError(f"slots_{sched}: tokens differ from the whole decoder's.")
  rounds = {}
  times = common.interleaved(
      {k: _blocking(f) for k, f in fns.items()}, reps, warmup=0,
      reps_of={"hf": reps if hf_reps is None else hf_reps},
      prior={"hf": first["hf"]} if "hf" in first else None, samples=rounds)
  b = len(w.prompts)
  loop = {k: [(t - p) / (new_tokens - 1) for t, p in zip(rounds[k], rounds["prefill"])]
          for k in ("off",) + tuple(schedules)}
  slots_loop = {k: [(t - p) / (new_tokens - 1)
                    for t, p in zip(rounds[f"slots_{k}"], rounds["slots_start"])]
                for k in slot_variants}
  res = dict(model=w.name, batch=b, new_tokens=new_tokens, times_s=times,
             overhead_paired_median={s: common.paired_ratio(rounds[s], rounds["off"]) - 1
                                     for s in schedules},
             loop_s_per_step={k: float(np.median(v)) for k, v in loop.items()},
             loop_overhead_paired_median={s: common.paired_ratio(loop[s], loop["off"]) - 1
                                          for s in schedules},
             slots_loop_s_per_step={k: float(np.median(v)) for k, v in slots_loop.items()},
             slots_loop_overhead_paired_median={
                 s: common.paired_ratio(slots_loop[s], slots_loop["off"]) - 1
                 for s in schedules if slot_variants},
             slots_chunk=slots_chunk,
             first_call_s=first,
             evaluations_per_row={s: int(outputs[s].n_evals[0]) for s in schedules},
             tokens_per_s={k: b * new_tokens / t for k, t in times.items()
                           if k not in ("prefill", "slots_start")},
             step_flops=step_flops(w.cfg, int(w.prompts.lengths.max()) + new_tokens))
  if hf_model is not None:
    hf_tokens = outputs["hf"]
    if hf_tokens.shape != (b, new_tokens):
      raise RuntimeError(f"HF generated {hf_tokens.shape}, expected {(b, new_tokens)}.")
    res["greedy_agreement_off_vs_hf"] = agreement(outputs["off"].tokens[:, :new_tokens],
                                                  hf_tokens)
  return res


def _blocking(fn):
  def run():
    fn()  # ours returns host arrays (device_get inside); HF synchronises itself
  return run


def model_info(w: Workload) -> dict:
  c = w.cfg
  return dict(vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.n_layers,
              n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, d_ff=c.d_ff,
              params=count_params(w.params), dtype=c.dtype)


def step_flops(cfg: ModelConfig, context: int) -> dict:
  """Model FLOPs per row of a decode step over ``context`` keys: a token row (layers + LM
  head) and a [CLS] row (layers only: it skips the LM head). ``ratio``, (token + [CLS]) /
  token, bounds the ``every`` overhead from below (ratio - 1) wherever decoding is
  compute-bound rather than weight-bandwidth-bound."""
  d, hd = cfg.d_model, cfg.dim_per_head
  per_layer = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.d_ff
  layers = cfg.n_layers * (2 * per_layer + 4 * context * cfg.n_heads * hd)
  head = 2 * d * cfg.vocab_size
  return dict(token_row=layers + head, cls_row=layers,
              ratio=(2 * layers + head) / (layers + head))


def cls_matmul_overhead(evaluations: int, new_tokens: int, floor_ms: float,
                        cls_floor_ms: float, loop_ms: float) -> float:
  """The loop overhead a schedule's [CLS] rows cost in weight matmuls alone: its
  ``evaluations`` after the prompt pass, each a step at ``cls_floor_ms`` instead of
  ``floor_ms`` (``matmul_floor_s`` with and without the [CLS] rows), over the gate-off loop's
  ``new_tokens - 1`` steps of ``loop_ms``. The measured loop overhead cannot fall below it
  without a cheaper [CLS] forward."""
  return evaluations * (cls_floor_ms - floor_ms) / ((new_tokens - 1) * loop_ms)


def read_bandwidth(reps: int = 5, mib: int = 512) -> float:
  """Best bytes/s of a jitted reduction over an f32 array larger than any cache: the rate at
  which a decode step can stream weights that it reads once."""
  x = jnp.ones((mib * 2 ** 18,), jnp.float32)
  f = jax.jit(jnp.sum)
  times = common.interleaved({"read": lambda: f(x).block_until_ready()}, reps)
  return x.nbytes / times["read"]


def weight_bytes(cfg: ModelConfig) -> int:
  """Bytes of the weights one decode step reads in full: every layer and the LM head (the
  input embedding is a gather of B rows)."""
  d, hd = cfg.d_model, cfg.dim_per_head
  per_layer = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.d_ff
  return 4 * (cfg.n_layers * per_layer + d * cfg.vocab_size)


def matmul_floor_s(cfg: ModelConfig, batch: int, reps: int = 5, steps: int = 16,
                   cls_rows: int = 0) -> float:
  """Seconds per decode step of the step's weight matmuls alone, at ``batch`` rows: every
  layer's q, k, v, o, gate, up and down projections (distinct random weights per layer, as
  the model reads them) and the LM head, chained in a jitted loop of ``steps`` steps. No
  attention, norms, sampling or cache: the part of a step that XLA's matmul kernels bound.
  ``cls_rows``: that many more rows through the layers but not the LM head (a step with the
  gate's [CLS] rows, ``loop._token_cls_step``)."""
  d, hd, f = cfg.d_model, cfg.dim_per_head, cfg.d_ff
  shapes = [(d, cfg.n_heads * hd), (d, cfg.n_kv_heads * hd), (d, cfg.n_kv_heads * hd),
            (cfg.n_heads * hd, d), (d, f), (d, f), (f, d)]
  keys = iter(jax.random.split(jax.random.key(0), cfg.n_layers * len(shapes) + 1))
  layers = [[jax.random.normal(next(keys), s) * 0.02 for s in shapes]
            for _ in range(cfg.n_layers)]
  head = jax.random.normal(next(keys), (d, cfg.vocab_size)) * 0.02

  @jax.jit
  def run(layers, head, x):
    def step(_, x):
      for wq, wk, wv, wo, wg, wu, wd in layers:
        q, k, v = x @ wq, x @ wk, x @ wv
        x = x + (q @ wo) * 1e-3 + ((x @ wg) * (x @ wu)) @ wd * 1e-3
        x = x + (k.sum() + v.sum()) * 1e-6
      return x.at[:batch].add((x[:batch] @ head).max(-1, keepdims=True) * 1e-6)
    return jax.lax.fori_loop(0, steps, step, x)

  x = jnp.ones((batch + cls_rows, d), jnp.float32)
  times = common.interleaved({"matmuls": lambda: run(layers, head, x).block_until_ready()},
                             reps)
  return times["matmuls"] / steps
