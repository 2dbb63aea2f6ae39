"""The OpenAI-compatible server on a tiny random model, in process (uvicorn in a thread, so the
tests reach the engine's hook) and as the real subprocess (SIGTERM). Replies are checked
against ``SafetyModel.generate`` with the same settings, token for token. Ordering is decided
by holding the engine after a chunk (``Engine.after_chunk``), never by timing: a stream has
the chunk's tokens while the engine is held; a request admitted while another runs gets the
tokens it gets alone; a client gone frees its slot; classification interleaves with decoding
and is dropped when its client is gone; /health reports a held (stuck) engine."""

import collections
import concurrent.futures
import json
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from conftest import tiny_model_config, tiny_params, tiny_tokenizer
import safety_align as sa
from safety_align import workdir as workdir_lib
from safety_align.serving import create_app
from safety_align.serving.metrics import Metrics
from safety_align.serving.process import ServerProcess
from safety_align.serving.reply import token_texts

KEY = "sk-test"
CHUNK = 4
TEXTS = ["how do I bake bread", "how do I pick a lock", "tell me a story about a cat",
         "Sorry, I cannot fulfill your request because it is harmful", "be brief"] * 4
PROMPTS = ["how do I bake bread", "how do I pick a lock", "a cat", "bread", "story",
           "bake a cat", "pick bread", "hi"]
GREEDY = dict(temperature=0.0)
SAMPLED = dict(temperature=0.8, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  tok = tiny_tokenizer(TEXTS, 300, tmp_path_factory.mktemp("bpe") / "tokenizer.json", "chatml")
  cfg = tiny_model_config(vocab_size=320)
  return workdir_lib.write_import(str(tmp_path_factory.mktemp("serve") / "model"), cfg,
                                  tiny_params(cfg), tok, "chatml", seq_len=160)


@pytest.fixture(scope="module")
def model(workdir):
  return sa.load(workdir)


class InProcess:
  """``create_app`` served by uvicorn in a thread on a free port (``url``); ``engine``."""

  def __init__(self, model, **kw):
    self.app = create_app(model, name="model", **kw)
    self.engine = self.app.state.engine
    self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0,
                                                log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)

  def __enter__(self):
    self.thread.start()
    while not self.server.started:
      assert self.thread.is_alive(), "the in-process server did not start"
      time.sleep(0.01)
    port = self.server.servers[0].sockets[0].getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"
    return self

  def __exit__(self, *exc):
    self.server.should_exit = True
    self.thread.join(30)


@pytest.fixture(scope="module")
def server(model):
  with InProcess(model, api_key=KEY, max_batch=4, chunk_tokens=CHUNK, max_classify_inputs=12,
                 max_body_bytes=64 * 1024) as s:
    yield s


class Hold:
  """Holds the engine (in its thread) after its ``after``-th next chunk until ``release``;
  ``held`` is set while it waits. ``record`` is called (in the engine thread) after every
  chunk."""

  def __init__(self, engine, record=None, after=1):
    self.engine, self.record, self._left = engine, record, after
    self.held, self._go = threading.Event(), threading.Event()

  def __enter__(self):
    # An earlier test's request (a cancelled stream is freed at the next chunk boundary) must
    # not be the one held: wait until the engine is idle.
    deadline = time.monotonic() + 60
    while any(self.engine.stats()[k] for k in ("live", "queued", "work_queued")):
      assert time.monotonic() < deadline, f"the engine never went idle: {self.engine.stats()}"
      time.sleep(0.01)
    self.engine.after_chunk = self._hook
    return self

  def _hook(self, chunk):
    if self.record is not None:
      self.record(chunk)
    self._left -= 1
    if self._left == 0:
      self.held.set()
      assert self._go.wait(60), "the test never released the engine"

  def release(self):
    self._go.set()

  def __exit__(self, *exc):
    self._go.set()
    self.engine.after_chunk = None


def _client(server) -> "openai.OpenAI":
  return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(server, path, body=None, *, content=None, key=KEY, **kw):
  headers = {"Authorization": f"Bearer {key}"} if key else {}
  return httpx.post(f"{server.url}{path}", json=body, content=content, headers=headers,
                    timeout=kw.pop("timeout", 60), **kw)


def _metrics(server) -> dict[str, float]:
  """``/metrics`` as {"name{labels}": value}; a labelled series not yet exported (its first
  increment is still to come, perhaps in a test on another worker) reads 0."""
  text = httpx.get(f"{server.url}/metrics", timeout=10).text
  return collections.Counter({line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                              for line in text.splitlines() if line and not line.startswith("#")})


def _wait(server, pred, what: str, timeout=60.0) -> dict:
  """Poll /metrics until ``pred(metrics)`` (a state to reach, not a timing to assert)."""
  deadline = time.monotonic() + timeout
  while not pred(m := _metrics(server)):
    assert time.monotonic() < deadline, f"never reached: {what}"
    time.sleep(0.01)
  return m


def _messages(prompt, system=None, prefill=None):
  return ([dict(role="system", content=system)] if system else []) + [
      dict(role="user", content=prompt)] + ([dict(role="assistant", content=prefill)]
                                            if prefill else [])


def _expected(model, prompt, *, max_tokens, gate, system=None, prefill=None, **sampler):
  """The generation, the text of each generated token, the safety records and the finish
  reason of a reply."""
  gen = model.generate([prompt], max_new_tokens=max_tokens, gate=gate, system=system,
                       prefill=[prefill] if prefill else None, **sampler)[0]
  n = len(model.tokenizer.encode(prefill)) if prefill else 0
  every = token_texts(model.tokenizer, gen.tokens)
  assert "".join(every) == gen.text
  probs = dict(zip(gen.cls_steps, gen.cls_probs))
  per_token = [dict(p_malicious=probs.get(j), refused=gen.refused and j >= gen.refusal_step)
               for j in range(n, len(gen.tokens))]
  final = dict(refused=gen.refused, refusal_step=gen.refusal_step, cls_probs=gen.cls_probs,
               cls_steps=gen.cls_steps, gate=gate, prefill_tokens=n)
  finish = "length" if len(gen.tokens) == n + max_tokens else "stop"
  return gen, every[n:], per_token, final, finish


def _close(a: dict, b: dict):
  """Safety records equal, probabilities to float tolerance."""
  assert a.keys() == b.keys()
  for k in a:
    if a[k] is not None and k in ("cls_probs", "p_malicious"):
      np.testing.assert_allclose(a[k], b[k], atol=1e-5)
    else:
      assert a[k] == b[k], (k, a[k], b[k])


def _check_stream(model, chunks, *, prompt, max_tokens, gate, **kw):
  """A streamed reply (openai chunks) is the generation, token for token: (the generation,
  the reply's text)."""
  gen, pieces, per_token, final, finish = _expected(model, prompt, max_tokens=max_tokens,
                                                    gate=gate, **kw)
  chunks = list(chunks)
  assert len({c.id for c in chunks}) == 1
  assert len(chunks) == len(pieces) + 1
  assert [c.choices[0].delta.content for c in chunks[:-1]] == pieces
  for c, want in zip(chunks, per_token):
    assert c.choices[0].finish_reason is None
    _close(c.choices[0].safety, want)
  assert chunks[-1].choices[0].finish_reason == finish
  _close(chunks[-1].choices[0].safety, final)
  return gen, "".join(pieces)


def _check_completion(model, r, *, prompt, max_tokens, gate, **kw):
  """A non-streamed reply is the generation; returns the generation."""
  gen, pieces, _, final, finish = _expected(model, prompt, max_tokens=max_tokens, gate=gate, **kw)
  choice = r.choices[0]
  assert choice.message.content == "".join(pieces) and choice.finish_reason == finish
  _close(choice.safety, final)
  assert r.usage.completion_tokens == len(pieces)
  return gen


def _sse_lines(r):
  """The JSON bodies of a streamed response's events, as they arrive."""
  for line in r.iter_lines():
    if line.startswith("data: {"):
      yield json.loads(line[len("data: "):])


def test_token_texts_concatenate_to_the_text(model):
  tok = model.tokenizer
  ids = tok.encode("héllo 😀 wörld") + [280, 281, 5]  # multi-byte characters, stray bytes
  pieces = token_texts(tok, ids)
  assert "".join(pieces) == tok.decode(ids) and len(pieces) == len(ids)
  assert "" in pieces  # a token inside a character adds nothing until it is complete


def test_models_health_classify_metrics(server, model):
  assert [m.id for m in _client(server).models.list().data] == ["model"]
  assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
  r = _post(server, "/v1/safety/classify", dict(input=PROMPTS))
  assert r.status_code == 200
  got = [d["p_malicious"] for d in r.json()["data"]]
  np.testing.assert_allclose(got, model.classify(PROMPTS), atol=1e-5)
  assert [d["malicious"] for d in r.json()["data"]] == [p > 0.5 for p in got]
  m = _metrics(server)
  assert m['safety_align_requests_total{endpoint="classify",outcome="ok"}'] >= 1
  assert m["safety_align_slots"] == 4 and "safety_align_live_slots" in m


def test_unlabelled_series_are_exported_at_zero_before_their_first_event():
  """A fresh server's /metrics already carries its unlabelled counters and histograms at 0 (a
  rate() over a restart needs the zero); labelled series appear with their first event."""
  lines = Metrics().render().splitlines()
  for series in ("safety_align_engine_chunks_total 0", "safety_align_generation_tokens_total 0",
                 "safety_align_time_to_first_token_seconds_count 0",
                 'safety_align_time_to_first_token_seconds_bucket{le="+Inf"} 0'):
    assert series in lines
  assert not [l for l in lines if l.startswith("safety_align_requests_total")]


def test_chat_is_generate(server, model):
  """Non-streamed and streamed, with the gate in extra_body, a system message, a continued
  assistant message (prefill) and a stop sequence (which ends the slot early)."""
  client = _client(server)
  r = client.chat.completions.create(model="model", messages=_messages("bread"),
                                     max_tokens=10, extra_body=dict(gate="every"), **GREEDY)
  gen = _check_completion(model, r, prompt="bread", max_tokens=10, gate="every", **GREEDY)
  assert gen.refused and 0 < gen.refusal_step < 10  # refused mid-response

  kw = dict(system="be brief", prefill="Sure,")
  stream = client.chat.completions.create(
      model="model", messages=_messages("hi", **kw), max_tokens=12, stream=True,
      extra_body=dict(gate="annealing"), **SAMPLED)
  gen, text = _check_stream(model, stream, prompt="hi", max_tokens=12, gate="annealing", **kw,
                            **SAMPLED)
  assert gen.text == "Sure," + text  # the reply continues the prefill

  # Cut at a stop sequence before the refusal: not refused, no later evaluation; the same
  # text streamed.
  gen, pieces, *_ = _expected(model, "bread", max_tokens=10, gate="every", **GREEDY)
  text = "".join(pieces)
  stop = "\n" + model.gate_defaults.refusal_prefix[:5]
  r = client.chat.completions.create(model="model", messages=_messages("bread"),
                                     max_tokens=10, stop=[stop, "never"],
                                     extra_body=dict(gate="every"), **GREEDY)
  choice, cut = r.choices[0], text.index(stop)
  assert choice.message.content == text[:cut] and choice.finish_reason == "stop"
  assert not choice.safety["refused"] and choice.safety["refusal_step"] is None
  kept = int(np.searchsorted(np.cumsum([0] + [len(p) for p in pieces]), cut))  # tokens sent
  assert choice.safety["cls_steps"] == [s for s in gen.cls_steps if s < max(kept, 1)]
  stream = client.chat.completions.create(model="model", messages=_messages("bread"),
                                          max_tokens=10, stop=stop, stream=True,
                                          extra_body=dict(gate="every"), **GREEDY)
  assert "".join(c.choices[0].delta.content or "" for c in stream) == text[:cut]


def test_ignore_eos_decodes_to_the_budget(server, model):
  """vLLM's ``ignore_eos``: a reply that ends at end-of-turn before its 60-token budget
  ("stop") runs on to the budget ("length") with the same start; without it the reply is
  ``generate``'s."""
  body = dict(messages=_messages("a cat"), max_tokens=60, gate="off", **GREEDY)
  plain = _post(server, "/v1/chat/completions", body).json()
  gen = model.generate(["a cat"], max_new_tokens=60, gate="off")[0]
  assert len(gen.tokens) < 60
  assert plain["usage"]["completion_tokens"] == len(gen.tokens)
  assert plain["choices"][0]["finish_reason"] == "stop"
  full = _post(server, "/v1/chat/completions", body | dict(ignore_eos=True)).json()
  assert full["usage"]["completion_tokens"] == 60
  assert full["choices"][0]["finish_reason"] == "length"
  assert full["choices"][0]["message"]["content"].startswith(
      plain["choices"][0]["message"]["content"])


def test_a_stop_string_ends_the_slot_early(server, model):
  """The engine held after the chunk that completes the stop string: the reply is over
  (the handler cancelled the slot), and the engine frees the slot at the next boundary
  instead of decoding its 60-token budget."""
  gen, pieces, *_ = _expected(model, "bread", max_tokens=60, gate="every", **GREEDY)
  stop = "\n" + model.gate_defaults.refusal_prefix[:5]
  ends = np.cumsum([len(p) for p in pieces])
  last = int(np.searchsorted(ends, "".join(pieces).index(stop) + len(stop)))  # its token
  ok = 'safety_align_requests_total{endpoint="chat",outcome="ok"}'
  before, stops = _metrics(server), server.engine.counts["cancelled_stop"]
  with Hold(server.engine, after=-(-last // CHUNK)) as hold, \
      concurrent.futures.ThreadPoolExecutor(1) as pool:
    reply = pool.submit(_post, server, "/v1/chat/completions", dict(
        messages=_messages("bread"), max_tokens=60, stop=stop, gate="every", **GREEDY))
    assert hold.held.wait(60)
    _wait(server, lambda m: m[ok] == before[ok] + 1, "the reply over")
    hold.release()
    assert reply.result(60).json()["choices"][0]["finish_reason"] == "stop"
  _wait(server, lambda m: m["safety_align_live_slots"] == 0, "the slot freed")
  assert server.engine.counts["cancelled_stop"] == stops + 1


def test_each_gate_firing_logs_one_line(server, model, caplog):
  """One structured line per firing (request id, step, P(malicious), schedule), without the
  prompt text (no --log_prompts)."""
  gen, *_ = _expected(model, "bread", max_tokens=10, gate="every", **GREEDY)
  with caplog.at_level("INFO"):
    r = _post(server, "/v1/chat/completions", dict(messages=_messages("bread"), max_tokens=10,
                                                   gate="every", **GREEDY))
  lines = [json.loads(rec.getMessage().split(" ", 1)[1]) for rec in caplog.records
           if rec.getMessage().startswith("gate_fired ")]
  assert len(lines) == 1 and lines[0]["request_id"] == r.json()["id"]
  assert lines[0]["step"] == gen.refusal_step and lines[0]["schedule"] == "every"
  probs = dict(zip(gen.cls_steps, gen.cls_probs))
  assert lines[0]["decided_at"] < gen.refusal_step and "prompt" not in lines[0]
  assert lines[0]["p_malicious"] == pytest.approx(probs[lines[0]["decided_at"]], abs=1e-5)
  assert lines[0]["p_malicious"] > model.gate_defaults.threshold


def test_concurrent_clients_share_chunks_and_are_exact(server, model):
  """24 requests from 8 concurrent clients (greedy and seeded sampling, two gates, different
  budgets, streamed or not): each reply is its own generation, token for token, and the
  engine decoded them in fewer chunks than they would take one after another."""
  before = _metrics(server)
  client = _client(server)
  refused, chunks_alone = [], []

  def request(i):
    prompt, gate = PROMPTS[i % len(PROMPTS)], ("annealing", "every")[i % 2]
    sampler = (GREEDY, SAMPLED)[(i // 2) % 2]
    kw = dict(prompt=prompt, max_tokens=9 + i % 6, gate=gate, **sampler)
    chunks_alone.append(-(-kw["max_tokens"] // CHUNK))
    if i % 3:
      stream = client.chat.completions.create(
          model="model", messages=_messages(prompt), max_tokens=kw["max_tokens"], stream=True,
          extra_body=dict(gate=gate), **sampler)
      refused.append(_check_stream(model, stream, **kw)[0].refused)
    else:
      r = client.chat.completions.create(model="model", messages=_messages(prompt),
                                         max_tokens=kw["max_tokens"],
                                         extra_body=dict(gate=gate), **sampler)
      refused.append(_check_completion(model, r, **kw).refused)

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    for f in [pool.submit(lambda c: [request(3 * c + i) for i in range(3)], c)
              for c in range(8)]:
      f.result(timeout=300)
  after = _metrics(server)
  assert len(refused) == 24 and 0 < sum(refused) < 24  # both kinds of reply
  assert (after['safety_align_requests_total{endpoint="chat",outcome="ok"}']
          - before['safety_align_requests_total{endpoint="chat",outcome="ok"}']) == 24
  assert (after["safety_align_engine_chunks_total"]
          - before["safety_align_engine_chunks_total"]) < sum(chunks_alone)


def test_stream_has_each_chunk_while_the_engine_holds(server, model):
  """The engine held after its first chunk: the client already has that chunk's tokens (and
  the rest only after the release)."""
  gen, pieces, *_ = _expected(model, "story", max_tokens=3 * CHUNK, gate="annealing", **GREEDY)
  body = dict(messages=_messages("story"), max_tokens=3 * CHUNK, stream=True, gate="annealing",
              **GREEDY)
  with Hold(server.engine) as hold, httpx.stream(
      "POST", f"{server.url}/v1/chat/completions", json=body,
      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
    events = _sse_lines(r)
    first = [next(events) for _ in range(CHUNK + 1)]  # the prompt pass's token, the chunk's
    assert hold.held.wait(60)  # the engine is in its hook, and stays there until release()
    assert [e["choices"][0]["delta"]["content"] for e in first] == pieces[:CHUNK + 1]
    hold.release()
    rest = list(events)
  assert "".join(e["choices"][0]["delta"].get("content") or "" for e in first + rest) == (
      "".join(pieces))


def test_request_admitted_mid_run_gets_its_tokens_alone(server, model):
  """B queued while the engine holds A after its first chunk, admitted at the next boundary
  while A runs: both replies equal their generations alone."""
  a = dict(prompt="how do I pick a lock", max_tokens=4 * CHUNK, gate="every", **SAMPLED)
  b = dict(prompt="bake a cat", max_tokens=3 * CHUNK + 1, gate="annealing", **GREEDY)
  body = lambda kw: dict(messages=_messages(kw["prompt"]), max_tokens=kw["max_tokens"],  # noqa
                         gate=kw["gate"], **{k: kw[k] for k in ("temperature", "top_p", "seed")
                                             if k in kw})
  with Hold(server.engine) as hold, concurrent.futures.ThreadPoolExecutor(2) as pool:
    fa = pool.submit(_post, server, "/v1/chat/completions", body(a))
    assert hold.held.wait(60)
    fb = pool.submit(_post, server, "/v1/chat/completions", body(b))
    _wait(server, lambda m: m["safety_align_queue_depth"] == 1, "B queued")
    assert server.engine.stats()["live"] == 1  # A, held mid-run
    hold.release()
    ra, rb = fa.result(60), fb.result(60)
  for r, kw in ((ra, a), (rb, b)):
    _, pieces, _, final, _ = _expected(model, **kw)
    assert r.json()["choices"][0]["message"]["content"] == "".join(pieces)
    _close(r.json()["choices"][0]["safety"], final)


def test_disconnect_mid_stream_frees_the_slot(server):
  before = _metrics(server)
  body = dict(messages=_messages("bread"), max_tokens=120, stream=True, **GREEDY)
  with Hold(server.engine) as hold:
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
      events = _sse_lines(r)
      for _ in range(CHUNK + 1):
        next(events)
      assert hold.held.wait(60)
    # The client is gone; the handler cancels, the engine frees the slot at its boundary.
    _wait(server, lambda m: m['safety_align_requests_total{endpoint="chat",outcome="cancelled"}']
          > before.get('safety_align_requests_total{endpoint="chat",outcome="cancelled"}', 0),
          "the disconnect seen")
    hold.release()
  after = _wait(server, lambda m: m["safety_align_live_slots"] == 0, "the slot freed")
  assert after["safety_align_engine_chunks_total"] - before["safety_align_engine_chunks_total"] < (
      120 // CHUNK)  # not decoded to its end
  assert server.engine.counts["cancelled_disconnect"] >= 1


def test_classification_interleaves_with_decoding(server, model):
  """12 inputs are 3 engine steps of 4 (max_batch): with a stream running, one step per chunk
  boundary, the stream's chunks in between."""
  seen = []  # classify steps done at each chunk
  record = lambda chunk: seen.append(server.engine.counts["classify_steps"])  # noqa: E731
  body = dict(messages=_messages("bread"), max_tokens=20 * CHUNK, **GREEDY)
  texts = [f"{p} {i}" for i, p in enumerate(PROMPTS + PROMPTS[:4])]
  with Hold(server.engine, record) as hold, concurrent.futures.ThreadPoolExecutor(2) as pool:
    chat = pool.submit(_post, server, "/v1/chat/completions", body)
    assert hold.held.wait(60)
    start = server.engine.counts["classify_steps"]
    cls = pool.submit(_post, server, "/v1/safety/classify", dict(input=texts))
    _wait(server, lambda m: m["safety_align_queue_depth"] == 1, "the classification queued")
    hold.release()
    r = cls.result(60)
    assert chat.result(60).status_code == 200
  np.testing.assert_allclose([d["p_malicious"] for d in r.json()["data"]],
                             model.classify(texts), atol=1e-5)
  steps = [s - start for s in seen]
  assert steps[:5] == [0, 1, 2, 3, 3]  # one step per boundary, a chunk after each


def test_classification_whose_client_is_gone_is_dropped(server):
  before = dict(server.engine.counts)
  body = json.dumps(dict(input=PROMPTS)).encode()
  with Hold(server.engine) as hold, concurrent.futures.ThreadPoolExecutor(1) as pool:
    chat = pool.submit(_post, server, "/v1/chat/completions",
                       dict(messages=_messages("bread"), max_tokens=4 * CHUNK, **GREEDY))
    assert hold.held.wait(60)
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:  # sends, then goes away
      sock.sendall(b"POST /v1/safety/classify HTTP/1.1\r\nHost: x\r\nContent-Type: "
                   b"application/json\r\nAuthorization: Bearer " + KEY.encode() +
                   b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
      _wait(server, lambda m: m["safety_align_queue_depth"] == 1, "the work queued")
    _wait(server, lambda m: m.get(
        'safety_align_requests_total{endpoint="classify",outcome="cancelled"}', 0) >= 1,
          "the disconnect seen")
    hold.release()
    assert chat.result(60).status_code == 200
  _wait(server, lambda m: m["safety_align_queue_depth"] == 0, "the work dropped")
  assert server.engine.counts["classify_steps"] == before.get("classify_steps", 0)
  assert server.engine.counts["cancelled_classify"] == before.get("cancelled_classify", 0) + 1


def test_health_reports_a_stuck_engine(server):
  engine = server.engine
  engine.stuck_after_s = 0.0  # any call in progress counts as stuck
  try:
    with Hold(engine) as hold, concurrent.futures.ThreadPoolExecutor(1) as pool:
      chat = pool.submit(_post, server, "/v1/chat/completions",
                         dict(messages=_messages("bread"), max_tokens=2 * CHUNK, **GREEDY))
      assert hold.held.wait(60)
      r = httpx.get(f"{server.url}/health", timeout=10)
      assert r.status_code == 503 and r.json()["status"] == "stuck"
      hold.release()
      assert chat.result(60).status_code == 200
    _wait(server, lambda m: m["safety_align_live_slots"] == 0, "idle")
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
  finally:
    engine.stuck_after_s = 300.0


def test_multi_turn_chat_is_served(server, model):
  chat = [dict(role="system", content="be brief"), dict(role="user", content="bread"),
          dict(role="assistant", content="a story"), dict(role="user", content="and a cat")]
  r = _post(server, "/v1/chat/completions", dict(messages=chat, max_tokens=6, **GREEDY))
  assert r.status_code == 200, r.text
  assert r.json()["usage"]["prompt_tokens"] == len(model.render(chat).ids)
  assert r.json()["usage"]["completion_tokens"] >= 1


def test_moderate_is_the_gate_over_the_text(server, model):
  """Whole and in pieces (a stream_id), equal to ``gate_stream``; expired, unknown and
  closed streams are 404s; past the open-stream limit a 429."""
  text = "the cat bakes bread, and the lock is a story"
  want = model.gate_stream("bread", gate="every").extend(text)
  msgs = _messages("bread")
  r = _post(server, "/v1/safety/moderate", dict(messages=msgs, response=text, gate="every"))
  assert r.status_code == 200, r.text
  whole = r.json()
  assert [w["step"] for w in whole["windows"]] == want.steps and whole["stream_id"] is None
  np.testing.assert_allclose([w["p_malicious"] for w in whole["windows"]], want.probs,
                             atol=1e-5)
  assert (whole["fired"], whole["fire_step"], whole["fire_char"]) == (
      want.fired, want.fire_step, want.fire_char)

  r = _post(server, "/v1/safety/moderate", dict(messages=msgs, response=text[:9],
                                                gate="every", stream=True))
  sid = r.json()["stream_id"]
  for a, b in ((9, 20), (20, 31)):
    assert _post(server, "/v1/safety/moderate", dict(stream_id=sid,
                                                     response=text[a:b])).status_code == 200
  last = _post(server, "/v1/safety/moderate", dict(stream_id=sid, response=text[31:],
                                                   done=True)).json()
  assert last["windows"] == whole["windows"] or np.allclose(
      [w["p_malicious"] for w in last["windows"]], want.probs, atol=1e-5)
  assert [w["step"] for w in last["windows"]] == want.steps
  assert (last["fired"], last["fire_step"]) == (whole["fired"], whole["fire_step"])
  gone = _post(server, "/v1/safety/moderate", dict(stream_id=sid, response="more"))
  assert gone.status_code == 404 and "unknown" in gone.json()["error"]["message"]

  streams = server.app.state.handler.streams
  sid = _post(server, "/v1/safety/moderate", dict(messages=msgs, response="the",
                                                  stream=True)).json()["stream_id"]
  streams.max_streams, streams.ttl_s = 1, 0.0
  try:
    full = _post(server, "/v1/safety/moderate", dict(messages=msgs, response="a", stream=True))
    assert full.status_code in (200, 429)  # the first expired at once (ttl 0)
    expired = _post(server, "/v1/safety/moderate", dict(stream_id=sid, response=" cat"))
    assert expired.status_code == 404 and "expired" in expired.json()["error"]["message"]
    streams.ttl_s = 600.0
    _post(server, "/v1/safety/moderate", dict(messages=msgs, response="a", stream=True))
    assert _post(server, "/v1/safety/moderate", dict(
        messages=msgs, response="a", stream=True)).status_code == 429
  finally:
    streams.max_streams, streams.ttl_s = 64, 600.0


def test_bad_requests_and_keys(server):
  msg = _messages("bread")
  cases = [
      (dict(content=b'{"messages": [{"role": "user"'), None),
      (dict(body=[1, 2]), None),
      (dict(body=dict(max_tokens=4)), "messages"),
      (dict(body=dict(messages=[])), "messages"),
      (dict(body=dict(messages=[dict(role="robot", content="hi")])), "messages[0].role"),
      (dict(body=dict(messages=_messages("a") + _messages("b"))), "messages"),  # user, user
      (dict(body=dict(messages=[dict(role="assistant", content="hi")])), "messages"),
      (dict(body=dict(messages=_messages("bread " * 200))), "messages"),
      (dict(body=dict(messages=msg, max_tokens=0)), "max_tokens"),
      (dict(body=dict(messages=msg, max_tokens=1000)), "max_tokens"),
      (dict(body=dict(messages=msg, max_completion_tokens=-1)), "max_completion_tokens"),
      (dict(body=dict(messages=msg, temperature=3)), "temperature"),
      (dict(body=dict(messages=msg, n=2)), "n"),
      (dict(body=dict(messages=msg, gate="always")), "gate"),
      (dict(body=dict(messages=msg, stop=["a", "b", "c", "d", "e"])), "stop"),
  ]
  for kw, param in cases:
    r = _post(server, "/v1/chat/completions", kw.get("body"), content=kw.get("content"))
    assert r.status_code == 400, (kw, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param
  for body in (dict(input=[]), dict(input=["bread", ""]), dict(text="bread"),
               dict(input=["bread"] * 13)):
    assert _post(server, "/v1/safety/classify", body).status_code == 400
  over = _post(server, "/v1/safety/classify", dict(input=["bread"] * 13)).json()["error"]
  assert "over this server's limit of 12" in over["message"]
  for body in (dict(response="x"), dict(stream_id="modstream-nope", response="x")):
    assert _post(server, "/v1/safety/moderate", body).status_code in (400, 404)
  big = _post(server, "/v1/chat/completions", content=b"{" + b" " * (65 * 1024) + b"}")
  assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
  with pytest.raises(openai.BadRequestError, match="exceeds"):
    _client(server).chat.completions.create(model="model", messages=msg, max_tokens=1000)

  for key in (None, "sk-wrong"):
    for path, body in (("/v1/chat/completions", dict(messages=msg)),
                       ("/v1/safety/classify", dict(input=["bread"])),
                       ("/v1/safety/moderate", dict(messages=msg, response="x"))):
      r = _post(server, path, body, key=key)
      assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/v1/models", "/docs", "/openapi.json"):
      headers = {"Authorization": f"Bearer {key}"} if key else {}
      assert httpx.get(f"{server.url}{path}", headers=headers, timeout=10).status_code == 401
  auth = {"Authorization": f"Bearer {KEY}"}
  spec = httpx.get(f"{server.url}/openapi.json", headers=auth, timeout=10).json()
  assert "/v1/safety/moderate" in spec["paths"]
  assert httpx.get(f"{server.url}/docs", headers=auth, timeout=10).status_code == 200
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0).models.list()
  assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # open
  assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200


def test_sigterm_drains_connected_clients_and_exits_0(workdir, model, tmp_path):
  """The real server, one step per chunk: SIGTERM while a stream and a plain request decode;
  both finish (drained), the process exits 0 within --shutdown_timeout and stops
  listening."""
  with ServerProcess(workdir, str(tmp_path / "server.log"), "--shutdown_timeout=20",
                     "--max_batch=2", "--chunk_tokens=1") as s:
    body = dict(messages=_messages("bread"), max_tokens=130, stream=True, **GREEDY)
    other = []
    with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=60) as r:
      events = _sse_lines(r)
      first = next(events)
      waiter = threading.Thread(target=lambda: other.append(_post(s, "/v1/chat/completions", dict(
          messages=_messages("story"), max_tokens=100, **GREEDY), key=None)))
      waiter.start()
      _wait(s, lambda m: m["safety_align_live_slots"] == 2, "both decoding")
      t0 = time.monotonic()
      s.proc.send_signal(15)
      rest = list(events)
    assert s.proc.wait(20) == 0 and time.monotonic() - t0 < 20
    waiter.join(10)
    _, pieces, _, _, finish = _expected(model, "bread", max_tokens=130, gate="annealing",
                                        **GREEDY)
    assert rest[-1]["choices"][0]["finish_reason"] == finish  # drained to its end
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in [first] + rest) == (
        "".join(pieces))
    assert other[0].status_code == 200, other[0].text
    with pytest.raises(httpx.ConnectError):
      httpx.get(f"{s.url}/health", timeout=5)


def test_sigterm_past_the_bound_ends_streams_and_exits_0(workdir, tmp_path):
  """--shutdown_timeout=0.5, less than the 130 one-step chunks a connected stream still
  needs: the stream ends with an error event and the process exits 0 within the bound (and
  a margin for the interpreter's exit)."""
  with ServerProcess(workdir, str(tmp_path / "server.log"), "--shutdown_timeout=0.5",
                     "--chunk_tokens=1") as s:
    body = dict(messages=_messages("bread"), max_tokens=130, stream=True, **GREEDY)
    with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=60) as r:
      events = _sse_lines(r)
      next(events)
      t0 = time.monotonic()
      s.proc.send_signal(15)
      rest = list(events)
    assert s.proc.wait(30) == 0
    assert time.monotonic() - t0 < 5
    assert "shut down" in rest[-1]["error"]["message"] and len(rest) < 130


def test_a_failing_chunk_fails_only_its_requests(model, monkeypatch):
  """In process: an advance that raises fails the live requests with a 500 (a stream: an
  error event); the engine goes on and serves the next request."""
  with InProcess(model, max_batch=2, chunk_tokens=CHUNK) as s:
    real = type(s.engine.slots).advance
    calls = []

    def flaky(self, n):
      calls.append(n)
      if len(calls) == 1:
        raise RuntimeError("boom")
      return real(self, n)

    monkeypatch.setattr(type(s.engine.slots), "advance", flaky)
    r = _post(s, "/v1/chat/completions", dict(messages=_messages("bread"), max_tokens=12,
                                              **GREEDY), key=None)
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error"
    r = _post(s, "/v1/chat/completions", dict(messages=_messages("bread"), max_tokens=12,
                                              **GREEDY), key=None)
    assert r.status_code == 200
