"""Bad training data gets a sentence that names the file and line (empty files, invalid UTF-8,
non-integer labels, paths outside the data directory), and over-long SFT examples follow
``data.overlong``."""

import json

import pytest

from safety_align.data import pipeline, tfds_builders
from safety_align.data.packing import build_segment
from safety_align.masks import Role


def test_data_errors_name_file_and_line(tmp_path):
  def load(name, kind="sft"):
    return tfds_builders.load_records("jsonl", name, str(tmp_path / "tfds"), kind=kind,
                                      jsonl_dir=str(tmp_path))

  (tmp_path / "empty.jsonl").write_text("\n\n")
  with pytest.raises(ValueError, match=r"empty\.jsonl has no records"):
    load("empty")
  good = json.dumps({"prompt": "a", "response": "b", "label": 0}).encode()
  (tmp_path / "latin1.jsonl").write_bytes(good + b'\n{"prompt": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=r"latin1\.jsonl:2: byte 0xe9 at column 16 is not valid "
                                       "UTF-8"):
    load("latin1")
  (tmp_path / "bool.jsonl").write_text(json.dumps({"text": "a", "label": True}) + "\n")
  with pytest.raises(ValueError, match=r"bool\.jsonl:1: label must be 0 .*got True"):
    load("bool", kind="pretrain")
  (tmp_path.parent / "outside.jsonl").write_bytes(good + b"\n")
  with pytest.raises(ValueError, match=r"Split '\.\./outside' names .* outside the data "
                                       "directory"):
    load("../outside")


def test_overlong_sft_examples_follow_the_policy():
  cls = 99
  fits = build_segment(cls, [([1], Role.BOS), ([5] * 4, Role.QUERY), ([6] * 4, Role.RESPONSE)], 1)
  long_answer = build_segment(cls, [([1], Role.BOS), ([5] * 4, Role.QUERY),
                                    ([6] * 30, Role.RESPONSE)], 1)
  long_query = build_segment(cls, [([1], Role.BOS), ([5] * 30, Role.QUERY),
                                   ([6] * 2, Role.RESPONSE)], 1)
  segments, tok = [fits, long_answer, long_query], _Tokens()
  assert pipeline.fit_examples(segments, 16, "drop", tok) == [fits]
  kept = pipeline.fit_examples(segments, 16, "truncate_response", tok)
  assert len(kept) == 2 and len(kept[1]) == 16 and (kept[1].roles == Role.QUERY).sum() == 4
  with pytest.raises(ValueError, match=r"2 of 3 SFT examples are longer than "
                                       r"config\.data\.seq_len=16 tokens \(the longest 36"):
    pipeline.fit_examples(segments, 16, "error", tok)


class _Tokens:
  def decode(self, ids):
    return " ".join(map(str, ids))
