"""Special tokens come from the chat template only: marker strings in user text, prefills and
data text encode as text under every built-in template."""

import pytest

from safety_align.data import chat_templates
from safety_align.data.tokenizer import Tokenizer, train_bpe
from safety_align.masks import Role

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


@pytest.mark.parametrize("name", sorted(chat_templates.TEMPLATES))
def test_markers_in_user_text_are_text(hf_tokenizer, name):
  bos, eos = BOS_EOS[name]
  tok = Tokenizer(hf_tokenizer, bos_token=bos, eos_token=eos, pad_token="<pad>")
  template = chat_templates.get_template(name)
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
