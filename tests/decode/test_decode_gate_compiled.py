"""The gate as wired in the compiled decoder: scripted P(malicious) (``cls_override``) drives
the real loop, and every re-evaluation's [CLS] row is checked against a full forward whose
window mask is built here from METHOD.md's rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config, tiny_params
from safety_align.decode import Decoder, GateConfig, Prompts
from safety_align.masks import Role
from safety_align.model import Transformer

NEWLINE, REFUSAL = [6], [40, 41, 42]
INSERTION = NEWLINE + REFUSAL
PIECES = [([1], Role.BOS), ([3, 4], Role.TEMPLATE), ([10, 11, 12], Role.QUERY),
          ([5], Role.TEMPLATE)]
PROMPT = [t for ids, _ in PIECES for t in ids]
ROLES = [int(r) for ids, r in PIECES for _ in ids]
BENIGN, MALICIOUS = 0.1, 0.9
N_NEW = 24  # with <= 8 forced tokens: one response bucket, so one compiled program


@pytest.fixture(scope="module")
def model():
  cfg = tiny_model_config()
  params = tiny_params(cfg)
  return cfg, params, Decoder(cfg)


def decode(model, gate, scripts, prefill=None, default=BENIGN, return_logits=False):
  """Decode one row per script ({step: P(malicious)}; other steps ``default``, NaN for the
  model's own) of the same prompt through the compiled decoder."""
  _, params, dec = model
  prefill = prefill or [[]] * len(scripts)
  table = np.full((len(scripts), N_NEW + max(map(len, prefill)) + 1), default, np.float32)
  for i, script in enumerate(scripts):
    for step, p in script.items():
      table[i, step] = p
  return dec(params, Prompts.from_pieces([PIECES] * len(scripts)), max_new_tokens=N_NEW,
             gate=gate, prefill=prefill, refusal_ids=REFUSAL, newline_ids=NEWLINE,
             cls_override=table, return_logits=return_logits)


def steps(out, i=0):
  return out.trace(i)[0]


def test_malicious_first_classification_inserts_at_once(model):
  """At response index 0, or right after forced tokens (then after a newline)."""
  gate = GateConfig(schedule="periodic", period=4)
  forced = [25, 26, 27]
  out = decode(model, gate, [{0: MALICIOUS}, {0: MALICIOUS}], prefill=[[], forced])
  assert out.response(0)[:3] == REFUSAL and out.refusal_step[0] == 0
  assert out.response(1)[:7] == forced + INSERTION and out.refusal_step[1] == 4
  assert out.refused.all() and out.lengths.tolist() == [N_NEW, N_NEW + 3]
  assert steps(out) == [0, 4, 8, 12, 16, 20]  # rule 1 keeps the schedule
  np.testing.assert_allclose(out.trace(0)[1][:2], [MALICIOUS, BENIGN])


@pytest.mark.parametrize("tau", [1, 2, 3, 4])
def test_insertion_after_tau_consecutive_alarms(model, tau):
  """First alarm at step 5, then every step while the suspicion is open; the tau-th malicious
  re-evaluation (step c, which read tokens 0..c-1) puts newline + prefix at index c on."""
  gate = GateConfig(schedule="periodic", period=5, tau=tau)
  script = {n: MALICIOUS for n in range(5, N_NEW)}
  out = decode(model, gate, [script])
  low = decode(model, GateConfig(schedule="periodic", period=5, tau=tau, reliance="low"),
               [script])
  c = 5 + tau - 1
  tokens = out.response(0)
  assert tokens[c:c + 4] == INSERTION and out.refusal_step[0] == c + 1
  assert tokens[:c] == low.response(0)[:c]  # nothing inserted earlier
  assert not low.refused[0] and low.response(0)[c:c + 4] != INSERTION
  # Confirmed: back to the schedule, no second insertion.
  assert steps(out) == [0] + list(range(5, c + 1)) + [n for n in (10, 15, 20) if n > c]
  assert INSERTION not in [tokens[i:i + 4] for i in range(c + 1, len(tokens))]


@pytest.mark.parametrize("schedule,script,expected", [
    ("periodic", {4: MALICIOUS, 5: MALICIOUS, 6: BENIGN, 12: MALICIOUS},
     [0, 4, 5, 6, 8, 12, 13, 16, 20]),
    ("annealing", {12: MALICIOUS, 13: MALICIOUS}, [0, 1, 2, 3, 5, 8, 12, 13, 14, 18]),
])
def test_suspicion_reevaluates_every_step(model, schedule, script, expected):
  """A SUSPECT row re-evaluates each step whatever the schedule, until a benign one clears
  it (a false alarm: back to the schedule, nothing inserted)."""
  gate = GateConfig(schedule=schedule, period=4, tau=3)
  out = decode(model, gate, [script])
  assert steps(out) == expected and not out.refused[0]


def test_annealing_confirmation_inserts_after_the_schedule_stops_growing(model):
  gate = GateConfig(schedule="annealing", tau=3)
  out = decode(model, gate, [{8: MALICIOUS, 9: MALICIOUS, 10: MALICIOUS}])
  assert steps(out) == [0, 1, 2, 3, 5, 8, 9, 10, 12, 18]
  assert out.response(0)[10:14] == INSERTION and out.refusal_step[0] == 11


@pytest.mark.parametrize("reliance", ["low", "medium", "high"])
def test_reliance(model, reliance):
  """Mid-response (confirmed at step 5 with tau = 2) and at the first classification: low
  never inserts (the signal still drives the windows), medium inserts and goes on, high
  inserts and stops."""
  gate = GateConfig(schedule="periodic", period=4, tau=2, reliance=reliance)
  out = decode(model, gate, [{4: MALICIOUS, 5: MALICIOUS}, {0: MALICIOUS}])
  mid, first = out.response(0), out.response(1)
  assert steps(out, 0)[:4] == [0, 4, 5, 8]
  if reliance == "low":
    assert not out.refused.any() and mid[5:9] != INSERTION and first[:3] != REFUSAL
    assert out.lengths.tolist() == [N_NEW, N_NEW] and steps(out, 0)[4:] == [12, 16, 20]
  elif reliance == "medium":
    assert mid[5:9] == INSERTION and first[:3] == REFUSAL
    assert out.refusal_step.tolist() == [6, 0] and out.lengths.tolist() == [N_NEW, N_NEW]
  else:
    assert mid[5:] == INSERTION and first == REFUSAL and steps(out, 0) == [0, 4, 5, 8]
    assert out.refusal_step.tolist() == [6, 0]


@pytest.mark.parametrize("schedule,expected", [
    ("first", []), ("every", list(range(1, N_NEW))),
    ("periodic", [10, 20]), ("annealing", [1, 2, 3, 5, 8, 12, 18])])
def test_schedule_steps(model, schedule, expected):
  out = decode(model, GateConfig(schedule=schedule), [{}])  # all benign: the schedule
  assert steps(out) == [0] + expected


def test_gate_off_never_classifies(model):
  out = decode(model, GateConfig(schedule="off", tau=1), [{0: MALICIOUS}], default=MALICIOUS)
  assert steps(out) == [] and not out.refused[0]


def test_override_errors(model):
  _, params, dec = model
  kw = dict(max_new_tokens=4, gate=GateConfig(schedule="every"), refusal_ids=REFUSAL)
  prompts = Prompts.from_pieces([PIECES])
  with pytest.raises(ValueError, match=r"cls_override must be \[1, k\]"):
    dec(params, prompts, cls_override=np.zeros((2, 3)), **kw)
  with pytest.raises(ValueError, match="values in \\[0, 1\\], or NaN"):
    dec(params, prompts, cls_override=np.full((1, 3), 2.0), **kw)


# --- The [CLS] window rows against full forwards ---------------------------------------------

R1, R2, R3 = 6, 2, 1
FULL = 32


def reference_window(row: int, m: int, anchor: int | None):
  """Response indices and whether the QUERY is read by row ``row``'s re-evaluation at step m
  (tokens 0..m-1 exist), by METHOD.md 5: row 0's first classification was malicious (rule 1:
  QUERY + the first r1 tokens); row 1's was benign (rule 2: the latest r2 tokens) until the
  alarm at step ``anchor + 1`` (rule 3: [S_t - r2, S_t + r3], S_t = ``anchor``)."""
  if row == 0:
    lo, hi, query = 0, R1 - 1, True
  elif anchor is None:
    lo, hi, query = m - R2, m - 1, False
  else:
    lo, hi, query = anchor - R2, anchor + R3, False
  return [j for j in range(max(lo, 0), min(hi, m - 1) + 1)], query


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, positions, mask):
  lm, cls, _ = Transformer(cfg).apply({"params": params}, tokens, positions, mask)
  return lm, jax.nn.softmax(cls)[..., 1]


def full_forward(cfg, params, response, evals, windows):
  """One non-cached forward of ``[CLS] prompt response [CLS]_m...``: the main [CLS] reads the
  QUERY, response token j reads the newest [CLS] (that of the latest evaluation m <= j + 1:
  the one fed with token m - 1, else the main one), [CLS]_m reads ``windows[m]``; each [CLS]
  sits one past the last position it reads. Returns (LM logits of the prompt's last token and
  of each response token, P(malicious) of the main [CLS] and of each [CLS]_m)."""
  n_p, k = len(PROMPT), len(response)
  cls_id = cfg.cls_id
  tokens = [cls_id] + PROMPT + response + [cls_id] * len(evals)
  t = len(tokens)
  text_pos = list(range(n_p + k))
  is_query = [r == Role.QUERY for r in ROLES] + [False] * k
  mask = np.eye(FULL, dtype=bool)
  text = slice(1, 1 + n_p + k)
  mask[text, text] = np.tril(np.ones((n_p + k, n_p + k), bool))
  mask[0, 1:1 + n_p] = is_query[:n_p]
  positions = np.zeros(FULL, np.int32)
  positions[text] = text_pos
  positions[0] = max(p for p, q in zip(text_pos, is_query) if q) + 1
  row_of = {m: 1 + n_p + k + i for i, m in enumerate(evals)}
  for j in range(k):
    newest = max([m for m in evals if m <= j + 1], default=None)
    mask[1 + n_p + j, 0 if newest is None else row_of[newest]] = True
  for m in evals:
    seen, query = windows[m]
    cols = [1 + n_p + j for j in seen] + [1 + i for i in range(n_p) if query and is_query[i]]
    mask[row_of[m], cols] = True
    positions[row_of[m]] = max(positions[c] for c in cols) + 1
  lm, p = _forward(cfg, params, jnp.asarray(np.pad(tokens, (0, FULL - t)))[None],
                   jnp.asarray(positions)[None], jnp.asarray(mask)[None])
  lm, p = np.asarray(lm[0]), np.asarray(p[0])
  return (lm[n_p:n_p + k + 1], p[0], {m: p[row_of[m]] for m in evals})


def test_window_rows_match_full_forward(model):
  """Rules 1, 2 and 3 as the compiled loop applies them: every re-evaluation's P(malicious)
  (the model's own: threshold 0 makes each one malicious; the scripted 0.0 is benign) and
  every next-token distribution equal a full forward with METHOD.md's window masks. Row 1
  re-evaluates alone at steps 5 and 6 (its suspicion): row 0's [CLS] slot must not move."""
  cfg, params, _ = model
  nan = float("nan")
  gate = GateConfig(schedule="periodic", period=4, threshold=0.0, tau=3, reliance="low",
                    r1=R1, r2=R2, r3=R3)
  out = decode(model, gate, [{}, {0: 0.0}], default=nan, return_logits=True)
  k = 13  # compare response tokens 0..12 and the evaluations that read them
  assert steps(out, 0)[:4] == [0, 4, 8, 12] and steps(out, 1)[:6] == [0, 4, 5, 6, 8, 12]
  for row in (0, 1):
    evals_steps, probs = out.trace(row)
    evals = [m for m in evals_steps[1:] if m <= k - 1]
    anchor = lambda m: None if row == 0 or m <= 4 else 3  # alarm at step 4: S_t = 3  # noqa
    windows = {m: reference_window(row, m, anchor(m)) for m in evals}
    lm, p_main, p_cls = full_forward(cfg, params, out.response(row)[:k], evals, windows)
    if row == 0:  # its first classification is the model's (row 1's was scripted)
      np.testing.assert_allclose(probs[0], p_main, atol=1e-5)
    np.testing.assert_allclose([probs[evals_steps.index(m)] for m in evals],
                               [p_cls[m] for m in evals], atol=1e-5)
    scale = np.abs(lm).max()
    np.testing.assert_allclose(out.logits[row, :k + 1] / scale, lm / scale, atol=1e-5)
  # The check can fail: row 1's rule-3 evaluation at step 5 read as rule 2 differs.
  wrong = {**windows, 5: reference_window(1, 5, None)}
  _, _, p_wrong = full_forward(cfg, params, out.response(1)[:k], evals, wrong)
  assert abs(p_wrong[5] - out.trace(1)[1][2]) > 1e-3
