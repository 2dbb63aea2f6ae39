"""HF round trip (levanter-style): tiny random HF model -> import_hf -> logits match HF ->
export_hf -> transformers reloads it -> same logits. One case per family/variant, plus the
errors raised before any tensor is read and an export into its own workdir refused."""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from safetensors.numpy import load_file, save_file  # noqa: E402
import tokenizers  # noqa: E402

from conftest import file_digests  # noqa: E402
import safety_align as sa  # noqa: E402
from safety_align import convert, workdir  # noqa: E402
from safety_align.formats.source import CLS_FILE  # noqa: E402
from safety_align.tools import check_parity  # noqa: E402
from tiny_hf import CASES, SENTENCES, VOCAB, hf_logits, make_hf  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 16))


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip(case, tmp_path):
  hf_dir, scan_dir, flat_dir, out = (str(tmp_path / n) for n in ("hf", "scan", "flat", "out"))
  ref = hf_logits(make_hf(case, hf_dir), TOKENS)

  cfg = convert.import_hf(hf_dir, scan_dir)
  params, meta = workdir.load_for_inference(scan_dir).params, workdir.read_config(scan_dir)
  ours = sa.load(scan_dir).lm_logits(TOKENS)
  err = np.abs(ours - ref).max()
  assert err <= 1e-4 * np.abs(ref).max(), (case, err, np.abs(ref).max())
  assert meta["special_tokens"]["bos_id"] == 1 and meta["special_tokens"]["cls_id"] == VOCAB
  assert meta["family"] == case.split("_")[0]

  convert.import_hf(hf_dir, flat_dir, scan_layers=False)
  flat = sa.load(flat_dir)
  assert "layer_1" in flat.params and "layers" not in flat.params
  np.testing.assert_allclose(flat.lm_logits(TOKENS), ours,
                             atol=1e-5 * np.abs(ref).max())

  convert.export_hf(scan_dir, out)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  assert type(reloaded).__name__ == meta["hf_config"]["architectures"][0]
  np.testing.assert_allclose(hf_logits(reloaded, TOKENS), ref, atol=1e-5 * np.abs(ref).max())
  cls = load_file(os.path.join(out, CLS_FILE))
  np.testing.assert_array_equal(cls["cls_embed"], np.asarray(params["cls_embed"]))
  assert cls["cls_head.kernel"].shape == (cfg.d_model, 2)


def test_cls_init_and_reimport_of_export(tmp_path):
  hf_dir, a, out, b = (str(tmp_path / n) for n in ("hf", "a", "out", "b"))
  make_hf("llama_gqa", hf_dir)
  convert.import_hf(hf_dir, a, dtype="bfloat16")
  loaded = workdir.load_for_inference(a)
  cfg, params = loaded.model_config, loaded.params
  assert cfg.param_dtype == "bfloat16" and params["embed"].dtype == np.dtype("bfloat16")
  n_text = tokenizers.Tokenizer.from_file(os.path.join(a, "tokenizer.json")).get_vocab_size()
  embed = np.asarray(params["embed"], np.float32)[:n_text]  # rows the tokenizer can produce
  cls_embed = np.asarray(params["cls_embed"], np.float32)
  cos = cls_embed @ embed.mean(0) / np.linalg.norm(cls_embed) / np.linalg.norm(embed.mean(0))
  assert cos > 0.99
  np.testing.assert_allclose(np.linalg.norm(cls_embed), np.linalg.norm(embed, axis=1).mean(),
                             rtol=1e-2)
  assert not np.asarray(params["cls_head"]["bias"], np.float32).any()
  convert.export_hf(a, out, max_shard_bytes=4096)  # sharded, with an index
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  convert.import_hf(out, b)  # reads every shard; restores the CLS parameters beside them
  params_b = workdir.load_for_inference(b).params
  np.testing.assert_array_equal(np.asarray(params_b["cls_embed"], np.float32), cls_embed)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hf_llama"))
  make_hf("llama_gqa", path)
  return path


def edit_config(src, dst, **changes):
  os.makedirs(dst)
  for name in os.listdir(src):
    with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
      g.write(f.read())
  with open(os.path.join(dst, "config.json")) as f:
    hf = json.load(f)
  hf.update(changes)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(hf, f)
  return dst


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2"), r"Unsupported model_type 'gpt2'"),
    (dict(intermediate_size=40),
     r"model.layers.0.mlp.gate_proj.weight has shape \(48, 32\).*implies \(40, 32\)"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
     r"RoPE scaling 'llama3'"),
    (dict(attention_bias=True), r"attention_bias"),
    (dict(vocab_size=32), r"tokenizer.json has token ids up to \d+ but config.json vocab_size=32"),
])
def test_config_errors(llama_dir, tmp_path, changes, message):
  src = edit_config(llama_dir, str(tmp_path / "src"), **changes)
  with pytest.raises(ValueError, match=message):
    convert.import_hf(src, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_export_onto_the_workdir_is_refused_before_writing(trained, tmp_path):
  work = pathlib.Path(shutil.copytree(trained, tmp_path / "w"))
  before = file_digests(work)
  for out in (work, work / "hf"):
    with pytest.raises(ValueError, match="is the workdir .* or inside it"):
      convert.export_hf(str(work), str(out))
  assert file_digests(work) == before


JINJA = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize("where", ["none", "string", "list", "jinja_file"])
def test_chat_template_stored_inline(llama_dir, tmp_path, where):
  """The checkpoint's own Jinja template goes into config.json; the family's name without one."""
  src = edit_config(llama_dir, str(tmp_path / "src"))
  config = {"string": dict(chat_template=JINJA),
            "list": dict(chat_template=[{"name": "tool_use", "template": "x"},
                                        {"name": "default", "template": JINJA}])}.get(where, {})
  with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
    json.dump(dict(config, bos_token="<s>", eos_token="</s>"), f)
  if where == "jinja_file":
    with open(os.path.join(src, "chat_template.jinja"), "w") as f:
      f.write(JINJA)
  convert.import_hf(src, str(tmp_path / "out"))
  with open(tmp_path / "out" / "config.json") as f:
    assert json.load(f)["chat_template"] == ("llama2" if where == "none" else JINJA)


def test_out_never_overwrites_the_source(llama_dir, tmp_path):
  with pytest.raises(ValueError, match=r"is the source .* or inside it"):
    convert.import_hf(llama_dir, os.path.join(llama_dir, "converted"))
  with pytest.raises(FileExistsError, match=r"exists and is not an empty directory"):
    convert.import_hf(llama_dir, os.path.dirname(llama_dir))
  assert not os.path.exists(os.path.join(llama_dir, "converted"))


def test_missing_tensor(llama_dir, tmp_path):
  src = edit_config(llama_dir, str(tmp_path / "src"))
  tensors = load_file(os.path.join(src, "model.safetensors"))
  del tensors["model.layers.1.self_attn.k_proj.weight"]
  save_file(tensors, os.path.join(src, "model.safetensors"))
  with pytest.raises(ValueError, match=r"missing.*model.layers.1.self_attn.k_proj.weight"):
    convert.import_hf(src, str(tmp_path / "out"))


def test_lm_logits_rejects_cls(llama_dir, tmp_path):
  cfg = convert.import_hf(llama_dir, str(tmp_path / "a"))
  with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\)"):
    sa.load(str(tmp_path / "a")).lm_logits(np.full((1, 3), cfg.cls_id))


def test_check_parity(llama_dir, tmp_path):
  convert.import_hf(llama_dir, str(tmp_path / "a"))
  m = check_parity.run(llama_dir, str(tmp_path / "a"), SENTENCES[0])
  assert m["tokens"] == len(SENTENCES[0].split()) + 1  # BOS prepended
  assert m["rel_diff"] < 1e-4 and 0 <= m["kl_max"] < 1e-8, m
  bad = check_parity.compare(np.array([[4.0, 0, 0, 0]]), np.array([[0, 0, 0, 4.0]]))
  assert bad["max_abs_diff"] == 4.0 and bad["rel_diff"] == 1.0 and bad["kl_max"] > 1.0


def test_import_generates_as_its_source_until_the_cls_gate_opens(llama_dir, tmp_path):
  """A fresh [CLS] is read by no text token (the zero-initialised attention gate), so the
  imported model's gate="off" decoding is the source's greedy decoding, token for token;
  the gate values travel through export and re-import."""
  import safety_align as sa  # pylint: disable=g-import-not-at-top
  a, out, b = (str(tmp_path / n) for n in ("a", "out", "b"))
  cfg = convert.import_hf(llama_dir, a, scan_layers=False)
  assert cfg.cls_attention_gate
  model = sa.load(a)
  prompts = ["how do I bake bread at home", "tell me a story"]
  ours = [g.tokens for g in model.generate(prompts, max_new_tokens=12, gate="off")]
  hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
  for prompt, tokens in zip(prompts, ours):
    ids = list(model._prompts([prompt]).ids[0])  # pylint: disable=protected-access
    with torch.no_grad():
      ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                        max_new_tokens=12, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(ids):].tolist()
    assert tokens == ref[:len(tokens)]
    assert len(tokens) == 12 or ref[len(tokens)] == model.tokenizer.eos_id  # stopped at EOS
  convert.export_hf(a, out)
  cls = load_file(os.path.join(out, CLS_FILE))
  assert cls["cls_gate"].shape == (cfg.n_layers, cfg.n_heads) and not cls["cls_gate"].any()
  cls["cls_gate"] = np.full_like(cls["cls_gate"], 0.5)
  save_file(cls, os.path.join(out, CLS_FILE))
  convert.import_hf(out, b)
  params = workdir.load_for_inference(b).params
  np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["cls_gate"]), 0.5)
  opened = [g.tokens for g in sa.load(b).generate(prompts, max_new_tokens=12, gate="off")]
  assert opened != ours  # response tokens now read [CLS]


def test_an_import_is_the_baselines_plain_source(llama_dir, tmp_path):
  """An import directory's [CLS] head never trained: the competitor baselines run over it as
  the plain LM."""
  from safety_align.decode import GateConfig  # pylint: disable=g-import-not-at-top
  from safety_align.eval import competitors, config as eval_config  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "import")
  convert.import_hf(llama_dir, out)
  cfg = eval_config.load("quick")
  cfg.baselines = "probe"
  records = [dict(prompt=f"{s} {k}", response="ok", label=k % 2)
             for k, s in enumerate(SENTENCES * 4)]
  built = competitors.build(["probe"], cfg, out, records, str(tmp_path / "baselines"),
                            gate=GateConfig(), log=lambda m: None)
  probe_model, model_id = built["probe"]
  assert not probe_model.source.has_cls_head and model_id.startswith("probe:")
