"""Damaged checkpoints are named and skipped, never silently used or lost: flipped bytes,
truncated files, deleted metadata and empty step folders on load, a step damaged before a
resume (moved aside, the run ends like the straight one), a missing manifest, an edited
config.json, a pretraining-only workdir. Each case checks that the intact checkpoints were not
touched."""

import glob
import json
import os
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

import safety_align as sa
from conftest import file_digests, smoke_config
from safety_align import checkpoint, training_loop


@pytest.fixture
def work(trained, tmp_path):
  """A copy of conftest's ``trained`` run to damage."""
  return pathlib.Path(shutil.copytree(trained, tmp_path / "w"))


def _biggest(step_dir) -> str:
  files = [f for f in glob.glob(f"{step_dir}/params/**", recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _flip(step_dir):
  path = _biggest(step_dir)
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 2, len(data) // 2 + 400):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _truncate(step_dir):
  path = _biggest(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def _no_metadata(step_dir):
  os.remove(step_dir / "params" / "_METADATA")


def _bad_meta(step_dir):
  (step_dir / "meta" / "metadata").write_text("{not json")


DAMAGE = {"flipped": (_flip, "checksum mismatch|corrupt"),
          "truncated": (_truncate, "OUT_OF_RANGE|not valid for value"),
          "no_metadata": (_no_metadata, "params/_METADATA is missing"),
          "bad_meta": (_bad_meta, "meta is unreadable")}


def _sft(work, step=None):
  path = pathlib.Path(checkpoint.phase_dir(work, "sft"))
  return path if step is None else path / str(step)


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_load_skips_a_damaged_step_for_the_newest_intact_one(work, kind, caplog):
  damage, reason = DAMAGE[kind]
  damage(_sft(work, 4))
  intact = file_digests(_sft(work, 2))
  model = sa.load(str(work))
  assert model.loaded_from["phase"] == "sft" and model.loaded_from["step"] == 2
  warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
  assert f"{_sft(work, 4)} (step 4) is damaged" in warning and "Loading step 2" in warning
  assert re.search(reason, warning), warning
  assert np.isfinite(model.classify(["how do I bake bread"])).all()
  assert file_digests(_sft(work, 2)) == intact


def test_empty_step_folder_is_skipped(work, caplog):
  os.makedirs(_sft(work, 6))
  assert sa.load(str(work)).loaded_from["step"] == 4
  assert any("(step 6) is damaged: the step folder is empty" in r.getMessage()
             for r in caplog.records)


def test_no_intact_step_is_an_error_not_another_phase(work, caplog):
  _flip(_sft(work, 4))
  _no_metadata(_sft(work, 2))
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=r"No intact checkpoint in .*sft: step 4: .*; step 2: params/_METADATA"):
    sa.load(str(work))


def test_resume_moves_a_damaged_step_aside_and_ends_like_the_straight_run(trained, work, caplog):
  _flip(_sft(work, 4))
  intact = {p: file_digests(p) for p in (checkpoint.phase_dir(work, "pretrain"), _sft(work, 2))}
  training_loop.train(smoke_config(), str(work))
  assert any("sft: checkpoint step 4" in r.getMessage() and "is damaged" in r.getMessage()
             and "resuming from step 2" in r.getMessage() for r in caplog.records)
  assert (work / "checkpoints" / "damaged" / "sft_4" / "DAMAGED.txt").exists()
  assert {p: file_digests(p) for p in intact} == intact
  (a, _, _), (b, meta, _) = (checkpoint.latest_params(str(w), ("sft",)) for w in (trained, work))
  assert meta["step"] == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  rows = [(r["phase"], r["step"]) for r in map(json.loads, open(work / "metrics.jsonl"))]
  assert sorted(rows) == [("pretrain", 2), ("pretrain", 4), ("sft", 2), ("sft", 4)]


def test_checkpoint_without_manifest_loads_with_a_note(work, caplog):
  path = _sft(work, 4) / "meta" / "metadata"
  meta = json.loads(path.read_text())
  del meta["manifest"]
  path.write_text(json.dumps(meta))
  assert sa.load(str(work)).loaded_from["step"] == 4
  assert any("has no checksum manifest" in r.getMessage() for r in caplog.records)


def test_edited_config_json_is_named(work):
  config = json.loads((work / "config.json").read_text())
  config["model"]["d_ff"] *= 2
  (work / "config.json").write_text(json.dumps(config))
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"config\.json does not match its checkpoint: model\.d_ff=256 "
                           r"\(the parameters were saved with 128\)"):
    sa.load(str(work))


def test_load_refuses_a_pretraining_model_unless_asked(work):
  assert sa.load(str(work)).loaded_from == dict(path=str(work), phase="sft", step=4, steps=4)
  shutil.rmtree(_sft(work))
  with pytest.raises(FileNotFoundError, match=r"last phase 'sft' has no checkpoint yet.*"
                                              r"sa\.load\(path, phase='pretrain'\)"):
    sa.load(str(work))
  assert sa.load(str(work), phase="pretrain").loaded_from["phase"] == "pretrain"
