"""The workdir format: ``load_for_inference`` returns a frozen, typed ``Loaded`` of what the
directory holds; an import directory serves its "import" phase."""

import dataclasses

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")
from tiny_hf import make_hf  # noqa: E402

from safety_align import workdir  # noqa: E402
from safety_align.formats.importer import import_hf  # noqa: E402


def test_loaded_import_directory(tmp_path):
  make_hf("llama_gqa", str(tmp_path / "hf"))
  cfg = import_hf(str(tmp_path / "hf"), str(tmp_path / "out"), scan_layers=False)
  path = str(tmp_path / "out")
  assert workdir.serving_phase(path) == "import"
  loaded = workdir.load_for_inference(path)
  assert loaded.model_config == cfg
  assert (loaded.phase, loaded.step) == ("import", 0)
  assert loaded.tokenizer_path == f"{path}/tokenizer.json"
  assert loaded.special_tokens["cls_id"] == cfg.cls_id == loaded.config["special_tokens"]["cls_id"]
  assert loaded.chat_template == loaded.config["chat_template"]
  assert loaded.params["embed"].shape == (cfg.vocab_size, cfg.d_model)
  with pytest.raises(dataclasses.FrozenInstanceError):
    loaded.phase = "sft"


def test_missing_checkpoint_names_the_phases(tmp_path):
  (tmp_path / "config.json").write_text('{"phases": "pretrain,sft"}')
  with pytest.raises(FileNotFoundError, match=r"checkpoints/\{pretrain,sft\}"):
    workdir.serving_phase(str(tmp_path))
