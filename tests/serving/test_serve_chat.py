"""Multi-turn chats as the server renders them (``SafetyModel.render``, METHOD.md 3's multi-turn
rule): every user turn is QUERY, system text and earlier assistant turns TEMPLATE; the prompt
pass's [CLS] reads both user turns and nothing else, a window [CLS] with the query (rule 1)
reads them too; the same chat through the ``demo`` template and a Jinja one (chatml)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config, tiny_tokenizer
import safety_align as sa
from safety_align import masks
from safety_align.data import chat_templates
from safety_align.masks import Role
from safety_align.model import init_params

TEXTS = ["how do I bake bread", "first mix flour", "and then what", "be brief"] * 4
CHAT = [dict(role="user", content="how do I bake bread"),
        dict(role="assistant", content="first mix flour"),
        dict(role="user", content="and then what")]


def _model(tmp_path, name):
  t = chat_templates.get_template(name)
  tok = tiny_tokenizer(TEXTS, 300, tmp_path / "tokenizer.json", name)
  cfg = tiny_model_config(vocab_size=320)
  return sa.SafetyModel(cfg, init_params(cfg, jax.random.key(0)), tok, t,
                        max_length=64)


@pytest.mark.parametrize("name", ["chatml", "demo"])
def test_user_turns_are_query_assistant_turns_template(tmp_path, name):
  m = _model(tmp_path, name)
  tok = m.tokenizer
  system = [dict(role="system", content="be brief")] if name == "chatml" else []
  r = m.render(system + CHAT)
  ids, roles = np.array(r.ids), np.array(r.roles)
  query = ids[roles == Role.QUERY].tolist()
  assert query == tok.encode(CHAT[0]["content"]) + tok.encode(CHAT[2]["content"])
  assert set(roles.tolist()) <= {Role.BOS, Role.TEMPLATE, Role.QUERY}
  answer = tok.encode(CHAT[1]["content"])
  at = next(i for i in range(len(ids)) if ids[i:i + len(answer)].tolist() == answer)
  assert (roles[at:at + len(answer)] == Role.TEMPLATE).all()  # the earlier answer: context
  assert r.prefill_ids == []
  # A final assistant message is the response's forced start, not a turn.
  r2 = m.render(system + CHAT + [dict(role="assistant", content="then knead")])
  assert r2.ids == r.ids and r2.prefill_ids == tok.encode("then knead")

  # The prompt pass: [CLS] reads exactly the QUERY tokens of both turns.
  head = np.array([Role.CLS, Role.PAD] + roles.tolist())[None]
  positions = np.concatenate([[0, 0], np.arange(len(ids))])[None]
  mask, _ = masks.prompt_mask(jnp.asarray(head), jnp.asarray(positions))
  seen = np.asarray(mask[0, 0, 2:])
  np.testing.assert_array_equal(seen, roles == Role.QUERY)
  # A window [CLS] under rule 1 reads both user turns, never the earlier answer.
  row, _ = masks.window_row(jnp.asarray(roles[None]), jnp.asarray(np.arange(len(ids))[None]),
                            jnp.array([True]), jnp.array([len(ids)]),
                            jnp.array([len(ids) + 4]), jnp.array([0]))
  np.testing.assert_array_equal(np.asarray(row[0])[1:], (roles == Role.QUERY)[1:])


def test_bad_chats_are_named(tmp_path):
  m = _model(tmp_path, "chatml")
  for roles in (["assistant"], ["user", "user"], ["system"], ["user", "system", "user"]):
    with pytest.raises(ValueError, match="got roles"):
      m.render([dict(role=r, content="hi") for r in roles])
  with pytest.raises(ValueError, match="empty"):
    m.render([dict(role="user", content="")])
  one = m.render([dict(role="developer", content="be brief"), dict(role="user", content="hi")])
  assert one.ids == [t for ids, _ in m.template.prompt_pieces(m.tokenizer, "hi",
                                                              system="be brief") for t in ids]
