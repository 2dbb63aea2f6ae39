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
buckets and the chunk.

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
    for b in bodies:  # compile every prompt bucket, then the chunk with every slot live
      await _stream(client, url, b)
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


def measure(workdir: str, prompts: list[str], *, clients: int, max_tokens: int, rounds: int,
            chunk_tokens: int, log_path: str) -> dict:
  """Serve ``workdir`` with ``clients`` slots and time ``clients`` streamed requests
  sequentially and concurrently; then, in this process, the decoder alone on the same prompts
  (one call vs one call each: the bound batching sets on the server's speedup, less its
  per-request costs)."""
  texts = [prompts[i % len(prompts)] for i in range(clients)]
  bodies = [dict(messages=[dict(role="user", content=t)], max_tokens=max_tokens,
                 temperature=0.0) for t in texts]
  with ServerProcess(workdir, log_path, f"--max_batch={clients}",
              f"--chunk_tokens={chunk_tokens}") as server:
    out = asyncio.run(_rounds(server.url, bodies, rounds))
  model = sa.load(workdir)
  gen = lambda ps: model.generate(ps, max_new_tokens=max_tokens)  # noqa: E731  (as served)
  decode_s = common.interleaved(dict(one_by_one=lambda: [gen([t]) for t in texts],
                                     batched=lambda: gen(texts)), reps=rounds)
  seq, conc = out["sequential"], out["concurrent"]
  tokens = sum(r["tokens"] for r in conc[0]["requests"])
  every = lambda runs: [r for run in runs for r in run["requests"]]  # noqa: E731
  return dict(
      speedup_paired_median=float(np.median([s["wall"] / c["wall"]
                                             for s, c in zip(seq, conc)])),
      tokens_per_s=dict(sequential=tokens / min(s["wall"] for s in seq),
                        concurrent=tokens / min(c["wall"] for c in conc)),
      tokens_per_request=tokens / clients,
      ttft_ms={"clients_1": _percentiles_ms([r["ttft"] for r in every(seq)]),
               f"clients_{clients}": _percentiles_ms([r["ttft"] for r in every(conc)])},
      itl_ms={"clients_1": _percentiles_ms([r["itl"] for r in every(seq)]),
              f"clients_{clients}": _percentiles_ms([r["itl"] for r in every(conc)])},
      ttft_over_total={"clients_1": float(np.median([r["ttft"] / r["total"]
                                                     for r in every(seq)])),
                       f"clients_{clients}": float(np.median([r["ttft"] / r["total"]
                                                              for r in every(conc)]))},
      wall_s=dict(sequential=[s["wall"] for s in seq], concurrent=[c["wall"] for c in conc]),
      decoder_only_s=decode_s,
      decoder_only_speedup=decode_s["one_by_one"] / decode_s["batched"])


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
