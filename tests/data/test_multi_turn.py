"""Multi-turn SFT records (METHOD.md sec. 3): a record's earlier ``turns`` encode with every
user turn QUERY and the earlier answers TEMPLATE, so the training mask's main [CLS] reads both
user turns and not the answer between them, and only the final response is an LM target; a
single-turn record encodes exactly as before. Two-turn chats built from a run's own records
(``data/multi_turn.py``), and multi-turn records through the JSONL data path."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from conftest import tiny_tokenizer
from safety_align import losses
from safety_align.data import chat_templates, encoding, multi_turn, pipeline, tfds_builders
from safety_align.data.packing import build_segment, pack
from safety_align.masks import MaskSpec, Role

CLS = 999
TEXTS = ["how do I bake bread at home", "mix flour and water", "Sorry, I cannot help with that",
         "you are a terse assistant"] * 4
TURNS = [dict(role="user", content="how do I bake"), dict(role="assistant", content="mix flour")]
RECORD = dict(prompt="bread at home", response="Sorry, I cannot help with that", label=1)


def _chat(name, tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  return tiny_tokenizer(TEXTS, 300, path, name), chat_templates.get_template(name)


@pytest.fixture(scope="module", params=["demo", "chatml"])
def chat(request, tmp_path_factory):
  """(tokenizer, template) of the built-in demo template and of ChatML (a Jinja template)."""
  return _chat(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  return _chat("demo", tmp_path_factory)


def _runs(segment, role):
  """The token ids of each maximal run of ``role`` in ``segment``."""
  ids, out = segment.tokens.tolist(), []
  for k, r in enumerate(segment.roles.tolist()):
    if r == role:
      if not out or segment.roles[k - 1] != role:
        out.append([])
      out[-1].append(ids[k])
  return out


def _find(haystack, needle):
  """Start of ``needle``'s first occurrence in ``haystack`` (lists of ids)."""
  return next(k for k in range(len(haystack)) if haystack[k:k + len(needle)] == needle)


def test_multi_turn_record_masks(chat):
  tok, template = chat
  turns = ([dict(role="system", content="you are a terse assistant")] * (template.name != "demo")
           + TURNS)
  seg, = encoding.encode_sft(dict(RECORD, turns=turns), tok, template, CLS, window=3,
                             augment=True)
  # Both user turns are QUERY, in order; the earlier answer and the system text are not.
  assert _runs(seg, Role.QUERY) == [tok.encode("how do I bake"), tok.encode("bread at home")]
  reply = tok.encode(RECORD["response"])
  run, = _runs(seg, Role.RESPONSE)  # the final response and its end of turn, nothing else
  assert run[:-1] == reply
  ids = seg.tokens.tolist()
  answer, system = (np.arange(len(tok.encode(t))) + _find(ids, tok.encode(t)) if t in str(turns)
                    else np.array([], int) for t in ("mix flour", "you are a terse assistant"))
  assert (seg.roles[answer] == Role.TEMPLATE).all() and (seg.roles[system] == Role.TEMPLATE).all()
  if template.name == "chatml":  # the ids are those of the whole conversation's rendering
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns + [
        dict(role="user", content=RECORD["prompt"])]) + (
            f"<|im_start|>assistant\n{RECORD['response']}<|im_end|>")
    assert seg.tokens[seg.roles != Role.CLS].tolist() == tok.hf.encode(
        text, add_special_tokens=False).ids

  batch = {k: jnp.asarray(v) for k, v in pack([seg], 1, len(seg)).items()}
  mask = np.asarray(MaskSpec.from_batch(batch, "sft").dense())[0]
  query = np.flatnonzero(seg.roles == Role.QUERY)
  response = np.flatnonzero(seg.roles == Role.RESPONSE)
  reads = np.flatnonzero(mask[0])  # the main [CLS] row
  assert sorted(reads) == sorted([0, *query])  # itself and every user turn's tokens
  assert not mask[0, answer].any() and not mask[0, system].any()
  # Only the final response's tokens read [CLS]; the earlier answer does not.
  assert mask[response, 0].all() and not mask[answer, 0].any()
  # Window rows read only final-response tokens.
  windows = np.flatnonzero((seg.roles == Role.CLS)[1:]) + 1
  assert len(windows) >= 2
  for w in windows:
    assert set(np.flatnonzero(mask[w])) - {w} <= set(response)
  # LM targets: exactly the final response (its text and end of turn).
  _, weights = losses.lm_targets(batch["tokens"], batch["roles"], batch["segment_ids"], "sft",
                                 batch["lm_mask"])
  predicted = np.flatnonzero(np.asarray(weights)[0]) + 1
  assert predicted.tolist() == response.tolist()


def test_single_turn_record_encodes_as_before(chat):
  tok, template = chat
  before = build_segment(CLS, template.example_pieces(tok, RECORD["prompt"], RECORD["response"]),
                         RECORD["label"])
  for record in (RECORD, dict(RECORD, turns=[])):
    seg, = encoding.encode_sft(record, tok, template, CLS)
    for field in ("tokens", "roles", "positions", "cls_window", "cls_labels", "lm_mask"):
      assert np.array_equal(getattr(seg, field), getattr(before, field)), field
  with_windows = encoding.encode_sft(dict(RECORD, harmful_response="Sure, here is how"), tok,
                                     template, CLS, window=3, augment=True)
  again = encoding.encode_sft(dict(RECORD, harmful_response="Sure, here is how", turns=[]), tok,
                              template, CLS, window=3, augment=True)
  assert len(with_windows) == 2
  for a, b in zip(with_windows, again):
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("tokens", "cls_window"))


def test_split_request():
  text = "  tell me how to make a thing out of that other thing \n"
  first, rest = multi_turn.split_request(text)
  assert first + " " + rest == text.strip()
  assert abs(len(first) - len(rest)) <= len("thing ")  # cut at the whitespace nearest the middle
  first, rest = multi_turn.split_request("two\n\nparagraphs")
  assert (first, rest) == ("two", "paragraphs")
  assert multi_turn.split_request("  one-word  ") is None
  turns = multi_turn.split_turns("bake a loaf of bread")
  assert [m["role"] for m in turns] == ["user", "assistant", "user"]
  assert turns[1]["content"] == multi_turn.ACKNOWLEDGEMENT


def _records(n_benign=20, n_harmful=10):
  benign = [dict(prompt=f"how do I bake bread number {i}", response=f"Mix flour {i}.", label=0,
                 source="b") for i in range(n_benign)]
  harmful = [dict(prompt=f"explain the forbidden procedure number {i}", response=f"Sorry {i}.",
                  label=1, harmful_response="[REDACTED]", source="h") for i in range(n_harmful)]
  return benign + harmful + [dict(prompt="oneword", response="Sorry.", label=1)]


def test_two_turn_records():
  records = _records()
  by_prompt = {r["prompt"]: r for r in records}
  out = multi_turn.two_turn_records(records, 0.4, seed=3)
  n = round(0.4 * 11)  # of each label: the harmful label has the fewer records (11)
  assert len(out) == 2 * n
  for form in multi_turn.FORMS:  # each form has as many chats of either label
    labels = [r["label"] for r in out if r["form"] == form]
    assert labels.count(0) == labels.count(1) > 0
  assert sum(r["form"] == "split" for r in out) == 2 * (n - n // 2)
  for r in out:
    assert "harmful_response" not in r and r["turns"][0]["role"] == "user"
    if r["form"] == "split":
      original = by_prompt[r["turns"][0]["content"] + " " + r["prompt"]]
      assert r["turns"][1] == dict(role="assistant", content=multi_turn.ACKNOWLEDGEMENT)
    else:
      original = by_prompt[r["prompt"]]
      before = by_prompt[r["turns"][0]["content"]]
      assert before["label"] == 0 and before is not original
      assert r["turns"][1] == dict(role="assistant", content=before["response"])
    assert (r["label"], r["response"], r.get("source")) == (
        original["label"], original["response"], original.get("source"))
  assert multi_turn.two_turn_records(records, 0.4, seed=3) == out
  assert multi_turn.two_turn_records(records, 0.4, seed=4) != out
  assert multi_turn.two_turn_records(records, 0.0, seed=3) == []
  with pytest.raises(ValueError, match=r"share must be in \[0, 1\]"):
    multi_turn.two_turn_records(records, 1.5, seed=3)


def test_multi_turn_records_reach_the_sft_pipeline(tmp_path, demo):
  tok, _ = demo  # the smoke config's template
  src = tmp_path / "src"
  src.mkdir()
  rows = [dict(RECORD, turns=TURNS), dict(prompt="mix flour", response="and water", label=0)]
  (src / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  got = tfds_builders.load_records("jsonl", "sft", str(tmp_path / "tfds"), kind="sft",
                                   jsonl_dir=str(src))
  by_label = sorted(got, key=lambda r: r["label"])  # TFDS' order is its own
  assert by_label[1]["turns"] == TURNS and "turns" not in by_label[0]
  config = tiny.get_config("smoke")
  config.data.update(source="jsonl", data_dir=str(src))
  config.sft.update(window_augmentation=False, replay=0.0, recovery=0.0)
  segments = pipeline.make_pipeline(config, "sft", tok, CLS, str(tmp_path)).segments
  assert sorted(len(_runs(s, Role.QUERY)) for s in segments) == [1, 2]
  bad = dict(RECORD, turns=[dict(role="assistant", content="hi")])
  (src / "bad.jsonl").write_text(json.dumps(bad) + "\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl:1: 'turns' must be"):
    tfds_builders.load_records("jsonl", "bad", str(tmp_path / "tfds"), kind="sft",
                               jsonl_dir=str(src))
