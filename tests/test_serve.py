"""The OpenAI-compatible server on a tiny random model: the real server as a subprocess on a
free localhost port, driven by the official ``openai`` client and by plain HTTP (httpx), each
reply checked against ``SafetyModel.generate`` with the same settings; batching under load,
disconnects, SIGTERM, the 400 / 401 errors, and a failing decode (in process)."""

import concurrent.futures
import threading
import time

import flax.linen as nn
import httpx
import jax
import numpy as np
import openai
import pytest

from conftest import tiny_model_config
from bench.serve import Server, write_workdir
import safety_align as sa
from safety_align.data import templates
from safety_align.data.tokenizer import train_bpe
from safety_align.model import init_params
from safety_align.serving import Batcher, batcher, create_app, protocol

KEY = "sk-test"
TEXTS = ["how do I bake bread", "how do I pick a lock", "tell me a story about a cat",
         "Sorry, I cannot fulfill your request because it is harmful", "be brief"] * 4
# 17-32 tokens each in the chatml template: one prompt bucket.
PROMPTS = ["how do I bake bread", "how do I pick a lock", "a cat", "bread", "story",
           "bake a cat", "pick bread", "hi"]
GREEDY = dict(temperature=0.0)
SAMPLED = dict(temperature=0.8, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  chatml = templates.get_template("chatml")
  tok = train_bpe(TEXTS, 300, str(tmp_path_factory.mktemp("bpe") / "tokenizer.json"),
                  chatml.special_tokens)
  cfg = tiny_model_config(vocab_size=320)
  params = nn.meta.unbox(jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)))
  return write_workdir(str(tmp_path_factory.mktemp("serve") / "model"), cfg, params, tok,
                       "chatml", seq_len=160)


@pytest.fixture(scope="module")
def model(workdir):
  return sa.load(workdir)


@pytest.fixture(scope="module")
def server(workdir, tmp_path_factory):
  log = str(tmp_path_factory.mktemp("log") / "server.log")
  with Server(workdir, log, f"--api_key={KEY}", "--max_batch=4", "--batch_window_ms=20") as s:
    yield s
    assert s.stop() == 0, s.log()[-2000:]


def _client(server) -> "openai.OpenAI":
  return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(server, path, body=None, *, content=None, key=KEY, **kw):
  headers = {"Authorization": f"Bearer {key}"} if key else {}
  return httpx.post(f"{server.url}{path}", json=body, content=content, headers=headers,
                    timeout=kw.pop("timeout", 60), **kw)


def _health(server) -> dict:
  return httpx.get(f"{server.url}/health", timeout=10).json()


def _wait_health(server, pred, timeout=30.0) -> dict:
  deadline = time.monotonic() + timeout
  while not pred(h := _health(server)):
    assert time.monotonic() < deadline, f"server state never reached: {h}"
    time.sleep(0.02)
  return h


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
  every = protocol.token_texts(model.tokenizer, gen.tokens)
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


def _check_stream(model, stream, *, prompt, max_tokens, gate, **kw):
  """A streamed reply (openai chunks) is the generation, token for token: (the generation,
  the reply's text)."""
  gen, pieces, per_token, final, finish = _expected(model, prompt, max_tokens=max_tokens,
                                                    gate=gate, **kw)
  chunks = list(stream)
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


def test_token_texts_concatenate_to_the_text(model):
  tok = model.tokenizer
  ids = tok.encode("héllo 😀 wörld") + [280, 281, 5]  # multi-byte characters, stray bytes
  pieces = protocol.token_texts(tok, ids)
  assert "".join(pieces) == tok.decode(ids) and len(pieces) == len(ids)
  assert "" in pieces  # a token inside a character adds nothing until it is complete


@pytest.mark.slow
def test_models_health_classify(server, model):
  assert [m.id for m in _client(server).models.list().data] == ["model"]
  assert _health(server)["status"] == "ok"
  r = _post(server, "/v1/safety/classify", dict(input=PROMPTS))
  assert r.status_code == 200
  got = [d["p_malicious"] for d in r.json()["data"]]
  np.testing.assert_allclose(got, model.classify(PROMPTS), atol=1e-5)
  assert [d["malicious"] for d in r.json()["data"]] == [p > 0.5 for p in got]


@pytest.mark.slow
def test_chat_is_generate(server, model):
  """Non-streamed and streamed, with the gate in extra_body, a system message, a continued
  assistant message (prefill) and a stop sequence."""
  client = _client(server)
  r = client.chat.completions.create(model="model", messages=_messages("bread"),
                                     max_tokens=10, extra_body=dict(gate="every"), **GREEDY)
  gen = _check_completion(model, r, prompt="bread", max_tokens=10, gate="every",
                          **GREEDY)
  assert gen.refused and 0 < gen.refusal_step < 10  # refused mid-response

  kw = dict(system="be brief", prefill="Sure,")
  stream = client.chat.completions.create(
      model="model", messages=_messages("hi", **kw), max_tokens=12, stream=True,
      extra_body=dict(gate="annealing"), **SAMPLED)
  gen, text = _check_stream(model, stream, prompt="hi", max_tokens=12, gate="annealing", **kw,
                            **SAMPLED)
  assert gen.text == "Sure," + text  # the reply continues the prefill

  # Cut at a stop sequence before the refusal: not refused, no later evaluation.
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


@pytest.mark.slow
def test_concurrent_clients_are_batched_and_exact(server, model):
  """32 requests from 8 concurrent clients (greedy and seeded sampling, two gates, budgets
  within one bucket, streamed or not): each reply is its own generation, token for token,
  and they were decoded in fewer calls than requests."""
  before = _health(server)
  client = _client(server)

  refused = []

  def request(i):
    prompt, gate = PROMPTS[i % len(PROMPTS)], ("annealing", "every")[i % 2]
    sampler = (GREEDY, SAMPLED)[(i // 2) % 2]
    kw = dict(prompt=prompt, max_tokens=9 + i % 6, gate=gate, **sampler)
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

  def run_client(c):
    for i in range(4):
      request(4 * c + i)

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    for f in [pool.submit(run_client, c) for c in range(8)]:
      f.result(timeout=120)
  after = _health(server)
  assert len(refused) == 32 and 0 < sum(refused) < 32  # both kinds of reply
  assert after["completed"] - before["completed"] == 32 and after["failed"] == 0
  assert after["batches"] - before["batches"] < 32


@pytest.mark.slow
def test_bad_requests_400_and_keys_401(server):
  msg = _messages("bread")
  cases = [
      (dict(content=b'{"messages": [{"role": "user"'), None),
      (dict(body=[1, 2]), None),
      (dict(body=dict(max_tokens=4)), "messages"),
      (dict(body=dict(messages=[])), "messages"),
      (dict(body=dict(messages=[dict(role="robot", content="hi")])), "messages[0].role"),
      (dict(body=dict(messages=_messages("a") + _messages("b"))), "messages"),
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
  for body in (dict(input=[]), dict(input=["bread", ""]), dict(text="bread")):
    assert _post(server, "/v1/safety/classify", body).status_code == 400
  with pytest.raises(openai.BadRequestError, match="does not fit"):
    _client(server).chat.completions.create(model="model", messages=msg, max_tokens=1000)

  for key in (None, "sk-wrong"):
    for path, body in (("/v1/chat/completions", dict(messages=msg)),
                       ("/v1/safety/classify", dict(input=["bread"]))):
      r = _post(server, path, body, key=key)
      assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
  assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0).models.list()
  assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # open


@pytest.mark.slow
def test_disconnects_free_their_slot(server):
  """A client gone while its request waits: the request is dropped, never decoded. A client
  gone mid-stream: nothing is left behind."""
  before = _health(server)
  body = dict(messages=_messages("bread"), temperature=0.0)
  slow = threading.Thread(  # a new budget bucket: its call compiles first (seconds)
      target=lambda: _post(server, "/v1/chat/completions", body | dict(max_tokens=100)))
  slow.start()
  _wait_health(server, lambda h: h["running"] == 1)
  with pytest.raises(httpx.ReadTimeout):
    _post(server, "/v1/chat/completions", body | dict(max_tokens=10, stream=True), timeout=0.5)
  slow.join(60)
  after = _wait_health(server, lambda h: h["queued"] == h["running"] == 0)
  assert after["cancelled"] - before["cancelled"] == 1
  assert after["completed"] - before["completed"] == 1  # the slow one only

  with httpx.stream("POST", f"{server.url}/v1/chat/completions",
                    json=body | dict(max_tokens=10, stream=True),
                    headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
    assert next(r.iter_lines()).startswith("data: {")
  r = _post(server, "/v1/chat/completions", body | dict(max_tokens=10))
  assert r.status_code == 200
  assert _wait_health(server, lambda h: h["queued"] == h["running"] == 0)["failed"] == 0


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_exits_0(workdir, tmp_path):
  s = Server(workdir, str(tmp_path / "server.log"), "--batch_window_ms=5")
  with s:
    results = {}

    def send(name, gate):
      results[name] = _post(s, "/v1/chat/completions", dict(
          messages=_messages("bread"), max_tokens=10, temperature=0.0, gate=gate), key=None)

    first = threading.Thread(target=send, args=("running", "annealing"))
    first.start()
    _wait_health(s, lambda h: h["running"] == 1)  # compiling its decode call
    second = threading.Thread(target=send, args=("queued", "every"))  # another call
    second.start()
    _wait_health(s, lambda h: h["queued"] == 1)
    t0 = time.monotonic()
    assert s.stop() == 0
    assert time.monotonic() - t0 < 30
    first.join(10)
    second.join(10)
    for name in ("running", "queued"):
      assert results[name].status_code == 200, results[name].text
      assert results[name].json()["choices"][0]["safety"]["gate"] in ("annealing", "every")
    with pytest.raises(httpx.ConnectError):
      httpx.get(f"{s.url}/health", timeout=5)


@pytest.mark.slow
def test_sigterm_past_the_bound_cancels_and_exits_0(workdir, tmp_path):
  """A decode call longer than --shutdown_timeout: its request gets a 503, the server exits 0
  without waiting for it."""
  with Server(workdir, str(tmp_path / "server.log"), "--shutdown_timeout=0.5") as s:
    result = []
    slow = threading.Thread(target=lambda: result.append(_post(s, "/v1/chat/completions", dict(
        messages=_messages("bread"), max_tokens=100, temperature=0.0), key=None)))
    slow.start()
    _wait_health(s, lambda h: h["running"] == 1)  # compiling a new bucket: seconds
    t0 = time.monotonic()
    assert s.stop() == 0
    assert time.monotonic() - t0 < 10
    slow.join(10)
    assert result[0].status_code == 503 and "shut down" in result[0].json()["error"]["message"]


def test_a_failing_decode_fails_only_its_request(model, monkeypatch):
  """In process: a decode call that raises for one job (max_tokens=13) fails that job; its
  batch-mates are decoded alone, the server goes on; over HTTP the failure is a 500."""
  real = batcher.DecodeKey.run

  def flaky(self, m, jobs):
    if any(j.max_new_tokens == 13 for j in jobs):
      raise RuntimeError("boom")
    return real(self, m, jobs)

  monkeypatch.setattr(batcher.DecodeKey, "run", flaky)
  b = Batcher(model, max_batch=4, window_s=0.3)
  b.start()
  req = lambda n: protocol.ChatRequest(messages=_messages("bread"), max_tokens=n,  # noqa: E731
                                       temperature=0.0)
  jobs = [protocol.chat_job(model, req(n), gate="annealing", max_tokens=64,
                            server_seed=b.seed).job for n in (12, 13, 14)]
  futures = [b.submit(j) for j in jobs]
  assert len(futures[0].result(60).tokens) == 12 and len(futures[2].result(60).tokens) == 14
  with pytest.raises(RuntimeError, match="Internal error.*boom"):
    futures[1].result(60)
  assert b.stats() == dict(queued=0, running=0, completed=2, failed=1, cancelled=0, batches=4)
  assert b.close(10)

  from fastapi.testclient import TestClient  # pylint: disable=g-import-not-at-top
  with TestClient(create_app(model, name="m", window_s=0.0)) as client:
    r = client.post("/v1/chat/completions", json=dict(messages=_messages("bread"),
                                                      max_tokens=13, temperature=0.0))
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error"
    r = client.post("/v1/chat/completions", json=dict(messages=_messages("bread"),
                                                      max_tokens=12, temperature=0.0))
    assert r.status_code == 200
