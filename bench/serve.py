"""Serving benchmark: streaming clients at once vs the same requests one after another.

The server (``python -m safety_align.serve``, a subprocess on a free localhost port) serves
the demo-size model; the client streams chat completions over HTTP (httpx). Each round sends
``n`` requests one after another, then the same ``n`` from ``n`` concurrent clients; the
speedup is the median over rounds of sequential wall time / concurrent wall time (the same
work: greedy, so identical responses). Time to first token is the time from sending a request
to its first content chunk: the engine streams each chunk of ``--chunk_tokens`` steps as it
returns, so it is the queueing, the prompt pass and the first chunk, not the whole answer
(``ttft_over_total``: its share of the request's time). Inter-token latency is each streamed
request's (last token - first token) / (tokens - 1). Warm-up requests first compile the prompt
buckets and the chunk. ``ttft_bound_s`` times, in this process, what a request's first chunk
waits for at most when it is alone: its prompt pass into a slot of the server's
``SlotDecoder`` and two chunks (the TTFT target of the serving issue).

The server runs as ``safety_align.serving.process.ServerProcess``; the random-init model is
written by ``workdir.write_import``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time

import httpx
import numpy as np

from bench import common, models
import safety_align as sa
from safety_align import workdir as workdir_lib
from safety_align.serving.process import ServerProcess

# Requests that ask for long answers (the real model's TTFT entry: a first chunk against a
# whole answer of 256 tokens, run to its budget with ``ignore_eos``).
LONG_ANSWER = ["Write a detailed guide to growing tomatoes at home, from seed to harvest.",
               "Tell me a long story about a lighthouse keeper and a lost ship.",
               "Explain in detail how a bill becomes a law in the United States.",
               "Describe, step by step, how to plan a week-long hiking trip."]


async def _stream(client, url: str, body: dict) -> dict:
  """One streamed chat completion: seconds to the first content chunk, to the end, and the
  arrival time of each token."""
  t0 = time.perf_counter()
  arrivals = []
  async with client.stream("POST", f"{url}/v1/chat/completions",
                           json=body | dict(stream=True)) as r:
    r.raise_for_status()
    async for line in r.aiter_lines():
      if not line.startswith("data: {"):
        continue
      choices = json.loads(line[len("data: "):])["choices"]
      if choices and choices[0]["finish_reason"] is None:
        arrivals.append(time.perf_counter() - t0)
  total = time.perf_counter() - t0
  itl = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) if len(arrivals) > 1 else None
  return dict(ttft=arrivals[0] if arrivals else None, total=total, tokens=len(arrivals),
              itl=itl)


async def _rounds(url: str, bodies: list[dict], rounds: int) -> dict:
  async with httpx.AsyncClient(timeout=300.0) as client:
    for b in {json.dumps(b): b for b in bodies}.values():  # each prompt's bucket compiled,
      await _stream(client, url, b)                        # then the chunk, every slot live
    await asyncio.gather(*[_stream(client, url, b) for b in bodies])
    seq, conc = [], []
    for _ in range(rounds):
      t0 = time.perf_counter()
      one = [await _stream(client, url, b) for b in bodies]
      seq.append(dict(wall=time.perf_counter() - t0, requests=one))
      t0 = time.perf_counter()
      many = await asyncio.gather(*[_stream(client, url, b) for b in bodies])
      conc.append(dict(wall=time.perf_counter() - t0, requests=many))
  return dict(sequential=seq, concurrent=conc)


def _percentiles_ms(xs) -> dict:
  xs = [x for x in xs if x is not None]
  return dict(p50=float(np.percentile(xs, 50) * 1e3), p99=float(np.percentile(xs, 99) * 1e3))


def ttft_bound_s(model, prompt: str, *, max_batch: int, max_tokens: int, chunk_tokens: int,
                 eos: bool = True, reps: int = 3) -> dict:
  """A lone request's prompt pass into slot 0 of ``model.slots(max_batch)`` (the server's
  decoder, every other slot idle) and its next two ``advance(chunk_tokens)`` calls, best of
  ``reps`` after a compiling round (s): ``bound`` = prompt pass + 2 chunks."""
  slots = model.slots(max_batch)
  request = model.slot_request(model.render([dict(role="user", content=prompt)]),
                               max_new_tokens=max_tokens, eos=eos)
  best = dict(prompt_pass=float("inf"), chunk=float("inf"))
  for _ in range(reps + 1):
    t0 = time.perf_counter()
    slots.start(0, request)
    best["prompt_pass"] = min(best["prompt_pass"], time.perf_counter() - t0)
    for _ in range(2):
      t0 = time.perf_counter()
      slots.advance(chunk_tokens)
      best["chunk"] = min(best["chunk"], time.perf_counter() - t0)
    slots.free(0)
  return best | dict(bound=best["prompt_pass"] + 2 * best["chunk"])


def measure(workdir: str, prompts: list[str], *, clients: int, max_tokens: int, rounds: int,
            chunk_tokens: int, log_path: str, ignore_eos: bool = False) -> dict:
  """Serve ``workdir`` with ``clients`` slots and time ``clients`` streamed requests
  sequentially and concurrently; then, in this process, a lone request's TTFT bound
  (``ttft_bound_s``, the first prompt) and, unless ``ignore_eos`` (every answer runs to
  ``max_tokens``, which ``generate`` does not do), the decoder alone on the same prompts (one
  call vs one call each: the bound batching sets on the server's speedup, less its
  per-request costs)."""
  texts = [prompts[i % len(prompts)] for i in range(clients)]
  bodies = [dict(messages=[dict(role="user", content=t)], max_tokens=max_tokens,
                 temperature=0.0, ignore_eos=ignore_eos) for t in texts]
  with ServerProcess(workdir, log_path, f"--max_batch={clients}",
              f"--chunk_tokens={chunk_tokens}") as server:
    out = asyncio.run(_rounds(server.url, bodies, rounds))
  model = sa.load(workdir)
  bound = ttft_bound_s(model, texts[0], max_batch=clients, max_tokens=max_tokens,
                       chunk_tokens=chunk_tokens, eos=not ignore_eos)
  decode_s = None
  if not ignore_eos:
    gen = lambda ps: model.generate(ps, max_new_tokens=max_tokens)  # noqa: E731  (as served)
    decode_s = common.interleaved(dict(one_by_one=lambda: [gen([t]) for t in texts],
                                       batched=lambda: gen(texts)), reps=rounds)
  seq, conc = out["sequential"], out["concurrent"]
  tokens = sum(r["tokens"] for r in conc[0]["requests"])
  sides = {"clients_1": [r for run in seq for r in run["requests"]],
           f"clients_{clients}": [r for run in conc for r in run["requests"]]}
  per_side = lambda f: {k: f(rs) for k, rs in sides.items()}  # noqa: E731
  ttft_ms = per_side(lambda rs: _percentiles_ms([r["ttft"] for r in rs]))
  return dict(
      speedup_paired_median=float(np.median([s["wall"] / c["wall"]
                                             for s, c in zip(seq, conc)])),
      tokens_per_s=dict(sequential=tokens / min(s["wall"] for s in seq),
                        concurrent=tokens / min(c["wall"] for c in conc)),
      tokens_per_request=tokens / clients,
      ttft_ms=ttft_ms,
      itl_ms=per_side(lambda rs: _percentiles_ms([r["itl"] for r in rs])),
      ttft_over_total=per_side(lambda rs: float(np.median([r["ttft"] / r["total"]
                                                           for r in rs]))),
      answer_s=per_side(lambda rs: float(np.median([r["total"] for r in rs]))),
      ttft_bound_ms={k: v * 1e3 for k, v in bound.items()},
      ttft_clients_1_within_bound=ttft_ms["clients_1"]["p50"] <= bound["bound"] * 1e3,
      wall_s=dict(sequential=[s["wall"] for s in seq], concurrent=[c["wall"] for c in conc]),
      decoder_only_s=decode_s,
      decoder_only_speedup=decode_s and decode_s["one_by_one"] / decode_s["batched"])


def demo_workdir(demo, cache_dir: str) -> str:
  """A directory the server loads the demo model from: ``runs/tiny`` if trained, else the
  random-init model written into ``cache_dir``."""
  if demo.source == models.DEMO_WORKDIR:
    return demo.source
  from configs import tiny  # pylint: disable=g-import-not-at-top
  out = os.path.join(cache_dir, "serve_workdir")
  shutil.rmtree(out, ignore_errors=True)
  return workdir_lib.write_import(out, demo.cfg, demo.params, demo.tokenizer, "demo",
                       tiny.get_config().data.seq_len)
