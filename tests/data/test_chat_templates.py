"""Jinja chat templates: the ids transformers' ``apply_chat_template`` gives, with exact token
roles, for the real templates of five families on small tokenizers of their kinds (byte-level
BPE for ChatML / Llama-3, SentencePiece-style for Llama-2 / Mistral); the built-ins; errors."""

import pathlib

import numpy as np
import pytest
import transformers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from conftest import tiny_model_config, tiny_params
from safety_align import api
from safety_align.data import chat_templates, encoding, pipeline
from safety_align.data.tokenizer import Tokenizer
from safety_align.masks import Role

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "chat_templates"
QUERY = "How do I bake a loaf of bread at home?"
ANSWER = "Mix flour, water and yeast, then bake it for an hour."
SYSTEM = "You are a terse baking assistant."
CORPUS = [QUERY, ANSWER, SYSTEM, "How do I pick a lock? Sorry, I cannot help with that.",
          "You are a helpful assistant named SmolLM, trained by Hugging Face.",
          "Tell me a story about a cat who bakes bread at home for an hour."] * 8
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>"]


def byte_level(specials, split=None):
  """A byte-level BPE (GPT-2's pre-tokenizer, or ``split``'s regex as Llama-3 / Qwen2)."""
  tok = Backend(models.BPE())
  byte_level_pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
  tok.pre_tokenizer = (pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level_pre])
                       if split else byte_level_pre)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=400, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def sentencepiece(specials=(), legacy=False):
  """A SentencePiece-style BPE (pieces never span words, ``▁`` marks a word start) that
  encodes the whole text at once: with Llama-2's normalizer (``▁`` before every section,
  spaces to ``▁``), or a Metaspace pre-tokenizer (``▁`` before the first section only)."""
  tok = Backend(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *specials], show_progress=False,
      initial_alphabet=list("\n<>/[]|_")))
  if legacy:
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  else:
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
  return tok


# name: (fixture, tokenizer, bos, eos = the end-of-turn token)
FAMILIES = {
    "smollm2": ("smollm2_instruct", lambda: byte_level(CHATML_TOKENS), "<|im_start|>",
                "<|im_end|>"),
    "qwen2": ("qwen2_instruct", lambda: byte_level(CHATML_TOKENS, LLAMA3_SPLIT), None,
              "<|im_end|>"),
    "llama3": ("llama3_instruct", lambda: byte_level(LLAMA3_TOKENS, LLAMA3_SPLIT),
               "<|begin_of_text|>", "<|eot_id|>"),
    "llama2": ("llama2_chat", lambda: sentencepiece(legacy=True), "<s>", "</s>"),
    "mistral_v02": ("mistral_instruct_v02", sentencepiece, "<s>", "</s>"),
    "mistral_v03": ("mistral_instruct_v03", lambda: sentencepiece(["[INST]", "[/INST]"]),
                    "<s>", "</s>"),
}
# (family, system message); Mistral v0.2's template has no system message
CASES = [(name, system) for name in FAMILIES for system in (None, SYSTEM)
         if not (system and name == "mistral_v02")]


@pytest.fixture(scope="module")
def family():
  """``family(name)`` -> (our Tokenizer, HF tokenizer, our template of the fixture)."""
  cache = {}

  def get(name):
    if name not in cache:
      fixture, build, bos, eos = FAMILIES[name]
      backend = build()
      source = (FIXTURES / f"{fixture}.jinja").read_text()
      hf = transformers.PreTrainedTokenizerFast(
          tokenizer_object=Backend.from_str(backend.to_str()), bos_token=bos, eos_token=eos,
          chat_template=source)
      ours = Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=None)
      cache[name] = ours, hf, chat_templates.get_template(source)
    return cache[name]

  return get


def _messages(system, *contents):
  out = [] if system is None else [{"role": "system", "content": system}]
  return out + [{"role": r, "content": c} for r, c in zip(("user", "assistant"), contents)]


def _hf(hf, messages, add_generation_prompt=False):
  return hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                tokenize=True, return_dict=False)


def _ids(pieces, role=None):
  return [t for ids, r in pieces if role in (None, r) for t in ids]


@pytest.mark.parametrize("name, system", CASES)
def test_prompt_ids_are_hfs_and_query_tokens_are_the_users_text(family, name, system):
  tok, hf, template = family(name)
  pieces = template.prompt_pieces(tok, QUERY, system=system)
  assert _ids(pieces) == _hf(hf, _messages(system, QUERY), add_generation_prompt=True)
  assert tok.decode(_ids(pieces, Role.QUERY)) == QUERY
  roles = [r for _, r in pieces]
  chatml = name in ("smollm2", "qwen2")  # write no BOS (SmolLM2's is <|im_start|>)
  assert roles == [Role.BOS] * (not chatml) + [Role.TEMPLATE, Role.QUERY, Role.TEMPLATE]
  template_text = tok.decode(_ids(pieces, Role.TEMPLATE))
  if system:
    assert SYSTEM in template_text
  elif chatml:  # their default system prompt
    assert "You are a helpful" in template_text


@pytest.mark.parametrize("name, system", CASES)
def test_example_ids_are_hfs_through_the_end_of_turn(family, name, system):
  tok, hf, template = family(name)
  pieces = template.example_pieces(tok, QUERY, ANSWER, system=system)
  ids, full = _ids(pieces), _hf(hf, _messages(system, QUERY, ANSWER))
  assert ids == full[:len(ids)] and hf.decode(full[len(ids):]).strip() == ""
  assert ids[-1] == tok.eos_id  # the end-of-turn token ends the RESPONSE
  assert [r for _, r in pieces][-1] == Role.RESPONSE and pieces[-1][0] == _ids(pieces,
                                                                                Role.RESPONSE)
  assert tok.decode(pieces[-1][0]).strip() == ANSWER
  assert tok.decode(_ids(pieces, Role.QUERY)) == QUERY
  if system is None:  # trained on the prompt it is asked with (Mistral v0.3 puts a system
    prompt = _ids(template.prompt_pieces(tok, QUERY))  # message in the last user turn only)
    assert ids[:len(prompt)] == prompt


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pieces_from_ids_keep_the_response_ids(family, name):
  """``pieces`` (a spliced response, e.g. recovery examples): the prompt and end of turn of
  the rendering, the response ids as given."""
  tok, _, template = family(name)
  response = tok.encode(ANSWER)[:5] + tok.encode("\nSorry.")
  pieces = template.pieces(tok, tok.encode(QUERY), response)
  example = template.example_pieces(tok, QUERY, tok.decode(response))
  tail = 2 if name == "llama2" else 1  # the end of turn: " </s>" is ▁ </s>; else one token
  assert pieces[:-1] == example[:-1]
  assert pieces[-1] == (response + example[-1][0][-tail:], Role.RESPONSE)
  assert template.pieces(tok, tok.encode(QUERY)) == template.prompt_pieces(tok, QUERY)


def test_sentencepiece_tokens_join_the_templates_space(family):
  """Why the text is tokenised once: Llama-2's ``[INST] How`` is ``▁[INST] ▁How``, while
  tokenising ``[INST] `` alone ends with a ``▁`` of its own."""
  tok, hf, template = family("llama2")
  query_ids = _ids(template.prompt_pieces(tok, QUERY), Role.QUERY)
  assert hf.convert_ids_to_tokens(query_ids)[0] == "▁How"
  assert tok.encode("[INST] ") + tok.encode(QUERY) != tok.encode(f"[INST] {QUERY}")


@pytest.mark.parametrize("name", ["llama3", "llama2", "mistral_v03"])
def test_trimmed_content_is_matched_around(family, name):
  """Templates that trim the content (``| trim``, ``.strip()``): still HF's ids; the QUERY
  tokens are the trimmed text the model reads."""
  tok, hf, template = family(name)
  query, answer = f"  {QUERY}\n", f" {ANSWER}  "
  pieces = template.example_pieces(tok, query, answer)
  ids, full = _ids(pieces), _hf(hf, _messages(None, query, answer))
  assert ids == full[:len(ids)]
  assert tok.decode(_ids(pieces, Role.QUERY)).strip() == QUERY
  assert (_ids(template.prompt_pieces(tok, query))
          == _hf(hf, _messages(None, query), add_generation_prompt=True))


def test_non_ascii_offsets(family):
  tok, hf, template = family("qwen2")
  query = "Wie backe ich Brot? 日本語の質問 🙂 ok"
  pieces = template.prompt_pieces(tok, query, system="Réponds en français.")
  assert _ids(pieces) == _hf(hf, _messages("Réponds en français.", query), True)
  assert tok.decode(_ids(pieces, Role.QUERY)) == query


def test_template_exceptions_are_clear_errors(family):
  tok, _, template = family("mistral_v02")
  with pytest.raises(ValueError, match=r"rejects the conversation \['system', 'user'\]: "
                                       r"Conversation roles must alternate"):
    template.prompt_pieces(tok, QUERY, system=SYSTEM)
  with pytest.raises(ValueError, match="no system message"):
    chat_templates.get_template("demo").prompt_pieces(tok, QUERY, system=SYSTEM)


def test_get_template_errors():
  with pytest.raises(ValueError, match=r"Unknown chat template 'alpaca'.*'chatml', 'demo', "
                                       r"'llama2', 'llama3', 'mistral'.*Jinja"):
    chat_templates.get_template("alpaca")
  with pytest.raises(ValueError, match="not valid Jinja"):
    chat_templates.get_template("{% if messages %}{{ messages[0]['content'] }}")
  assert chat_templates.get_template("llama3") is chat_templates.TEMPLATES["llama3"]


@pytest.mark.parametrize("builtin, name", [("llama2", "llama2"), ("llama3", "llama3"),
                                           ("mistral", "mistral_v03"), ("chatml", "qwen2"),
                                           ("chatml", "smollm2")])
def test_builtins_render_as_the_real_templates(family, builtin, name):
  """A built-in (for a source without a template) = the family's real template; ChatML's adds
  no BOS, even where the BOS token is ``<|im_start|>``."""
  tok, hf, _ = family(name)
  template = chat_templates.get_template(builtin)
  system = SYSTEM if builtin == "chatml" else None  # Qwen2 / SmolLM2 add a default one
  assert (_ids(template.prompt_pieces(tok, QUERY, system=system))
          == _hf(hf, _messages(system, QUERY), add_generation_prompt=True))
  ids = _ids(template.example_pieces(tok, QUERY, ANSWER, system=system))
  assert ids == _hf(hf, _messages(system, QUERY, ANSWER))[:len(ids)]
  if builtin == "chatml":
    assert ids[0] == tok.hf.token_to_id("<|im_start|>") and ids[1] != ids[0]


def test_sft_segments_with_a_jinja_template(family):
  """The pipeline's examples are ``example_pieces``'; windows and untrained spans count the
  template's end of turn (Llama-2's ``▁ </s>``) as the response's."""
  tok, _, template = family("llama2")
  cls = tok.vocab_size
  record = {"prompt": QUERY, "response": ANSWER, "label": 1,
            "harmful_response": "Sure, here is how: " + ANSWER * 3}
  main, harmful = encoding.encode_sft(record, tok, template, cls, window=4, augment=True)
  text = main.tokens[main.roles != Role.CLS].tolist()
  assert text == _ids(template.example_pieces(tok, QUERY, ANSWER))
  n_resp = int((main.roles == Role.RESPONSE).sum())
  n_windows = -(-(n_resp - 1) // 4)  # over the answer before its end-of-turn token
  assert (main.roles == Role.CLS).sum() == 1 + n_windows
  resp = harmful.roles == Role.RESPONSE
  assert not harmful.lm_mask[resp].any() and harmful.lm_mask[~resp].all()
  (recovery,) = pipeline.recovery_segments([record], 1.0, tok, template, cls, seed=0)
  resp = recovery.tokens[recovery.roles == Role.RESPONSE].tolist()
  k = int(np.argmax(recovery.lm_mask[recovery.roles == Role.RESPONSE]))
  assert resp[:k] == tok.encode(record["harmful_response"])[:k] and resp[-1] == tok.eos_id


def test_generate_with_a_system_message(family):
  """``generate(system=...)``: the system text reaches the model as TEMPLATE tokens of its own
  chat template (greedy tokens = the argmax chain over HF's prompt ids), never as QUERY."""
  tok, hf, template = family("smollm2")
  cfg = tiny_model_config(vocab_size=tok.vocab_size)
  params = tiny_params(cfg)
  model = api.SafetyModel(cfg, params, tok, template, max_length=128, uses_cls=False)
  encoded = model._prompts([QUERY], system=SYSTEM)
  ids = list(encoded.ids[0])
  assert ids == _hf(hf, _messages(SYSTEM, QUERY), add_generation_prompt=True)
  query = [t for t, r in zip(ids, encoded.roles[0]) if r == Role.QUERY]
  assert tok.decode(query) == QUERY
  (gen,) = model.generate([QUERY], system=SYSTEM, max_new_tokens=3, gate="off")
  expected = []
  while len(expected) < 3 and tok.eos_id not in expected:
    expected.append(int(model.lm_logits(np.array([ids + expected]))[0, -1].argmax()))
  assert gen.tokens == [t for t in expected if t != tok.eos_id]
