"""The terminal shows the project's own lines; libraries' INFO records only with --verbosity."""

import logging as py_logging
import os

from absl import logging
import pytest

from safety_align import console


def _record(pathname: str, level: int) -> py_logging.LogRecord:
  return py_logging.LogRecord("absl", level, pathname, 1, "message", (), None)


@pytest.fixture
def restore_handler():
  handler = logging.get_absl_handler()
  filters, formatter = list(handler.filters), handler.formatter
  yield handler
  handler.filters[:] = filters
  handler.setFormatter(formatter)


def test_library_info_is_dropped_and_warnings_kept(restore_handler):
  console.configure(0)
  own = os.path.join(os.path.dirname(console.__file__), "data", "response_cache.py")
  library = os.path.join(os.path.dirname(py_logging.__file__), "..", "site-packages",
                         "orbax", "checkpoint", "checkpoint_manager.py")
  assert restore_handler.filter(_record(own, py_logging.INFO))
  assert not restore_handler.filter(_record(library, py_logging.INFO))
  assert restore_handler.filter(_record(library, py_logging.WARNING))
  line = restore_handler.format(_record(own, py_logging.INFO))
  assert line.endswith(" message") and len(line) == len("12:34:56 message")


def test_verbosity_one_brings_library_info_back(restore_handler):
  console.configure(0)
  console.configure(1)
  library = "/usr/lib/python3/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert restore_handler.filter(_record(library, py_logging.INFO))
  assert not any(isinstance(f, console.ProjectOnly) for f in restore_handler.filters)


def test_stage_prints_one_line_with_its_time(capsys):
  with console.stage("import", prefix="[demo] "):
    pass
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 1 and out[0].startswith("[demo] import: ") and out[0].endswith(" s")


def test_library_quiet_drops_library_prints_and_warnings_only_inside(restore_handler, capsys):
  console.configure(0)
  own = os.path.join(os.path.dirname(console.__file__), "data", "package_data.py")
  library = "/usr/lib/python3/site-packages/tensorflow_datasets/core/dataset_builder.py"
  with console.library_quiet():
    print("Downloading and preparing dataset")
    assert not restore_handler.filter(_record(library, py_logging.WARNING))
    assert restore_handler.filter(_record(library, py_logging.ERROR))
    assert restore_handler.filter(_record(own, py_logging.WARNING))
  print("after")
  assert capsys.readouterr().out == "after\n"
  assert restore_handler.filter(_record(library, py_logging.WARNING))


def test_tfds_custom_config_notice_is_dropped_by_default(restore_handler):
  console.configure(0)
  library = "/usr/lib/python3/site-packages/tensorflow_datasets/core/dataset_builder.py"
  notice = _record(library, py_logging.WARNING)
  notice.msg = "Using custom data configuration: %s"
  assert not restore_handler.filter(notice)


def test_say_prints_a_line_under_an_active_bar(capsys):
  bar = console.progress(total=3, desc="work")
  bar.update(1)
  console.say("a result line")
  bar.close()
  out = capsys.readouterr()
  assert out.out == "a result line\n"
  assert "work" in out.err
