"""Two-turn chats built from a run's own single-turn SFT records, so that METHOD.md sec. 3's
multi-turn rule (every user turn QUERY; earlier answers and system text TEMPLATE, which the
main [CLS] does not read) is learned, not only applied at inference.

``two_turn_records`` turns a seeded share of the records into chats with earlier ``turns``
(``encoding.encode_sft``), in two forms, each with as many records of either label:

* ``split``: the request split across two user turns (``split_request``: turn 1 up to the
  whitespace nearest its middle, turn 2 the rest) with ``ACKNOWLEDGEMENT`` as the assistant
  turn between, and the record's own response: a harmful request's refusal (label 1), a benign
  one's answer (label 0);
* ``context``: the request after another benign record's exchange (its prompt and its answer)
  as the first turn: a benign request keeps its answer (label 0), a harmful one after benign
  talk its refusal (label 1).

Everything is built at run time from the records given (make demo's, in its workdir); no
request text lives here. The evaluation's ``two_turn`` attack splits its held-out requests with
the same ``split_request`` and ``ACKNOWLEDGEMENT``.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

# The assistant turn between the two halves of a split request (training and the attack).
ACKNOWLEDGEMENT = "I see. Please go on."
FORMS = ("split", "context")


def split_request(text: str) -> tuple[str, str] | None:
  """(first part, rest) of ``text`` stripped, cut at the whitespace run nearest its middle, so
  the first part, that whitespace and the rest are the stripped text; ``None`` for a text
  without inner whitespace (one word)."""
  body = text.strip()
  runs = list(re.finditer(r"\s+", body))
  if not runs:
    return None
  cut = min(runs, key=lambda m: abs(m.start() + m.end() - len(body)))
  return body[:cut.start()], body[cut.end():]


def split_turns(text: str) -> list[dict] | None:
  """The messages of ``text`` split across two user turns (``split_request``) with
  ``ACKNOWLEDGEMENT`` between; ``None`` if it does not split."""
  parts = split_request(text)
  if parts is None:
    return None
  return [dict(role="user", content=parts[0]), dict(role="assistant", content=ACKNOWLEDGEMENT),
          dict(role="user", content=parts[1])]


def two_turn_records(records: Sequence[dict], share: float, seed: int) -> list[dict]:
  """Two-turn chats (module doc) from ``n = round(share * m)`` records of each label (``m``:
  the smaller label's count; a seeded draw): ``n - n // 2`` of each label in the ``split``
  form (fewer if fewer requests split, the same for both labels), the rest in ``context``.
  Each is ``{prompt, response, label, turns, form}`` (and the record's ``source``): ``prompt``
  the last user turn, ``turns`` the messages before it; ``harmful_response`` is not kept."""
  if not 0 <= share <= 1:
    raise ValueError(f"The two-turn share must be in [0, 1], got {share}.")
  pools = [[r for r in records if r["label"] == label] for label in (0, 1)]
  n = round(share * min(map(len, pools)))
  if not n:
    return []
  if len(pools[0]) < 2:
    raise ValueError("Two-turn chats need at least two benign records (one gives another its "
                     "earlier exchange); lower the two-turn share to 0.")
  rng = np.random.default_rng([seed, 11])
  orders = [rng.permutation(len(pool)) for pool in pools]
  splits = [[i for i in order if split_request(pool[i]["prompt"])]
            for pool, order in zip(pools, orders)]
  n_split = min(n - n // 2, *map(len, splits))
  out = []
  for label, (pool, order, split) in enumerate(zip(pools, orders, splits)):
    chosen = set(split[:n_split])
    for i in split[:n_split]:
      turns = split_turns(pool[i]["prompt"])
      out.append(_chat(pool[i], turns[:-1], turns[-1]["content"], "split"))
    for i in [i for i in order if i not in chosen][:n - n_split]:
      others = [k for k in range(len(pools[0])) if label or k != i]  # not itself
      before = pools[0][others[int(rng.integers(len(others)))]]
      turns = [dict(role="user", content=before["prompt"]),
               dict(role="assistant", content=before["response"])]
      out.append(_chat(pool[i], turns, pool[i]["prompt"], "context"))
  return out


def _chat(record: dict, turns: list[dict], prompt: str, form: str) -> dict:
  out = dict(prompt=prompt, response=record["response"], label=record["label"], turns=turns,
             form=form)
  if "source" in record:
    out["source"] = record["source"]
  return out
