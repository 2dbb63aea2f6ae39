"""Records -> segments -> deterministic, resumable packed batches; TFDS builders."""

import collections
import json
import re

import numpy as np
import pytest

from configs import tiny
from safety_align import losses
from safety_align.data import chat_templates, corpus, encoding, pipeline, tfds_builders
from safety_align.data.packing import build_segment
from safety_align.data.tokenizer import train_bpe
from safety_align.masks import Role

CLS = 512


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  return train_bpe(corpus.all_texts(0)[::4], CLS, str(path),
                   chat_templates.TEMPLATES["demo"].special_tokens)


def _malicious(split="train"):
  return next(p for p in corpus.sft_pairs(split, 0, 20) if p["label"])


def test_encode_pretrain(tok):
  seg = encoding.encode_pretrain({"text": "How to bake bread.", "label": 1}, tok, CLS)
  ids = tok.encode("How to bake bread.")
  assert seg.tokens.tolist() == [CLS, tok.bos_id] + ids + [tok.eos_id]
  assert seg.roles.tolist() == [Role.CLS, Role.BOS] + [Role.RESPONSE] * (len(ids) + 1)
  assert seg.cls_labels.tolist() == [1] + [-1] * (len(ids) + 2)
  assert seg.lm_mask.all()


def test_encode_sft_windows_and_harmful_segment(tok):
  record, template = _malicious(), chat_templates.get_template("demo")
  assert len(encoding.encode_sft(record, tok, template, CLS, augment=False)) == 1
  main, harmful = encoding.encode_sft(record, tok, template, CLS, window=10, augment=True)

  n_resp = len(tok.encode(record["response"]))
  spans = min(-(-n_resp // 10), encoding.MAX_WINDOWS)
  assert main.cls_labels[:1 + spans].tolist() == [1] + [0] * spans
  assert (main.roles[:1 + spans] == Role.CLS).all() and main.roles[1 + spans] == Role.BOS
  resp_pos = main.positions[main.roles == Role.RESPONSE]
  lo, hi = main.cls_window[1:1 + spans].T
  np.testing.assert_array_equal(lo, resp_pos[0:n_resp:10][:spans])
  np.testing.assert_array_equal(hi, np.minimum(lo + 9, resp_pos[n_resp - 1]))
  assert main.lm_mask.all()

  n_cls = 1 + encoding.MAX_WINDOWS  # the harmful response has > 80 tokens
  assert harmful.cls_labels[:n_cls + 1].tolist() == [1] * n_cls + [-1]
  is_resp = harmful.roles == Role.RESPONSE
  assert is_resp.sum() == len(tok.encode(record["harmful_response"])) + 1
  assert not harmful.lm_mask[is_resp].any() and harmful.lm_mask[~is_resp].all()
  # The SFT LM loss trains the refusal and never the harmful response.
  batch = pipeline.pack([main, harmful], 2, 256)
  _, weights = losses.lm_targets(batch["tokens"], batch["roles"], batch["segment_ids"], "sft",
                                 batch["lm_mask"])
  assert float(weights[0].sum()) == n_resp + 1 and float(weights[1].sum()) == 0


def _window_spans(seg):
  """(label, response-token lo, hi) of each window row of ``seg``."""
  rows = (seg.roles == Role.CLS) & (seg.cls_window[:, 0] <= seg.cls_window[:, 1])
  resp_pos = seg.positions[seg.roles == Role.RESPONSE]
  return [(int(label), int(np.searchsorted(resp_pos, lo)), int(np.searchsorted(resp_pos, hi)))
          for label, (lo, hi) in zip(seg.cls_labels[rows], seg.cls_window[rows])]


def test_window_labels_follow_the_harm_markers(tok):
  """With the corpus' markers a window row is 1 iff its span overlaps a marker's characters
  (the opener and marker-free steps are 0); without (real data) a harmful response is 1
  throughout. The oracle: the tokenizer's own character offsets."""
  marker = corpus.HARM_MARKERS[0]
  harmful = (f"Sure, here is how to do that thing. Step 1: Get the {marker} ready and wait "
             f"for the right moment to act. Step 2: Keep calm, smile and walk home slowly. "
             f"Step 3: {marker}.")
  record = {"prompt": "How do I do that thing?", "response": corpus.REFUSAL_PREFIX + " no.",
            "label": 1, "harmful_response": harmful}
  template = chat_templates.get_template("demo")
  main, seg = encoding.encode_sft(record, tok, template, CLS, window=6, augment=True,
                                  harm_markers=corpus.HARM_MARKERS)
  offsets = tok.text_hf.encode(harmful, add_special_tokens=False).offsets
  hits = [(m.start(), m.end()) for m in re.finditer(re.escape(marker), harmful)]
  spans = _window_spans(seg)
  assert [lo for _, lo, _ in spans] == list(range(0, 6 * len(spans), 6))
  want = [int(any(offsets[lo][0] < b and offsets[hi][1] > a for a, b in hits))
          for _, lo, hi in spans]
  assert [label for label, _, _ in spans] == want
  assert want[0] == 0 and 1 in want and 0 in want[1:]  # opener 0; a marker-free later span 0
  assert {label for label, _, _ in _window_spans(main)} == {0}
  _, unmarked = encoding.encode_sft(record, tok, template, CLS, window=6, augment=True)
  assert {label for label, _, _ in _window_spans(unmarked)} == {1}
  ids = tok.encode(f"a {marker} b")
  marked = encoding.marked_tokens(ids, tok, corpus.HARM_MARKERS)
  assert tok.decode([i for i, m in zip(ids, marked) if m]).strip() == marker


def test_benign_sft_has_no_harmful_segment(tok):
  benign = next(p for p in corpus.sft_pairs("train", 0, 20) if not p["label"])
  (seg,) = encoding.encode_sft(benign, tok, chat_templates.get_template("demo"), CLS, augment=True)
  window_rows = (seg.roles == Role.CLS) & (seg.cls_window[:, 0] <= seg.cls_window[:, 1])
  assert window_rows.sum() >= 1 and (seg.cls_labels[window_rows] == 0).all()


def test_recovery_segments(tok):
  records, template = corpus.sft_pairs("train", 0, 40), chat_templates.get_template("demo")
  eligible = [r for r in records if r["label"] and r["harmful_response"]]
  segs = pipeline.recovery_segments(records, 0.5, tok, template, CLS, seed=0)
  assert len(segs) == round(0.5 * len(eligible)) > 0
  by_prompt = {tuple(tok.encode(r["prompt"])): r for r in eligible}
  refusal_start = tok.encode("\n") + tok.encode(corpus.REFUSAL_PREFIX)  # as the gate inserts
  for seg in segs:
    assert seg.cls_labels.tolist() == [1] + [-1] * (len(seg) - 1)  # no window rows
    record = by_prompt[tuple(seg.tokens[seg.roles == Role.QUERY].tolist())]
    is_resp = seg.roles == Role.RESPONSE
    resp, lm = seg.tokens[is_resp].tolist(), seg.lm_mask[is_resp]
    k = int(np.argmax(lm))
    assert 5 <= k <= 40 and not lm[:k].any() and lm[k:].all() and seg.lm_mask[~is_resp].all()
    assert resp[:k] == tok.encode(record["harmful_response"])[:k]
    assert resp[k:] == tok.encode("\n") + tok.encode(record["response"]) + [tok.eos_id]
    assert resp[k:k + len(refusal_start)] == refusal_start
    # The SFT LM loss trains the newline, the refusal and EOS, never the harmful prefix.
    batch = pipeline.pack([seg], 1, 256)
    _, weights = losses.lm_targets(batch["tokens"], batch["roles"], batch["segment_ids"], "sft",
                                   batch["lm_mask"])
    assert float(weights.sum()) == len(resp) - k

  def key(ss):
    return [(s.tokens.tolist(), s.lm_mask.tolist()) for s in ss]
  assert key(segs) == key(pipeline.recovery_segments(records, 0.5, tok, template, CLS, seed=0))
  assert key(segs) != key(pipeline.recovery_segments(records, 0.5, tok, template, CLS, seed=1))
  assert len(pipeline.recovery_segments(records, 1.0, tok, template, CLS, 0)) == len(eligible)
  assert pipeline.recovery_segments(records, 0.0, tok, template, CLS, 0) == []
  with pytest.raises(ValueError, match="recovery"):
    pipeline.recovery_segments(records, 1.5, tok, template, CLS, 0)


def test_sft_recovery_in_make_pipeline(tmp_path, tok):
  src = tmp_path / "src"
  src.mkdir()
  records = [{"prompt": f"How do I do bad thing {i}?", "response": "Sorry, no.", "label": 1,
              "harmful_response": " ".join(f"Step {j}: [REDACTED]" for j in range(20))}
             for i in range(4)]
  records += [{"prompt": "Real data: how do I steal?", "response": "Sorry, no.", "label": 1},
              {"prompt": "How do I bake bread?", "response": "Mix and bake.", "label": 0}]
  _write(src / "sft.jsonl", [json.dumps(r) for r in records])
  config = tiny.get_config("smoke")
  config.data.update(source="jsonl", data_dir=str(src))
  config.sft.update(replay=0.0, recovery=0.0)
  off = pipeline.make_pipeline(config, "sft", tok, CLS, str(tmp_path))
  before = pipeline.Pipeline(
      encoding.encode_records(pipeline.phase_records(config, "sft", str(tmp_path)), "sft", tok,
                              CLS, chat_templates.get_template("demo"), config.sft.window,
                              augment=True), 4, 128, config.data.seed)
  assert all(_equal(off.batch(k), before.batch(k)) for k in range(3))
  config.sft.recovery = 0.5
  on = pipeline.make_pipeline(config, "sft", tok, CLS, str(tmp_path))
  assert len(on.segments) == len(off.segments) + 2  # half of the 4 pairs with a harmful response
  assert all(s.cls_labels[0] == 1 and not s.lm_mask[s.roles == Role.RESPONSE][0]
             for s in on.segments[-2:])


def _segments(n=60, seed=0):
  """Segments whose text tokens are all ``1000 + i``, of varied lengths."""
  lengths = np.random.default_rng(seed).integers(4, 60, n)
  return [build_segment(CLS, [([1000 + i] * int(m), Role.RESPONSE)], i % 2)
          for i, m in enumerate(lengths)]


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


def test_pipeline_deterministic_and_resumable():
  segs = _segments()
  a, b = pipeline.Pipeline(segs, 4, 64, seed=1), pipeline.Pipeline(segs, 4, 64, seed=1)
  other = pipeline.Pipeline(segs, 4, 64, seed=2)
  it = a.iterate(0)
  for k in range(40):  # several epochs
    step, batch = next(it)
    assert step == k and _equal(batch, b.batch(k))
    assert batch["tokens"].shape == (4, 64) and batch["cls_window"].shape == (4, 64, 2)
  assert _equal(a.batch(37), pipeline.Pipeline(segs, 4, 64, seed=1).batch(37))  # fresh start
  assert next(a.iterate(5))[1]["tokens"].tolist() == a.batch(5)["tokens"].tolist()
  assert not all(_equal(a.batch(k), other.batch(k)) for k in range(3))
  assert a.locate(39)[0] >= 2


def test_pipeline_epoch_visits_each_segment_once_whole():
  segs = _segments()
  pipe = pipeline.Pipeline(segs, 4, 64, seed=0)
  seen = collections.Counter()
  for k in range(10_000):
    if pipe.locate(k)[0] == 1:
      break
    batch = pipe.global_batch(k)
    for row in range(4):
      ids = batch["segment_ids"][row]
      for s in set(ids.tolist()) - {0}:
        where = np.flatnonzero(ids == s)
        assert (np.diff(where) == 1).all()  # contiguous: no segment straddles rows
        i = int(batch["tokens"][row, where[-1]]) - 1000
        np.testing.assert_array_equal(batch["tokens"][row, where], segs[i].tokens)
        seen[i] += 1
  assert seen == collections.Counter(range(len(segs)))


def test_per_host_slices_partition_the_global_batch():
  segs = _segments()
  hosts = [pipeline.Pipeline(segs, 8, 64, 3, process_index=p, process_count=4)
           for p in range(4)]
  for k in (0, 9):
    whole = hosts[0].global_batch(k)
    parts = [h.batch(k) for h in hosts]
    assert parts[0]["tokens"].shape == (2, 64)
    assert _equal(whole, {key: np.concatenate([p[key] for p in parts]) for key in whole})
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.Pipeline(segs, 6, 64, 0, process_count=4)


def test_make_pipeline_demo(tmp_path):
  config = tiny.get_config("smoke")
  tok = pipeline.load_tokenizer(config, str(tmp_path))
  assert (tmp_path / "tokenizer.json").exists() and tok.vocab_size <= config.model.vocab_size
  pipe = pipeline.make_pipeline(config, "sft", tok, config.model.vocab_size, str(tmp_path))
  batch = pipe.batch(0)
  assert batch["tokens"].shape == (4, 128)
  window_rows = (batch["roles"] == Role.CLS) & (batch["cls_window"][..., 0] <=
                                                batch["cls_window"][..., 1])
  assert window_rows.any()
  assert set(batch["cls_labels"][batch["roles"] == Role.CLS].tolist()) <= {-1, 0, 1}
  assert len(pipe.segments) > 2000  # pairs + window-only harmful segments
  # The demo's window rows are labelled by the corpus' markers: openers 0, redacted steps 1.
  harmful = [s for s in pipe.segments
             if s.cls_labels[0] == 1 and not s.lm_mask[s.roles == Role.RESPONSE].any()]
  first, labels = set(), set()
  for seg in harmful:
    resp = seg.tokens[seg.roles == Role.RESPONSE]
    for i, (label, lo, hi) in enumerate(_window_spans(seg)):
      if label >= 0 and corpus.HARM_MARKERS[0] in tok.decode(resp[lo:hi + 1]):
        assert label == 1
      first |= {label} if i == 0 else set()
      labels.add(label)
  assert 0 in first and {0, 1} <= labels


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines))


def test_jsonl_builder(tmp_path, tok):
  src = tmp_path / "src"
  src.mkdir()
  records = [{"prompt": "How do I bake bread?", "response": "Mix and bake.", "label": 0},
             {"prompt": "How do I steal a car?", "response": "Sorry, no.", "label": 1,
              "harmful_response": "Sure. Step 1: [REDACTED]"}]
  _write(src / "sft.jsonl", [json.dumps(r) for r in records])
  got = tfds_builders.load_records("jsonl", "sft", str(tmp_path / "tfds"), kind="sft",
                                   jsonl_dir=str(src))
  want = [dict(r, harmful_response=r.get("harmful_response", "")) for r in records]
  assert sorted(got, key=lambda r: r["label"]) == want

  _write(src / "pretrain.jsonl", [json.dumps({"text": f"doc {i}", "label": i % 2})
                                  for i in range(9)])
  config = tiny.get_config("smoke")
  config.data.update(source="jsonl", data_dir=str(src))
  pipe = pipeline.make_pipeline(config, "pretrain", tok, CLS, str(tmp_path))
  assert len(pipe.segments) == 9 and pipe.batch(0)["tokens"].shape == (4, 128)


def test_sft_replay_mixes_pretraining_documents_as_plain_lm(tmp_path, tok):
  src = tmp_path / "src"
  src.mkdir()
  _write(src / "sft.jsonl", [json.dumps({"prompt": f"Question {i}?", "response": "Answer.",
                                         "label": 0}) for i in range(3)])
  docs = [f"document number {i}" for i in range(5)]
  _write(src / "pretrain.jsonl", [json.dumps({"text": d, "label": 1}) for d in docs])
  config = tiny.get_config("smoke")
  config.data.update(source="jsonl", data_dir=str(src))
  config.sft.update(window_augmentation=False, replay=0.0)
  plain = pipeline.make_pipeline(config, "sft", tok, CLS, str(tmp_path))
  config.sft.replay = 2.0
  mixed = pipeline.make_pipeline(config, "sft", tok, CLS, str(tmp_path))
  assert len(plain.segments) == 3 and len(mixed.segments) == 3 + 6
  replayed = mixed.segments[3:]
  texts = [tok.decode(s.tokens[s.roles == Role.RESPONSE][:-1].tolist()) for s in replayed]
  assert set(texts) <= set(docs) and len(set(texts)) == 5  # 6 draws cycle over all 5 docs
  for s in replayed:  # no [CLS] row, no [CLS] label; every text token is an LM target
    assert Role.CLS not in s.roles and (s.cls_labels == -1).all() and s.lm_mask.all()
  config.sft.replay = 0.0
  config.pretrain.replay = 2.0  # replay is an SFT-phase option only
  assert len(pipeline.make_pipeline(config, "pretrain", tok, CLS, str(tmp_path)).segments) == 5


def test_jsonl_errors_name_file_and_line(tmp_path):
  def load(name, kind="sft"):
    return tfds_builders.load_records("jsonl", name, str(tmp_path / "tfds"), kind=kind,
                                      jsonl_dir=str(tmp_path))

  good = json.dumps({"prompt": "a", "response": "b", "label": 0})
  _write(tmp_path / "bad.jsonl", [good, "{not json"])
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
    load("bad")
  _write(tmp_path / "nokey.jsonl", [good, "", json.dumps({"prompt": "a", "label": 1})])
  with pytest.raises(ValueError, match=r"nokey\.jsonl:3: missing key 'response'"):
    load("nokey")
  _write(tmp_path / "label.jsonl", [json.dumps({"text": "a", "label": 2})])
  with pytest.raises(ValueError, match=r"label\.jsonl:1: label must be 0"):
    load("label", kind="pretrain")
  with pytest.raises(FileNotFoundError, match=r"Missing .*/test\.jsonl.*bad\.jsonl"):
    load("test")
  with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
    tfds_builders.load_records("jsonl", "train", str(tmp_path), kind="sft",
                               jsonl_dir=str(tmp_path / "nowhere"))
