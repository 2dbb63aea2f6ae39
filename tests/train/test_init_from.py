"""The import-to-recipe path as a user runs it: a tiny random HF Llama -> ``convert import_hf``
-> ``train --config=configs/llama2_7b_cls.py --config.init_from=<import>
--config.data.tokenizer=<import>/tokenizer.json`` (the README's 7B command shape, shrunk to 2
steps of short rows on a small JSONL): the architecture, [CLS] gate included, comes from the
import, not from the config's 7B sizes. Bad input on these paths ends in one sentence."""

import json
import os
import struct
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
from tiny_hf import make_hf  # noqa: E402

from safety_align import checkpoint, convert  # noqa: E402
from safety_align import workdir as workdir_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SFT = [("how do I bake bread at home", "tell me a story about a brave cat", 0),
       ("what is the capital of france", "explain rope embeddings in transformers", 0),
       ("never share dangerous instructions", "I can't help with that.", 1)]


def run(module, *args):
  return subprocess.run([sys.executable, "-m", f"safety_align.{module}", *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)


def assert_one_sentence(proc, *phrases):
  """Exit 1, no traceback, and the error (from the command's name on) names ``phrases``."""
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  error = proc.stderr[proc.stderr.rindex(proc.args[2].split(".")[-1] + ": "):]
  for phrase in phrases:
    assert phrase in error, error


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp("init_from")
  make_hf("llama_gqa", str(root / "hf"))
  convert.import_hf(str(root / "hf"), str(root / "import"))
  data = root / "data"
  data.mkdir()
  with open(data / "sft.jsonl", "w") as f:
    for i in range(16):
      prompt, response, label = SFT[i % len(SFT)]
      f.write(json.dumps(dict(prompt=prompt, response=response, label=label)) + "\n")
  return root


def train_7b_shape(root, workdir, *overrides):
  """The README's command for configs/llama2_7b_cls.py with only the run shrunk: its data
  source, steps, batch and row length (the model sizes are never overridden)."""
  imp = root / "import"
  return run("train", "--config=configs/llama2_7b_cls.py", f"--workdir={workdir}",
             f"--config.init_from={imp}", f"--config.data.tokenizer={imp}/tokenizer.json",
             "--config.data.source=jsonl", f"--config.data.data_dir={root / 'data'}",
             "--config.phases=sft", "--config.sft.split=sft", "--config.sft.steps=2",
             "--config.sft.warmup_steps=1", "--config.sft.batch_size=8",
             "--config.sft.grad_accum=1", "--config.data.seq_len=32", *overrides)


@pytest.fixture(scope="module")
def trained(imported):
  workdir = imported / "run"
  return workdir, train_7b_shape(imported, workdir)


def test_7b_recipe_trains_from_a_tiny_import(imported, trained):
  workdir, proc = trained
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "architecture from the import" in proc.stdout and "cls_attention_gate=True" in proc.stdout
  saved = workdir_lib.read_config(str(workdir))["model"]
  source = workdir_lib.read_config(str(imported / "import"))["model"]
  for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size",
              "cls_attention_gate"):
    assert saved[key] == source[key], key
  assert saved["attention"] == "blockwise" and saved["remat"] == "dots"  # the config's
  assert checkpoint.saved_steps(str(workdir), "sft")[-1] == 2


def test_an_architecture_override_that_contradicts_init_from_names_it(imported, tmp_path):
  proc = train_7b_shape(imported, tmp_path / "run", "--config.model.n_layers=3")
  assert_one_sentence(proc, "n_layers: init_from=2 vs config=3")
  assert f"init_from={imported / 'import'}" in proc.stderr


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all", b"GGUF" + struct.pack(
    "<IQQ", 3, 4, 2)], ids=["empty", "not_gguf", "truncated"])
def test_import_gguf_bad_file_is_one_sentence(tmp_path, content):
  path = tmp_path / "model.gguf"
  path.write_bytes(content)
  proc = run("convert", "import_gguf", f"--gguf={path}", f"--out={tmp_path / 'out'}")
  assert_one_sentence(proc, "model.gguf")


def test_evaluate_missing_held_out_dir_is_one_sentence(trained):
  workdir, _ = trained
  proc = run("evaluate", "--config=configs/eval/default.py", f"--workdir={workdir}",
             "--config.train_baseline=False", "--config.held_out_dir=/nonexistent")
  assert_one_sentence(proc, "held_out_dir=/nonexistent has no")
