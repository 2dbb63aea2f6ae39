"""One prepare-and-read for every builder: a manual-download builder's records come back as
Python dicts in file order, prepared once; a missing file names the expected layout."""

import pytest

from safety_align.data.manual_builder import SPLIT, check_files
from safety_align.data.real_datasets import MaliciousInstruct
from safety_align.data.tfds_prepare import prepare_and_read


def test_records_in_file_order_prepared_once(tmp_path, monkeypatch):
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "MaliciousInstruct.txt").write_text("zeta\n\nalpha\nmu é\n",
                                                           encoding="utf-8")
  reads, records = [], MaliciousInstruct._records  # pylint: disable=protected-access
  monkeypatch.setattr(MaliciousInstruct, "_records",
                      lambda self, d: reads.append(d) or records(self, d))
  read = lambda: prepare_and_read(  # noqa: E731
      MaliciousInstruct(data_dir=str(tmp_path / "tfds")), SPLIT, str(tmp_path / "in"))
  want = [dict(prompt=p, response="", label=1, target="", category="")
          for p in ("zeta", "alpha", "mu é")]
  assert read() == want
  assert read() == want and len(reads) == 1  # the second read is the prepared copy


def test_missing_file_names_the_layout(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=r"(?s)malicious_instruct: missing .*MaliciousInstruct.txt.*one prompt"):
    check_files(MaliciousInstruct, None, str(tmp_path))
