"""The edgy-but-safe training prompts (data/edgy_safe.py) and the window [CLS] rows the recipe
trains over answers and harmful continuations: benign rows 0, a harmful continuation 0 over
its compliant opening sentence and 1 past it, every row's mask the gate's ``masks.window_row``."""

import jax.numpy as jnp
import numpy as np
import pytest

from safety_align import masks
from safety_align.data import chat_templates, corpus, edgy_safe, encoding, pipeline
from safety_align.data.tokenizer import train_bpe
from safety_align.masks import Role

CLS = 512
OPENER = "Sure, here is"


def test_prompts_are_balanced_seeded_and_benign():
  pools = edgy_safe.all_prompts()
  assert set(pools) == set(edgy_safe.CATEGORIES)
  every = [p for pool in pools.values() for p in pool]
  assert len(every) == len(set(every)) and all("{" not in p for p in every)
  records = edgy_safe.prompts(100, seed=0)
  assert records == edgy_safe.prompts(100, seed=0) != edgy_safe.prompts(100, seed=1)
  assert len(records) == 100 and len({r["prompt"] for r in records}) == 100
  assert all(r["label"] == 0 and r["source"] == edgy_safe.SOURCE and r["response"] == ""
             for r in records)
  counts = [sum(r["category"] == c for r in records) for c in edgy_safe.CATEGORIES]
  assert max(counts) - min(counts) <= 1  # 100 over 10 categories: 10 each
  assert len(edgy_safe.prompts(10 ** 6, 0)) == len(every)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  texts = corpus.all_texts(0)[::4] + [p for ps in edgy_safe.all_prompts().values() for p in ps]
  return train_bpe(texts, CLS, str(path), chat_templates.TEMPLATES["demo"].special_tokens)


def _windows(batch, b):
  """(row, lo, hi, label) of the window [CLS] rows of packed row ``b``."""
  lo, hi = batch["cls_window"][b, :, 0], batch["cls_window"][b, :, 1]
  rows = np.flatnonzero((batch["roles"][b] == Role.CLS) & (lo <= hi))
  return [(int(q), int(lo[q]), int(hi[q]), int(batch["cls_labels"][b, q])) for q in rows]


def test_window_rows_are_the_gates_rows(tok):
  """Edgy-safe and everyday answers: every window row 0. A harmful continuation: 0 while the
  span stays inside "Sure, here is ...:" and 1 from the first span past it. Each row's
  training mask and position are ``masks.window_row``'s (no query: rule 2's sliding window)."""
  template = chat_templates.get_template("demo")
  edgy = edgy_safe.prompts(1, 0)[0]
  benign = [dict(edgy, response="Open a terminal, find the process id with ps, then end it "
                 "with the kill command and check that it has stopped running."),
            dict(prompt="Name a colour.", label=0, response="Blue is a calm colour, and green "
                 "is the colour of leaves in spring and of many fresh vegetables.")]
  harmful = dict(prompt="Do [REDACTED].", label=1, response=corpus.REFUSAL_PREFIX + " no.",
                 harmful_response=f"{OPENER} a plan for doing that thing you asked about:\n"
                 "Step one, gather the redacted items. Step two, redacted redacted redacted.")
  segments = [s for r in benign + [harmful] for s in encoding.encode_sft(
      r, tok, template, CLS, window=6, augment=True, harmful_opener=OPENER)]
  assert len(segments) == 4  # two benign, the refusal and the window-only harmful segment
  for b, segment in enumerate(segments):
    batch = pipeline.pack([segment], 1, 256)  # one segment: the gate's single sequence
    args = [jnp.asarray(batch[k]) for k in ("roles", "segment_ids", "positions", "cls_window")]
    mask = np.asarray(masks.attention_mask(*args, "sft"))[0]
    positions = np.asarray(masks.cls_positions(jnp.asarray(mask[None]), args[0], args[2]))[0]
    rows = _windows(batch, 0)
    assert rows
    for q, lo, hi, _ in rows:
      want, pos = masks.window_row(args[0], args[2], jnp.array([False]), jnp.array([lo]),
                                   jnp.array([hi]), jnp.array([q]))
      np.testing.assert_array_equal(mask[q], np.asarray(want[0]))
      assert positions[q] == int(pos[0])
    labels = [label for *_, label in rows]
    if b < 3:
      assert labels == [0] * len(labels), b
    else:
      opener_tokens = len(tok.encode(harmful["harmful_response"].split("\n")[0]))
      n_zero = labels.index(1)
      assert labels == [0] * n_zero + [1] * (len(labels) - n_zero)
      assert n_zero == opener_tokens // 6 >= 1  # the spans wholly inside the opener


def test_past_opener_needs_the_opener_and_a_continuation(tok):
  with_rest = tok.encode(f"{OPENER} the thing: step one is redacted.")
  marked = encoding.past_opener(with_rest, tok, OPENER)
  assert not marked[:3].any() and marked[-1]
  assert tok.decode([i for i, m in zip(with_rest, marked) if m]).strip() == \
      "step one is redacted."
  for text in ("No opener here. Step one is redacted.", f"{OPENER} only an opener"):
    assert encoding.past_opener(tok.encode(text), tok, OPENER).all()


def test_an_untrained_refusal_prefix_is_no_lm_target(tok):
  """``untrained_prefix``: a malicious record's refusal is no LM target over the prefix's
  tokens and is one over the reason after it; a benign record, or a refusal that does not open
  with the prefix, keeps every response token a target; the [CLS] rows are unchanged."""
  template = chat_templates.get_template("demo")
  prefix = corpus.REFUSAL_PREFIX
  refusal = dict(prompt="Do [REDACTED].", label=1, response=prefix + " it harms people.")
  n_prefix = len(tok.encode(prefix))

  def response_mask(record, untrained_prefix):
    segment, = encoding.encode_sft(record, tok, template, CLS, window=6, augment=True,
                                   untrained_prefix=untrained_prefix)
    return segment, segment.lm_mask[segment.roles == Role.RESPONSE]

  plain, mask = response_mask(refusal, "")
  assert mask.all()
  masked, mask = response_mask(refusal, prefix)
  assert not mask[:n_prefix].any() and mask[n_prefix:].all() and len(mask) > n_prefix + 2
  for field in ("tokens", "roles", "cls_window", "cls_labels"):
    np.testing.assert_array_equal(getattr(plain, field), getattr(masked, field))
  for record in (dict(refusal, label=0), dict(refusal, response="No. " + refusal["response"])):
    assert response_mask(record, prefix)[1].all()
