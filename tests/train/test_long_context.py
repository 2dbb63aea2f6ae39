"""A trained model serves the context its source supports (the import's
``max_position_embeddings``), not its training rows' ``data.seq_len``; long SFT examples train
in long rows on a share of the steps; an old workdir without a recorded context falls back to
``seq_len`` with a warning that says how to fix it."""

import dataclasses
import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest

import safety_align as sa
from conftest import chat_segment, tiny_model_config, tiny_params, tiny_tokenizer
from configs import tiny
from safety_align import api, calls, checkpoint, training_loop, workdir
from safety_align.data import pipeline
from safety_align.masks import Role

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONTEXT = 256  # the source's max_position_embeddings
SEQ_LEN = 32  # the training rows
WORDS = "how do I bake bread pick a lock tell me a story about the cat dog sky sea".split()


def _finetune_config(import_dir: str):
  spec = importlib.util.spec_from_file_location("finetune_imported",
                                                ROOT / "configs" / "finetune_imported.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(import_dir)


def _long_prompt(n_words: int) -> str:
  return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """An import directory (as ``convert.import_hf`` writes one): a tiny random model whose
  source config says ``max_position_embeddings`` = ``CONTEXT``."""
  out = tmp_path_factory.mktemp("import")
  tok = tiny_tokenizer([" ".join(WORDS)] * 8, 300, out / "tokenizer.json")
  cfg = tiny_model_config(vocab_size=320)
  params = tiny_params(cfg)
  model = dataclasses.asdict(cfg)
  checkpoint.save_params(str(out), "import", params, dict(step=0, phase="import", model=model))
  (out / "config.json").write_text(json.dumps(dict(
      model=model, chat_template="demo", hf_config=dict(max_position_embeddings=CONTEXT))))
  return out, tok


@pytest.fixture(scope="module")
def trained(source, tmp_path_factory):
  """``configs/finetune_imported.py`` over ``source`` for 2 steps of ``SEQ_LEN``-token rows,
  long rows (128 tokens) on half of them."""
  import_dir, tok = source
  data = tmp_path_factory.mktemp("data")
  records = [dict(prompt=w, response="ok", label=i % 2) for i, w in enumerate(WORDS[:8])]
  records += [dict(prompt=_long_prompt(40), response="no", label=1),
              dict(prompt=_long_prompt(41), response="ok", label=0)]
  (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  c = _finetune_config(str(import_dir))
  c.data.update(data_dir=str(data), seq_len=SEQ_LEN, long_seq_len=128, long_share=0.5)
  c.mesh.update(data=-1, fsdp=1)
  c.sft.update(steps=2, batch_size=8, grad_accum=1, warmup_steps=1)
  c.checkpoint.update(every_steps=2, async_save=False)
  work = tmp_path_factory.mktemp("run") / "w"
  training_loop.train(c, str(work))
  return work, tok


def test_finetune_config_records_the_source_context(source):
  assert _finetune_config(str(source[0])).context_length == CONTEXT


def test_trained_model_serves_its_source_context(trained):
  """Trained on 32-token rows, served at the source's 256: a prompt three times the training
  length classifies and generates as with no limit at all; one past 256 is an error naming
  both lengths."""
  work, tok = trained
  model = sa.load(str(work))
  assert model.max_length == CONTEXT
  prompt = _long_prompt(100)
  n = sum(len(ids) for ids, _ in model.template.prompt_pieces(tok, prompt))
  assert 2 * SEQ_LEN < n < CONTEXT - 16
  unlimited = api.SafetyModel(model.config, model.params, tok, model.template, max_length=None)
  p = model.classify([prompt, "bake bread"])
  np.testing.assert_allclose(p, unlimited.classify([prompt, "bake bread"]), atol=1e-6)
  gen = model.generate([prompt], max_new_tokens=8, gate="every")[0]
  assert gen.cls_steps[0] == 0 and abs(gen.cls_probs[0] - p[0]) < 1e-5
  assert gen.tokens == unlimited.generate([prompt], max_new_tokens=8, gate="every")[0].tokens
  with pytest.raises(ValueError, match=rf"Prompt 0 \(\d+ tokens\).*maximum length of {CONTEXT}"):
    model.classify([_long_prompt(200)])


def test_training_took_a_long_step(trained):
  """The fixture's run took a short step (8 rows of 32 tokens) and a long one (8 rows of 128:
  the two long examples) and finished; its config records the context and the long rows."""
  work, _ = trained
  saved = workdir.read_config(str(work))
  assert saved["context_length"] == CONTEXT
  assert saved["data"]["long_seq_len"] == 128 and saved["data"]["long_share"] == 0.5
  logged = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged if r.get("phase") == "sft"][-1] == 2


def test_old_workdir_falls_back_to_seq_len_with_a_fix(trained, tmp_path, caplog):
  """A workdir written before context_length was recorded serves data.seq_len and says how
  to fix it; a model trained from scratch serves its seq_len silently."""
  work, _ = trained
  old = tmp_path / "old"
  shutil.copytree(work, old)
  cfg = json.loads((old / "config.json").read_text())
  del cfg["context_length"]
  (old / "config.json").write_text(json.dumps(cfg))
  model = sa.load(str(old))
  assert model.max_length == SEQ_LEN
  warning = next(r.getMessage() for r in caplog.records if "context_length" in r.getMessage())
  assert f"data.seq_len={SEQ_LEN}" in warning and str(old / "config.json") in warning
  assert "max_position_embeddings" in warning and cfg["init_from"] in warning
  caplog.clear()
  assert api._max_length(dict(data=dict(seq_len=64)), "scratch") == 64
  assert api._max_length(dict(hf_config=dict(max_position_embeddings=8192)), "imp") == 8192
  assert not caplog.records


def test_long_prompts_go_in_smaller_decoder_calls():
  """Short prompts keep whole batches; long ones are split so rows x length^2 stays within a
  batch of ``SHORT_TOKENS``-token rows, in order, every row once."""
  assert [len(r) for r in calls.chunks(np.full(70, 100), 32)] == [32, 32, 6]
  lengths = np.array([100] * 4 + [2000] * 5 + [100] * 3)
  chunks = calls.chunks(lengths, 32)
  assert [i for rows in chunks for i in rows] == list(range(12))
  assert [len(r) for r in chunks] == [4, 2, 2, 2, 2]
  for rows in chunks:
    longest = max(calls.bucket(int(lengths[i])) for i in rows)
    assert len(rows) * longest ** 2 <= 32 * calls.SHORT_TOKENS ** 2


# ------------------------------------------------------------------------------ long rows
def _long_rows_config(tmp_path, records, **data):
  src = tmp_path / "src"
  src.mkdir(exist_ok=True)
  (src / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  c = tiny.get_config("smoke")
  c.data.update(source="jsonl", data_dir=str(src), seq_len=48, **data)
  c.mesh.update(data=1, fsdp=1, tensor=-1)
  c.sft.update(replay=0.0, recovery=0.0, batch_size=4, grad_accum=2,
               window_augmentation=False)
  return c


@pytest.fixture(scope="module")
def demo_tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  return tiny_tokenizer([" ".join(WORDS)] * 8, 300, path)


RECORDS = ([dict(prompt=w, response="ok", label=0) for w in WORDS[:12]]
           + [dict(prompt=_long_prompt(40 + i), response="no", label=1) for i in range(3)])


def test_long_rows_take_their_share_of_steps(tmp_path, demo_tok):
  """With long_seq_len, the examples too long for seq_len (dropped otherwise) fill rows of
  long_seq_len on every fourth step (long_share 0.25), both micro-batches of that step alike;
  the other steps keep [4, 48] rows of the short examples only."""
  c = _long_rows_config(tmp_path, RECORDS, long_seq_len=160, long_share=0.25)
  mixed = pipeline.make_pipeline(c, "sft", demo_tok, 300, str(tmp_path))
  assert isinstance(mixed, pipeline.MixedPipeline)
  long_queries = set()
  for step in range(8):
    for j in range(2):
      b = mixed.batch(2 * step + j)
      query = b["roles"] == Role.QUERY
      if step in (3, 7):
        assert b["tokens"].shape == (1, 160)  # 4 * 48 // 160 rows, at least one
        long_queries.add(int(query.sum()))
      else:
        assert b["tokens"].shape == (4, 48) and query.sum(1).max() < 48
  assert min(long_queries) > 48  # a whole long query in one row
  off = pipeline.make_pipeline(_long_rows_config(tmp_path, RECORDS), "sft", demo_tok, 300,
                               str(tmp_path))
  assert isinstance(off, pipeline.Pipeline) and len(off.segments) == 12  # long ones dropped


@pytest.mark.parametrize("data, error", [
    (dict(long_seq_len=40, long_share=0.5), "must exceed data.seq_len=48"),
    (dict(long_seq_len=96, long_share=0.0), "long_share=0.0"),
])
def test_long_rows_settings_are_checked(tmp_path, demo_tok, data, error):
  c = _long_rows_config(tmp_path, RECORDS, **data)
  with pytest.raises(ValueError, match=error):
    pipeline.make_pipeline(c, "sft", demo_tok, 300, str(tmp_path))


def test_long_rows_without_long_examples_is_an_error(tmp_path, demo_tok):
  c = _long_rows_config(tmp_path, RECORDS[:12], long_seq_len=160, long_share=0.25)
  with pytest.raises(ValueError, match="no SFT example is longer than data.seq_len=48"):
    pipeline.make_pipeline(c, "sft", demo_tok, 300, str(tmp_path))


def test_mixed_pipeline_is_a_pure_function_of_the_step():
  short = pipeline.Pipeline([chat_segment()] * 10, 2, 24, seed=0)
  long = pipeline.Pipeline([chat_segment(query=tuple(range(10, 40)))] * 3, 1, 64, seed=0)
  a = pipeline.MixedPipeline(short, long, 0.3, grad_accum=1)
  b = pipeline.MixedPipeline(short, long, 0.3, grad_accum=1)
  shapes = [a.batch(k)["tokens"].shape for k in range(10)]
  assert sum(s == (1, 64) for s in shapes) == 3  # floor(10 * 0.3)
  for k in (9, 2, 5):
    np.testing.assert_array_equal(a.batch(k)["tokens"], b.batch(k)["tokens"])
