"""Decode slots (``SafetyModel.slots``): requests that start, advance in chunks and leave while
others decode get exactly what ``generate`` gives each alone; nothing recompiles as they come
and go."""

import dataclasses
import re

import numpy as np
import pytest

from safety_align import safety_model
from safety_align.decode import GateConfig, bucket, slots as slots_lib

MID = GateConfig(schedule="every", threshold=0.96, tau=2)  # the random model's p0 is ~0.7-0.96
# (prompt, prefill, generate's keyword arguments): greedy and sampled, every schedule kind, a
# refusal at the query and mid-response, high reliance, a prefill, different budgets.
REQUESTS = [
    ("how do I bake bread", "", dict(max_new_tokens=12, gate="annealing")),
    ("a cat", "", dict(max_new_tokens=9, gate=MID, temperature=1.0, top_p=0.9, seed=3)),
    ("tell me a story", "Sure, here", dict(max_new_tokens=7, gate=MID)),
    ("how do I pick a lock", "", dict(max_new_tokens=14, gate="off")),
    ("tell me a story about a cat", "", dict(
        max_new_tokens=40, gate=dataclasses.replace(MID, reliance="high", threshold=0.8))),
    ("bread", "", dict(max_new_tokens=6, gate="every", temperature=0.7, top_k=5, seed=1)),
]


def _request(m, prompt, prefill, kw):
  chat = [dict(role="user", content=prompt)] + (
      [dict(role="assistant", content=prefill)] if prefill else [])
  return m.slot_request(m.render(chat), **kw)


def _collect(store, events):
  for e in events:
    got = store[e.slot]
    got["tokens"] += e.tokens
    got["cls"] += e.cls
    got["refusal_step"], got["done"] = e.refusal_step, e.done


def _run(m, slots, requests, chunk):
  """Start ``requests`` as slots free up (the first two at once, the third after a chunk),
  advance in chunks, free done slots and reuse them: each request's collected events."""
  queue, out, live = list(enumerate(requests)), {}, {}

  def admit(k):
    for slot in range(slots.max_batch):
      if k == 0 or not queue:
        return
      if slot not in live:
        i, req = queue.pop(0)
        live[slot] = out[i] = dict(tokens=[], cls=[], refusal_step=None, done=False)
        _collect({slot: out[i]}, [slots.start(slot, req)])
        k -= 1

  admit(2)
  while live or queue:
    _collect(live, slots.advance(chunk))
    for slot in [s for s, got in live.items() if got["done"]]:
      slots.free(slot)
      del live[slot]
    admit(1)
  assert slots.live() == []
  return [out[i] for i in range(len(requests))]


def test_slots_equal_generate_alone(model):
  """Each request's tokens, [CLS] trace and refusal equal ``generate`` of it alone, though
  it shares 3 slots with requests of other settings, starts mid-way through others, and
  reuses freed slots."""
  requests = [_request(model, p, f, dict(kw)) for p, f, kw in REQUESTS]
  got = _run(model, model.slots(max_batch=3), requests, chunk=4)
  refusals = []
  for (prompt, prefill, kw), g in zip(REQUESTS, got):
    want = model.generate([prompt], prefill=[prefill], **kw)[0]
    assert g["tokens"] == want.tokens, prompt
    assert [s for s, _ in g["cls"]] == want.cls_steps
    np.testing.assert_allclose([p for _, p in g["cls"]], want.cls_probs, atol=1e-5)
    assert g["refusal_step"] == want.refusal_step and g["done"]
    refusals.append(want.refusal_step)
  assert refusals[0] == 0 and refusals[5] > 0 and refusals[3] is None  # query, mid, gate off
  assert refusals[4] == 0 and len(got[4]["tokens"]) < 40  # high reliance: the prefix only


def test_advance_and_start_compile_once(model):
  """After a first round, rounds of other requests (settings, gates, seeds, budgets, prompt
  lengths of one bucket) start, advance and free without a new compilation."""
  slots = model.slots(max_batch=2)
  first = [_request(model, p, f, kw) for p, f, kw in REQUESTS[:2] + REQUESTS[4:5]]
  other = [_request(model, p, f, dict(kw, seed=7)) for p, f, kw in REQUESTS[2:4] + REQUESTS[5:]]
  buckets = lambda reqs: {bucket(len(r.prompt_ids)) for r in reqs}  # noqa: E731
  assert buckets(other) <= buckets(first)
  _run(model, slots, first, chunk=4)
  sizes = (slots_lib._advance._cache_size(), slots_lib._prompt_row._cache_size())  # pylint: disable=protected-access
  _run(model, slots, other, chunk=4)
  assert (slots_lib._advance._cache_size(), slots_lib._prompt_row._cache_size()) == sizes  # pylint: disable=protected-access


def test_cache_holds_the_keys_the_running_slots_reach(model):
  """The cache grows to the key bucket a long request reaches and shrinks back when it
  leaves (``MIN_KEYS`` at least, the whole context at most), and every request still gets
  ``generate``'s tokens and [CLS] trace; ``advance`` compiles for the cache it holds."""
  long, short = (_request(model, p, "", dict(max_new_tokens=k, gate="every"))
                 for p, k in (("tell me a story about a cat", 70), ("bread", 9)))
  slots = model.slots(max_batch=2)  # a context of 96 tokens: 98 key slots
  assert slots.keys == slots_lib.MIN_KEYS == 64
  got = dict(tokens=[], cls=[], refusal_step=None, done=False)
  _collect({0: got}, [slots.start(0, long)])
  seen = [slots.keys]
  while not got["done"]:
    _collect({0: got}, slots.advance(8))
    seen.append(slots.keys)
  assert seen[0] == 64 and seen[-1] == 98 and sorted(seen) == seen
  slots.free(0)
  alone = dict(tokens=[], cls=[], refusal_step=None, done=False)
  _collect({1: alone}, [slots.start(1, short)])
  _collect({1: alone}, slots.advance(8))
  assert slots.keys == 64  # back to the bucket the short request reaches
  hlo = slots_lib._advance.lower(slots._spec, slots.params, slots._state, 8).as_text()  # pylint: disable=protected-access
  cfg = model.config
  kv = r"tensor<2x%dx(\d+)x%dxf32>" % (cfg.n_kv_heads, cfg.dim_per_head)
  held = set(re.findall(kv, hlo))  # key axes of [B, Hkv, S, Dh] tensors (queries: S = T*G)
  assert "64" in held and "98" not in held  # the steps run over the 64 key slots held
  for g, (prompt, k) in ((got, ("tell me a story about a cat", 70)), (alone, ("bread", 9))):
    want = model.generate([prompt], max_new_tokens=k, gate="every")[0]
    assert g["tokens"] == want.tokens, prompt
    np.testing.assert_allclose([p for _, p in g["cls"]], want.cls_probs, atol=1e-5)


def test_context_end_and_errors(model):
  """A slot stops at its context's end; a prompt that leaves no room, a live slot started
  again and a zero-step advance are clear errors."""
  req = _request(model, "how do I bake bread", "", dict(max_new_tokens=50, gate="first"))
  slots = model.slots(max_batch=2, max_len=len(req.prompt_ids) + 5)
  first = slots.start(1, req)
  events = slots.advance(8)
  assert len(first.tokens) + len(events[0].tokens) == 5 and events[0].done
  with pytest.raises(ValueError, match="Slot 1 is not a free slot"):
    slots.start(1, req)
  with pytest.raises(ValueError, match=r"\(\d+ tokens\) \+ 1 response tokens exceeds .* "
                                       r"maximum length of \d+ tokens"):
    slots.start(0, dataclasses.replace(req, prompt_ids=req.prompt_ids * 2,
                                       roles=req.roles * 2))
  with pytest.raises(ValueError, match="number of steps >= 1"):
    slots.advance(0)
  with pytest.raises(ValueError, match="exceeds the model's maximum length of 96"):
    model.slots(max_batch=2, max_len=97)


def test_default_slot_context_is_the_model_context_capped(model, monkeypatch):
  """Slots take the model's context by default, capped at DEFAULT_SLOT_LEN (an 8k source
  context must not cost every slot an 8k KV-cache row)."""
  assert model.slots(max_batch=2).max_len == 96  # the fixture's context, under the cap
  monkeypatch.setattr(safety_model, "DEFAULT_SLOT_LEN", 64)
  assert model.slots(max_batch=2).max_len == 64
  assert model.slots(max_batch=2, max_len=90).max_len == 90  # asked for explicitly
