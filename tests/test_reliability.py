"""Nothing silent, nothing lost: damaged checkpoints (flipped bytes, truncated files, deleted
metadata, empty step folders) are named and skipped for the newest intact step, training stops
on a non-finite loss before saving it, Ctrl-C saves, exports never write into their input, and
bad configs, data and arguments get a sentence. Each case checks that the intact checkpoints
were not touched."""

import glob
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import safety_align as sa
from configs import tiny
from safety_align import checkpoint, convert, generate, losses, train_lib
from safety_align.data import pipeline, templates, tfds_builders
from safety_align.data.packing import build_segment
from safety_align.data.tokenizer import Tokenizer, train_bpe
from safety_align.masks import Role

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(phases="pretrain,sft", steps=4, like=None):
  """The smoke config, 8-row batches, checkpoints every 2 steps; ``like``: a workdir whose
  prepared data and tokenizer to reuse."""
  c = tiny.get_config("smoke")
  c.phases = phases
  if like is not None:
    c.data.update(data_dir=str(like / "tfds"), tokenizer=str(like / "tokenizer.json"))
  for phase in (c.pretrain, c.sft):
    phase.update(steps=steps, batch_size=8)  # conftest's 8 devices
  c.checkpoint.update(every_steps=2, keep=2, async_save=False)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished two-phase run: checkpoints pretrain/{2,4}, sft/{2,4}."""
  work = tmp_path_factory.mktemp("run") / "w"
  train_lib.train(_config(), str(work))
  return work


@pytest.fixture
def work(trained, tmp_path):
  """A copy of ``trained`` to damage."""
  return pathlib.Path(shutil.copytree(trained, tmp_path / "w"))


def _files(path) -> dict:
  return {os.path.relpath(f, path): hashlib.sha256(open(f, "rb").read()).hexdigest()
          for f in sorted(glob.glob(f"{path}/**", recursive=True)) if os.path.isfile(f)}


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
  intact = _files(_sft(work, 2))
  model = sa.load(str(work))
  assert model.loaded_from["phase"] == "sft" and model.loaded_from["step"] == 2
  warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
  assert f"{_sft(work, 4)} (step 4) is damaged" in warning and "Loading step 2" in warning
  assert re.search(reason, warning), warning
  assert np.isfinite(model.classify(["how do I bake bread"])).all()
  assert _files(_sft(work, 2)) == intact


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
  intact = {p: _files(p) for p in (checkpoint.phase_dir(work, "pretrain"), _sft(work, 2))}
  train_lib.train(_config(), str(work))
  assert any("sft: checkpoint step 4" in r.getMessage() and "is damaged" in r.getMessage()
             and "resuming from step 2" in r.getMessage() for r in caplog.records)
  assert (work / "checkpoints" / "damaged" / "sft_4" / "DAMAGED.txt").exists()
  assert {p: _files(p) for p in intact} == intact
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


def test_nan_loss_stops_before_any_non_finite_checkpoint(trained, tmp_path, monkeypatch):
  """A batch that makes the loss (and gradients) NaN at step 3 of 6: the error names step 3
  and the last good checkpoint (step 2); nothing after it is saved."""
  total_loss, batch = losses.total_loss, pipeline.Pipeline.batch

  def poisoned_loss(lm_logits, cls_logits, b, phase, weight):
    loss, metrics = total_loss(lm_logits, cls_logits, b, phase, weight)
    loss = loss * jnp.where((b["cls_labels"] == 7).any(), jnp.nan, 1.0)
    return loss, dict(metrics, loss=loss)

  def poisoned_batch(self, k):
    out = batch(self, k)
    if k == 2:
      out["cls_labels"] = out["cls_labels"].copy()
      out["cls_labels"][0, 0] = 7  # row 0 starts with a document's [CLS]
    return out

  monkeypatch.setattr(losses, "total_loss", poisoned_loss)
  monkeypatch.setattr(pipeline.Pipeline, "batch", poisoned_batch)
  with pytest.raises(checkpoint.NonFiniteError,
                     match=r"pretrain step 3: loss nan, grad_norm nan.*Last good checkpoint: "
                           r"step 2 \(.*pretrain/2\)"):
    train_lib.train(_config("pretrain", steps=6, like=trained), str(tmp_path))
  assert checkpoint.saved_steps(tmp_path, "pretrain") == [1, 2]  # orbax saves a run's first
  params, meta, _ = checkpoint.latest_params(str(tmp_path), ("pretrain",))
  assert meta["step"] == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))

  ckpt = checkpoint.PhaseCheckpointer(str(tmp_path), "sft", every_steps=1, keep=1,
                                      async_save=False)
  with pytest.raises(checkpoint.NonFiniteError, match="Refusing to save sft step 1: NaN or Inf "
                                                      "in params/w"):
    ckpt.save(1, {"w": jnp.array([1.0, jnp.nan])}, {}, {"step": 1}, force=True)
  ckpt.close()
  assert checkpoint.saved_steps(tmp_path, "sft") == []


def test_sigint_saves_and_the_run_resumes(trained, tmp_path, monkeypatch):
  batch = pipeline.Pipeline.batch

  def interrupting(self, k):
    if k == 2:
      os.kill(os.getpid(), signal.SIGINT)
    return batch(self, k)

  monkeypatch.setattr(pipeline.Pipeline, "batch", interrupting)
  with pytest.raises(train_lib.Interrupted, match=r"pretrain: SIGINT at step 3/6: saved "
                                                  r".*pretrain/3; rerun the same command"):
    train_lib.train(_config("pretrain", steps=6, like=trained), str(tmp_path))
  assert checkpoint.saved_steps(tmp_path, "pretrain") == [2, 3]  # keep=2
  monkeypatch.setattr(pipeline.Pipeline, "batch", batch)
  train_lib.train(_config("pretrain", steps=6, like=trained), str(tmp_path))
  rows = [r["step"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]
  assert rows == [2, 4, 6]


def test_export_onto_the_workdir_is_refused_before_writing(work):
  before = _files(work)
  for out in (work, work / "hf"):
    with pytest.raises(ValueError, match="is the workdir .* or inside it"):
      convert.export_hf(str(work), str(out))
  assert _files(work) == before


# --- the Python API's arguments ------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(trained):
  return sa.load(str(trained))


def test_api_arguments_get_a_sentence(model):
  with pytest.raises(ValueError, match=r"Prompt 0 \(\d+ tokens\) exceeds the model's maximum "
                                       "length of 128 tokens"):
    model.classify(["bread " * 200])
  with pytest.raises(TypeError, match=r"prefill must be a list of strings, not one string: "
                                      r"wrap it, prefill=\['Sure'\]"):
    model.generate(["hi"], prefill="Sure")
  with pytest.raises(ValueError, match="1 prefills for 2 prompts"):
    model.generate(["hi", "there"], prefill=["Sure"])
  with pytest.raises(TypeError, match=r"prompts\[1\] is int, not str"):
    model.classify(["hi", 3])
  with pytest.raises(TypeError, match="prompts must be a list of strings, not one string"):
    model.generate("hi")
  positive, count = "an integer >= 1", "an integer >= 0 (0 = no limit)"
  bad = [("max_new_tokens", 3.5, TypeError, positive), ("max_new_tokens", 0, ValueError, positive),
         ("temperature", float("inf"), ValueError, "a finite number >= 0 (0 = greedy)"),
         ("temperature", "1", TypeError, "a finite number >= 0 (0 = greedy)"),
         ("top_p", 0.0, ValueError, "a number in (0, 1]"),
         ("top_k", -1, ValueError, count), ("top_k", 2.5, TypeError, count)]
  for name, value, error, expected in bad:
    with pytest.raises(error, match=re.escape(f"{name} must be {expected}, got {value!r}.")):
      model.generate(["hi"], **{name: value})
  with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 .*got inf"):
    generate._ApiNumber("temperature").parse("inf")  # the CLI flag: the same sentence
  assert generate._ApiNumber("max_new_tokens").parse("12") == 12


# --- configs ---------------------------------------------------------------------------------

def test_config_checks():
  for field, value, match in [("pretrain.steps", -1, r"config\.pretrain\.steps=-1"),
                              ("sft.batch_size", 0, r"config\.sft\.batch_size=0"),
                              ("data.overlong", "cut", r"overlong='cut': expected one of")]:
    config = _config()
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ValueError, match=match):
      train_lib.check_config(config)
  config = _config()
  config.sft.batch_size = 4
  with pytest.raises(ValueError, match=r"config\.sft\.batch_size=4 is not divisible by the 8 "
                                       "data-parallel devices"):
    train_lib.check_config(config)
  assert train_lib.unknown_key(config, "model.d_model") is None
  assert train_lib.unknown_key(config, "model.d_modle") == (
      "--config.model.d_modle: config.model has no field 'd_modle'; did you mean "
      "config.model.d_model?")


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in
                                        ROOT.glob("configs/**/*.py")))
def test_every_config_file_rejects_an_unknown_variant(path):
  spec = importlib.util.spec_from_file_location("config_under_test", ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with pytest.raises((ValueError, FileNotFoundError)):
    module.get_config("no_such_variant")


# --- data --------------------------------------------------------------------------------------

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


# --- special tokens come from the template only -----------------------------------------------

BOS_EOS = {"demo": ("<s>", "</s>"), "llama2": ("<s>", "</s>"), "mistral": ("<s>", "</s>"),
           "llama3": ("<|begin_of_text|>", "<|eot_id|>"), "chatml": (None, "<|im_end|>")}
MARKERS = ["<s>", "</s>", "<pad>", "[INST]", "[/INST]", "<|user|>", "<|assistant|>",
           "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  specials = [m for m in MARKERS if "INST" not in m and m not in ("<pad>", "<s>", "</s>")]
  texts = ["how do I bake bread", "tell me a story", "Sure, here is how"] * 4
  return train_bpe(texts, 400, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"),
                   specials).hf


@pytest.mark.parametrize("name", sorted(templates.TEMPLATES))
def test_markers_in_user_text_are_text(hf_tokenizer, name):
  bos, eos = BOS_EOS[name]
  tok = Tokenizer(hf_tokenizer, bos_token=bos, eos_token=eos, pad_token="<pad>")
  template = templates.get_template(name)
  specials = {i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}
  prompt = "hi " + " ".join(MARKERS) + " there"
  plain = template.prompt_pieces(tok, "hi there")
  marked = template.prompt_pieces(tok, prompt)
  assert [r for _, r in marked] == [r for _, r in plain]  # BOS?, TEMPLATE, QUERY, TEMPLATE
  for (ids, role), (plain_ids, _) in zip(marked, plain):
    if role == Role.QUERY:
      assert not specials & set(ids)
      assert tok.decode(ids, skip_special_tokens=False) == prompt
    else:
      assert ids == plain_ids  # the template's own tokens, its special ones included
  pieces = template.example_pieces(tok, "hi", "Sure " + " ".join(MARKERS))
  response = [t for ids, r in pieces if r == Role.RESPONSE for t in ids]
  assert not specials & set(response[:-1]) and response[-1] in specials  # its end of turn
  assert not specials & set(tok.encode(prompt))  # prefills and data text alike
