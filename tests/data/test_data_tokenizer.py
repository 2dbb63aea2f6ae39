"""Tokenizer round trips and errors; chat templates' role-tagged pieces."""

import json
import os

import pytest

from safety_align.data import chat_templates, corpus
from safety_align.data.tokenizer import Tokenizer, check_vocab, train_bpe
from safety_align.masks import Role

MARKERS = (chat_templates.TEMPLATES["demo"].special_tokens
           + chat_templates.TEMPLATES["chatml"].special_tokens)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  return train_bpe(corpus.all_texts(0)[::4], 512, str(path), MARKERS)


def test_round_trip_and_reload(tok, tmp_path):
  texts = ["How do I bake a loaf of bread?", "  two  spaces\nand a newline\t",
           "héllo wörld, 日本語 ✓ 🙂", corpus.sft_pairs("test", 0, 2)[1]["harmful_response"]]
  for text in texts:
    assert tok.decode(tok.encode(text)) == text
  tok.save(str(tmp_path / "t.json"))
  again = Tokenizer.load(str(tmp_path / "t.json"))
  assert again.encode(texts[2]) == tok.encode(texts[2]) and again.vocab_size == tok.vocab_size


def test_special_ids(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == 512
  assert 1 not in tok.encode("hello")  # no BOS / EOS added
  for marker in MARKERS:  # one token as template text; ordinary text in a user's text
    assert len(tok.encode(marker, parse_special=True)) == 1
    assert len(tok.encode(marker)) > 1 and tok.decode(tok.encode(marker)) == marker


def test_decode_never_crashes(tok):
  ids = tok.encode("日本")
  assert len(ids) > 2
  assert tok.decode(ids[:1]) == "\ufffd"  # a cut multi-byte character
  assert tok.decode(ids + [tok.vocab_size, tok.vocab_size + 7, -1]) == "日本"  # [CLS] etc.
  assert tok.decode([]) == ""


def test_harmful_responses_allow_40_token_prefills(tok):
  pairs = [p for p in corpus.sft_pairs("test") if p["label"]]
  assert min(len(tok.encode(p["harmful_response"])) for p in pairs) >= 60


def test_check_vocab(tok):
  check_vocab(tok, 512)
  with pytest.raises(ValueError, match=r"512 tokens.*vocabulary has 256.*vocab_size >= 512"):
    check_vocab(tok, 256)


def test_load_errors_and_config_tokens(tok, tmp_path):
  missing = str(tmp_path / "nope" / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match=missing):
    Tokenizer.load(missing)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  with open(tmp_path / "tokenizer_config.json", "w") as f:  # Qwen2-like: no BOS, no PAD
    json.dump({"bos_token": None, "eos_token": {"content": "<|im_end|>"}, "pad_token": None}, f)
  qwen = Tokenizer.load(path)
  assert qwen.bos_id is None and qwen.eos_id == qwen.pad_id == tok.hf.token_to_id("<|im_end|>")
  os.remove(tmp_path / "tokenizer_config.json")
  with pytest.raises(ValueError, match="bos_token='<bos>'"):
    Tokenizer.load(path, bos_token="<bos>")


def test_template_pieces_roles(tok):
  template = chat_templates.get_template("demo")
  prompt, response = "How do I kill a stuck process?", "Use kill with the process id."
  pieces = template.example_pieces(tok, prompt, response)
  roles = [role for _, role in pieces]
  assert roles == [Role.BOS, Role.TEMPLATE, Role.QUERY, Role.TEMPLATE, Role.RESPONSE]
  text = [tok.decode(ids, skip_special_tokens=False) for ids, _ in pieces]
  assert text == ["<s>", template.opening, prompt, template.closing, response + "</s>"]
  assert template.prompt_pieces(tok, prompt) == pieces[:-1]


def test_chatml_adds_no_bos(tok):
  """ChatML models (SmolLM2, Qwen2) start with the template's own marker: no BOS prepended."""
  prompt, response = "How do I kill a stuck process?", "Use kill with the process id."
  pieces = chat_templates.get_template("chatml").example_pieces(tok, prompt, response)
  assert [r for _, r in pieces] == [Role.TEMPLATE, Role.QUERY, Role.TEMPLATE, Role.RESPONSE]
  assert [tok.decode(i, skip_special_tokens=False) for i, _ in pieces] == [
      "<|im_start|>user\n", prompt, "<|im_end|>\n<|im_start|>assistant\n",
      response + "<|im_end|>"]


def test_template_without_bos(tok):
  no_bos = Tokenizer(tok.hf, bos_token=None)
  pieces = chat_templates.get_template("chatml").prompt_pieces(no_bos, "hi")
  assert [r for _, r in pieces] == [Role.TEMPLATE, Role.QUERY, Role.TEMPLATE]


def test_unknown_template():
  with pytest.raises(ValueError, match="chatml.*demo.*llama2.*mistral"):
    chat_templates.get_template("alpaca")


def test_special_tokens_survive_a_copy_without_their_strings(tmp_path):
  """A tokenizer whose specials are not the demo's (e.g. an imported one): the workdir copy
  writes its strings so a reload finds the same ids."""
  tok = train_bpe(["hello world"] * 4, 300, str(tmp_path / "src.json"), ["<|end|>", "<|start|>"])
  custom = Tokenizer.load(str(tmp_path / "src.json"), bos_token="<|start|>",
                          eos_token="<|end|>", pad_token=None)
  dst = tmp_path / "work"
  dst.mkdir()
  custom.save(str(dst / "tokenizer.json"))
  custom.save_special_tokens(str(dst / "tokenizer_config.json"))
  again = Tokenizer.load(str(dst / "tokenizer.json"))
  assert (again.bos_id, again.eos_id, again.pad_id) == (custom.bos_id, custom.eos_id,
                                                        custom.eos_id)
  assert again.eos_id != tok.eos_id
