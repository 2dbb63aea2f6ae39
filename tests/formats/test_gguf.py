"""GGUF import: a tiny random Llama written the way llama.cpp's converter writes it (permuted
q/k rows, GGUF names, a byte-level BPE or SentencePiece vocabulary, a chat template) ->
``import_gguf`` -> logits match the source HF model and transformers' own GGUF loader, the
tokenizer encodes like transformers' GGUF tokenizer, and the metadata lands in config.json."""

import functools
import json
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import pre_tokenizers, trainers  # noqa: E402

import safety_align as sa  # noqa: E402
from safety_align import convert  # noqa: E402
from safety_align.formats import gguf_file  # noqa: E402
from safety_align.data.tokenizer import Tokenizer  # noqa: E402
from safety_align.tools import check_parity  # noqa: E402

SENTENCES = ["how do I bake bread at home", "tell me a story about a brave cat",
             "what is the capital of france", "explain rope embeddings in transformers",
             "never share dangerous instructions with anyone", "it's what they're saying"] * 4
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "<think>"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["how do I bake bread at home", "<|im_start|>user\nwhat is rope?<|im_end|>\n",
         "  two  spaces,\ttabs\n\nand newlines", "café naïve 日本 — ok", "<think>a brave cat",
         "it's they're we'll"]
GGUF_LAYER = {  # HF -> GGUF, as llama.cpp's tensor map writes them
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def permute(w, n_head, n_head_kv=None):
  """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (q: n_head; k: n_head, n_head_kv)."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


@functools.cache
def byte_level_vocab():
  """(tokens, token types, merges) of a byte-level BPE trained on SENTENCES."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
      vocab_size=320, special_tokens=CONTROL, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  vocab = tok.get_vocab()
  tokens = sorted(vocab, key=vocab.get) + [USER_DEFINED]
  merges = [m if isinstance(m, str) else " ".join(m)
            for m in json.loads(tok.to_str())["model"]["merges"]]
  types = [3 if t in CONTROL else 4 if t == USER_DEFINED else 1 for t in tokens]
  return tokens, types, merges


@functools.cache
def sentencepiece_vocab():
  """(tokens, token types, scores) laid out as llama.cpp writes a Llama SentencePiece vocab:
  <unk>, <s>, </s>, 256 byte tokens, merged pieces best first, then single characters."""
  tok = tokenizers.SentencePieceBPETokenizer()
  tok.train_from_iterator(SENTENCES, vocab_size=140, show_progress=False)
  vocab = tok.get_vocab()
  pieces = [p for p in sorted(vocab, key=vocab.get) if p != "<unk>"]
  chars = [p for p in pieces if len(p) == 1]
  merged = [p for p in pieces if len(p) > 1]
  tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + merged + chars
            + [USER_DEFINED])
  types = [2, 3, 3] + [6] * 256 + [1] * (len(merged) + len(chars)) + [4]
  scores = ([0.0] * 259 + [-float(i) for i in range(len(merged))]
            + [-1e4 - i for i in range(len(chars))] + [0.0])
  return tokens, types, scores


def make_hf(vocab_size, tie, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, rms_norm_eps=1e-5,
      rope_theta=100.0, max_position_embeddings=128, tie_word_embeddings=tie,
      bos_token_id=1, eos_token_id=2, pad_token_id=0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.5 * torch.randn_like(p))
  return model


def write_gguf(path, model, *, qtype=Q.F32, vocab="gpt2", pre="gpt-2", add_bos=False,
               arch="llama", template=TEMPLATE):
  """Write ``model`` and a tokenizer as llama.cpp's convert_hf_to_gguf.py would."""
  cfg = model.config
  w = gguf.GGUFWriter(path, arch)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  w.add_vocab_size(cfg.vocab_size)
  if vocab == "gpt2":
    tokens, types, merges = byte_level_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_merges(merges)
    bos, eos, pad = 1, 2, 0
  else:
    tokens, types, scores = sentencepiece_vocab()
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_scores(scores)
    bos, eos, pad = 1, 2, 0
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_bos_token_id(bos)
  w.add_eos_token_id(eos)
  w.add_pad_token_id(pad)
  w.add_add_bos_token(add_bos)
  if template:
    w.add_chat_template(template)
  heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
  for name, p in model.state_dict().items():
    x = p.float().numpy()
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    if name.endswith("q_proj.weight"):
      x = permute(x, heads, heads)
    elif name.endswith("k_proj.weight"):
      x = permute(x, heads, kv_heads)
    if name.startswith("model.layers."):
      i, rest = name[len("model.layers."):].split(".", 1)
      module = rest.rsplit(".", 1)[0]
      gname = f"blk.{i}.{GGUF_LAYER[module]}.weight"
    else:
      gname = {"model.embed_tokens.weight": "token_embd.weight",
               "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}[name]
    if x.ndim == 1 or qtype == Q.F32:  # llama.cpp keeps norms in F32
      w.add_tensor(gname, x)
    else:
      w.add_tensor(gname, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return len(tokens)


def new_gguf(tmp_path, name="m.gguf", tie=False, **kwargs):
  """(gguf path, source HF model) of a tiny random Llama."""
  n_tokens = len(byte_level_vocab()[0] if kwargs.get("vocab", "gpt2") == "gpt2"
                 else sentencepiece_vocab()[0])
  model = make_hf(n_tokens, tie)
  path = str(tmp_path / name)
  write_gguf(path, model, **kwargs)
  return path, model


TOKENS = np.random.default_rng(0).integers(0, 250, (2, 12))


def logits_of(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


# --- (a) dequantization ----------------------------------------------------------------------

QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def test_dequantize_matches_gguf(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 512)).astype(np.float32)
  raw = {}
  for q in QUANTIZABLE:
    raw[q] = gguf.quants.quantize(x, q)
  for q in K_QUANTS:  # the package has no quantizer for these: random blocks, finite f16s
    block, size = gguf.GGML_QUANT_SIZES[q]
    raw[q] = rng.integers(0, 0x70, (3, 512 // block * size), dtype=np.uint8)
  path = str(tmp_path / "q.gguf")
  w = gguf.GGUFWriter(path, "llama")
  for q, data in raw.items():
    w.add_tensor(f"t.{q.name}", data, raw_dtype=None if q in (Q.F32, Q.F16) else q)
  w.add_tensor("t.I8", np.ones((2, 32), np.int8))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
  for q, data in raw.items():
    ours = gguf_file.dequantize(tensors[f"t.{q.name}"])
    assert ours.shape == (3, 512) and ours.dtype == np.float32, q
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(data, q), err_msg=q.name)
    if q in QUANTIZABLE:  # and it is the tensor that was quantized
      assert np.abs(ours - x).max() < 0.25 * np.abs(x).max(), q
  with pytest.raises(ValueError, match=r"t.I8 is I8, which the installed gguf package cannot"):
    gguf_file.dequantize(tensors["t.I8"])


def test_unpermute_inverts_llama_cpp_permute():
  w = np.random.default_rng(0).normal(size=(6 * 8, 5))
  np.testing.assert_array_equal(gguf_file.unpermute(permute(w, 6, 6), 6), w)
  np.testing.assert_array_equal(gguf_file.unpermute(permute(w, 12, 6), 6), w)  # GQA k
  assert not np.array_equal(permute(w, 6, 6), w)


# --- (b) logits ----------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype, tie", [(Q.F32, False), (Q.F32, True), (Q.Q8_0, True)])
def test_logits_match_hf_and_transformers_gguf(tmp_path, qtype, tie):
  path, model = new_gguf(tmp_path, tie=tie, qtype=qtype)
  out = str(tmp_path / "out")
  cfg = convert.import_gguf(path, out)
  assert cfg.tie_embeddings == tie and cfg.n_kv_heads == 2
  assert cfg.vocab_size == len(byte_level_vocab()[0])
  ours = sa.load(out).lm_logits(TOKENS)
  hf_gguf = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file=os.path.basename(path), dtype=torch.float32)
  theirs = logits_of(hf_gguf, TOKENS)
  scale = np.abs(theirs).max()
  assert scale > 5  # a large-init model: a layout bug moves logits by O(scale)
  assert np.abs(ours - theirs).max() <= 1e-4 * scale
  if qtype == Q.F32:
    source = logits_of(model, TOKENS)
    assert np.abs(ours - source).max() <= 1e-4 * np.abs(source).max()


def test_load_and_export(tmp_path):
  path, model = new_gguf(tmp_path)
  out, exported = str(tmp_path / "out"), str(tmp_path / "hf")
  convert.import_gguf(path, out)
  m = sa.load(out)  # the inline Jinja template
  ref = logits_of(model, TOKENS)
  np.testing.assert_allclose(m.lm_logits(TOKENS), ref, atol=1e-4 * np.abs(ref).max())
  assert m.tokenizer.eos_id == 2 and m.tokenizer.bos_id == 1
  convert.export_hf(out, exported)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
  np.testing.assert_allclose(logits_of(reloaded, TOKENS), ref, atol=1e-4 * np.abs(ref).max())


def test_check_parity_gguf(tmp_path):
  path, _ = new_gguf(tmp_path)
  out = str(tmp_path / "out")
  convert.import_gguf(path, out)
  hf_model, hf_tok = check_parity.reference(path)
  assert check_parity.logits_metrics(hf_model, out, TEXTS[0])["rel_diff"] < 1e-4
  g = check_parity.greedy(hf_model, hf_tok, out, ["what is rope?", "tell me a story"], 8)
  assert g["logits"]["rel_diff"] < 1e-4
  for row in g["rows"]:
    assert row["same_prompt_ids"] and row["ours"] == row["hf"], row


# --- (c) tokenizer ----------------------------------------------------------------------------

@pytest.mark.parametrize("vocab, pre, add_bos", [
    ("gpt2", "gpt-2", False), ("gpt2", "llama-bpe", True), ("llama", "", True)])
def test_tokenizer_matches_transformers_gguf(tmp_path, vocab, pre, add_bos):
  path, _ = new_gguf(tmp_path, vocab=vocab, pre=pre, add_bos=add_bos)
  out = str(tmp_path / "out")
  convert.import_gguf(path, out)
  ours = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path),
                                                      gguf_file=os.path.basename(path))
  for text in TEXTS:
    ids = ours.encode(text).ids
    assert ids == theirs(text).input_ids, text
    assert (ours.encode(text, add_special_tokens=False).ids
            == theirs(text, add_special_tokens=False).input_ids), text
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text
  assert (ours.encode(TEXTS[0]).ids[0] == 1) == add_bos
  im_start = ours.encode("<|im_start|>", add_special_tokens=False).ids
  if vocab == "gpt2":  # a control token of this vocabulary: one special token
    assert im_start == [CONTROL.index("<|im_start|>")]
  think = ours.encode(USER_DEFINED, add_special_tokens=False).ids
  assert len(think) == 1 and ours.decode(think) == USER_DEFINED  # user-defined: not special


def test_smollm_pre_tokenizer_splits_digits(tmp_path):
  """llama.cpp splits every digit for 'smollm' ('\\p{N}' before the GPT-2 regex)."""
  path, _ = new_gguf(tmp_path, pre="smollm")
  convert.import_gguf(path, str(tmp_path / "out"))
  tok = tokenizers.Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
  assert tok.pre_tokenizer.pre_tokenize_str("ab 123x")[:4] == [
      ("ab", (0, 2)), ("Ġ", (2, 3)), ("1", (3, 4)), ("2", (4, 5))]


# --- (d) metadata ---------------------------------------------------------------------------

def test_chat_template_and_special_tokens(tmp_path):
  path, _ = new_gguf(tmp_path)
  out = str(tmp_path / "out")
  convert.import_gguf(path, out)
  with open(os.path.join(out, "config.json")) as f:
    meta = json.load(f)
  assert meta["chat_template"] == TEMPLATE and meta["family"] == "llama"
  special = meta["special_tokens"]
  assert (special["bos_id"], special["eos_ids"], special["pad_id"]) == (1, [2], 0)
  assert (special["bos_token"], special["eos_tokens"], special["pad_token"]) == (
      "<|im_start|>", ["<|im_end|>"], "<|endoftext|>")
  assert special["cls_id"] == meta["model"]["vocab_size"] == len(byte_level_vocab()[0])
  hf = meta["hf_config"]
  assert (hf["model_type"], hf["num_key_value_heads"], hf["max_position_embeddings"],
          hf["rope_theta"], hf["bos_token_id"]) == ("llama", 2, 128, 100.0, 1)
  tok = Tokenizer.load(os.path.join(out, "tokenizer.json"))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    assert json.load(f)["chat_template"] == TEMPLATE


def test_missing_template_falls_back_to_family(tmp_path):
  path, _ = new_gguf(tmp_path, template="")
  convert.import_gguf(path, str(tmp_path / "out"))
  with open(tmp_path / "out" / "config.json") as f:
    assert json.load(f)["chat_template"] == "llama2"


# --- (e) bad input --------------------------------------------------------------------------

def test_errors(tmp_path):
  path, _ = new_gguf(tmp_path)
  not_gguf = tmp_path / "x.gguf"
  not_gguf.write_text("definitely not a gguf file")
  with pytest.raises(ValueError, match=r"x.gguf is not a readable GGUF file"):
    convert.import_gguf(str(not_gguf), str(tmp_path / "a"))
  with pytest.raises(FileNotFoundError, match=r"no such file"):
    convert.import_gguf(str(tmp_path / "absent.gguf"), str(tmp_path / "a"))
  other = str(tmp_path / "gpt2.gguf")
  write_gguf(other, make_hf(len(byte_level_vocab()[0]), False), arch="gpt2")
  with pytest.raises(ValueError, match=r"GGUF architecture 'gpt2' is not supported"):
    convert.import_gguf(other, str(tmp_path / "a"))
  assert not os.path.exists(tmp_path / "a")
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match=r"--out=.*full exists and is not an empty"):
    convert.import_gguf(path, str(full))
  assert os.listdir(full) == ["keep.txt"]
  with pytest.raises(ValueError, match=r"is the source .* or inside it"):
    convert.import_gguf(path, path)


def test_unsupported_pre_tokenizer(tmp_path):
  path, _ = new_gguf(tmp_path, pre="made-up")
  with pytest.raises(ValueError, match=r"tokenizer.ggml.pre='made-up' is not supported"):
    convert.import_gguf(path, str(tmp_path / "out"))
