"""The two-turn attack (``two_turn``): each held-out harmful request split across two user turns
(``data.multi_turn.split_turns``: its first part, the fixed benign ``ACKNOWLEDGEMENT`` as the
assistant turn, the rest), so that no one user turn holds the whole request; greedy, judged as
``direct`` is (against the item's whole request).

The chat goes through the model object's chat path: ``SafetyModel.render`` (METHOD.md sec. 3's
multi-turn rule: both user turns QUERY, the acknowledgement TEMPLATE, so the first
classification reads the whole request) and ``SafetyModel.decode`` of the rendered prompts.
Items whose request is one word, or whose chat does not fit the model's length with the
response budget, are left out. ``summary``: the first classification's mean P(malicious) and
how often it flags the split request (``base.query_flags``), and the items attacked.
"""

from __future__ import annotations

import time

from safety_align.attacks.base import Attack, eta_text, query_flags, record
from safety_align.data.multi_turn import split_turns
from safety_align.decode import Prompts


class TwoTurnAttack(Attack):
  name = "two_turn"

  def chats(self, model, items, settings) -> dict[int, tuple[list[dict], object]]:
    """{item: (its two-turn messages, ``model.render`` of them)} of the items that split and
    fit the model's length with the response budget."""
    if not hasattr(model, "render"):
      raise TypeError(f"The two_turn attack sends chats through SafetyModel.render and decode; "
                      f"{type(model).__name__} takes single prompts only.")
    out = {}
    for i, item in enumerate(items):
      messages = split_turns(item.prompt)
      rendered = messages and model.render(messages)
      if rendered and (model.max_length is None
                       or len(rendered.ids) + settings.max_new_tokens <= model.max_length):
        out[i] = messages, rendered
    return out

  def run(self, model, items, gates, settings):
    chats = self.chats(model, items, settings)
    if not chats:
      return []
    prompts = Prompts.from_arrays([r.ids for _, r in chats.values()],
                                  [r.roles for _, r in chats.values()])
    out, t0 = [], time.perf_counter()
    for k, gate in enumerate(gates):
      gens = model.decode(prompts, max_new_tokens=settings.max_new_tokens, gate=gate,
                          seed=settings.seed)
      out += [record(i, "", items[i].prompt, "", gate, g.tokens, g.refused, g.refusal_step,
                     g.cls_probs, g.cls_steps, model.tokenizer,
                     extra=dict(turns=[m["content"] for m in chats[i][0]]))
              for i, g in zip(chats, gens)]
      settings.log(f"{self.name}: gate={gate} {len(gens)} generations; "
                   + eta_text(time.perf_counter() - t0, k + 1, len(gates)))
    return out

  def summary(self, records, success):
    del success
    return dict(n_split=len({r.item for r in records}), **query_flags(records))
