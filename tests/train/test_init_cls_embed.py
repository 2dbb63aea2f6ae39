"""``config.init_cls_embed``: a run from an import starts its [CLS] embedding as one token's
embedding row (the rest of the import unchanged); a string that is not one token is a clear
error."""

import dataclasses
import json

import jax
import ml_collections
import numpy as np
import pytest

from conftest import tiny_model_config, tiny_params, tiny_tokenizer
from safety_align import checkpoint, training_loop


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp("init_cls")
  tok = tiny_tokenizer(["how do I bake bread, tell me a story"] * 8, 300,
                       root / "tokenizer.json")
  cfg = tiny_model_config(vocab_size=320)
  (root / "config.json").write_text(json.dumps(dict(model=dataclasses.asdict(cfg),
                                                    chat_template="demo")))
  params = tiny_params(cfg, 3)
  checkpoint.save_params(str(root), "import", params, dict(step=0, phase="import"))
  return root, cfg, tok, params


def config(root, token):
  return ml_collections.ConfigDict(dict(init_from=str(root), init_phase="import",
                                        init_cls_embed=token))


def test_cls_embed_starts_as_the_tokens_row(imported):
  root, cfg, tok, params = imported
  [eot] = tok.encode("<|assistant|>", parse_special=True)
  got = training_loop._initial_params(config(root, "<|assistant|>"), cfg, tok)
  np.testing.assert_array_equal(got["cls_embed"], np.asarray(params["embed"])[eot])
  assert not np.array_equal(got["cls_embed"], params["cls_embed"])
  kept = training_loop._initial_params(config(root, ""), cfg, tok)
  np.testing.assert_array_equal(kept["cls_embed"], params["cls_embed"])
  rest = lambda p: {k: v for k, v in p.items() if k != "cls_embed"}  # noqa: E731
  for a, b in zip(jax.tree.leaves(rest(got)), jax.tree.leaves(rest(kept))):
    np.testing.assert_array_equal(a, b)  # everything else is the import's


def test_a_string_of_several_tokens_is_refused(imported):
  root, cfg, tok, _ = imported
  assert len(tok.encode("bake bread")) > 1
  with pytest.raises(ValueError, match="init_cls_embed='bake bread' is .* tokens of the "
                                       "tokenizer, expected one"):
    training_loop._initial_params(config(root, "bake bread"), cfg, tok)

