"""The decoder against full forwards: cached logits, the first classification (training /
inference consistency), a [CLS] re-evaluation overwriting slot 0, batch independence, errors."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import VOCAB, packed, tiny_model_config, tiny_params
from safety_align import masks
from safety_align.data.packing import build_segment
from safety_align.decode import Decoder, GateConfig, Prompts
from safety_align.masks import Role
from safety_align.model import Transformer, forward_batch

EOS, REFUSAL, NEWLINE = 2, [40, 41, 42], [6]
OFF = GateConfig(schedule="off")


def _pieces(query):
  return [([1], Role.BOS), ([3, 4], Role.TEMPLATE), (list(query), Role.QUERY),
          ([5], Role.TEMPLATE)]


QUERIES = [(10, 11, 12), (13, 14, 15, 16, 17, 18, 19, 20, 21, 22)]  # prompts of 7 and 14


FULL = 32  # full forwards are padded to one length: one compilation


def _params(cfg):
  return tiny_params(cfg)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "cls_gate"])
def setup(request):
  """The tiny model; ``cls_gate``: with the text -> [CLS] attention gate, set part-open
  (per-head values in (0.2, 1.2)) so both of its terms matter."""
  cfg = tiny_model_config(cls_attention_gate=request.param)
  params = _params(cfg)
  if request.param:
    rng = np.random.default_rng(1)
    for i in range(cfg.n_layers):
      attn = params[f"layer_{i}"]["attn"]
      attn["cls_gate"] = jnp.asarray(rng.uniform(0.2, 1.2, cfg.n_heads), jnp.float32)
  return cfg, params, Decoder(cfg, eos_ids=[EOS], max_length=64)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, positions, mask):
  lm, cls, _ = Transformer(cfg).apply({"params": params}, tokens, positions, mask)
  return lm, jax.nn.softmax(cls)[..., 1]


def _full_logits(cfg, params, tokens, positions, mask):
  """A full forward of one sequence of T tokens: (lm_logits [T, V], P(malicious) [T])."""
  t = len(tokens)
  pad = FULL - t
  padded_mask = np.eye(FULL, dtype=bool)  # padding rows read themselves only
  padded_mask[:t, :t] = mask
  lm, p = _forward(cfg, params, jnp.asarray(np.pad(tokens, (0, pad)))[None],
                   jnp.asarray(np.pad(positions, (0, pad)))[None], jnp.asarray(padded_mask)[None])
  return np.asarray(lm[0, :t]), np.asarray(p[0, :t])


def _close(a, b, tol=1e-5):
  scale = max(np.abs(b).max(), 1.0)
  np.testing.assert_allclose(a / scale, b / scale, atol=tol)


@pytest.mark.parametrize("scan", [False, True])
def test_cached_logits_match_full_forward(scan):
  cfg = tiny_model_config(scan_layers=scan, n_layers=3)
  params = _params(cfg)
  dec = Decoder(cfg)
  out = dec(params, Prompts.from_pieces([_pieces(q) for q in QUERIES]), max_new_tokens=12,
            gate=OFF, return_logits=True)
  for i, q in enumerate(QUERIES):
    prompt = [t for ids, _ in _pieces(q) for t in ids]
    seq = prompt + out.response(i)
    assert out.lengths[i] == 12 and out.n_evals[i] == 0
    t = len(seq)
    causal = np.tril(np.ones((t, t), bool))
    full, _ = _full_logits(cfg, params, np.array(seq), np.arange(t), causal)
    n = len(prompt)
    _close(out.logits[i, :12], full[n - 1:n + 11])
    assert out.response(i) == full[n - 1:n + 11].argmax(-1).tolist()  # greedy


def test_first_classification_matches_training_forward(setup):
  cfg, params, dec = setup
  batch = packed([build_segment(VOCAB, _pieces(q), 1) for q in QUERIES], seq_len=20, batch=2)
  _, cls_logits = jax.jit(forward_batch, static_argnums=(0, 3))(
      Transformer(cfg), params, {k: jnp.asarray(v) for k, v in batch.items()}, "sft")
  trained = np.asarray(jax.nn.softmax(cls_logits[:, 0])[:, 1])  # row i holds segment i
  prompts = Prompts.from_pieces([_pieces(q) for q in QUERIES])
  np.testing.assert_allclose(dec.classify(params, prompts), trained, atol=1e-6)
  out = dec(params, prompts, max_new_tokens=2, gate=GateConfig(schedule="first",
                                                               reliance="low"))
  np.testing.assert_allclose(out.cls_probs[:, 0], trained, atol=1e-6)
  assert out.cls_steps[:, 0].tolist() == [0, 0] and out.n_evals.tolist() == [1, 1]


def test_reevaluation_overwrites_cls_slot(setup):
  """Forced response x0..x4; periodic k=3 re-evaluates at step 3 over the rule-2 window
  {x1, x2} in the pass that feeds x2. x0, x1 read the prompt-pass [CLS]; x2, x3, x4 the new one."""
  cfg, params, dec = setup
  response = [20, 21, 22, 23, 24]
  gate = GateConfig(schedule="periodic", period=3, r2=2, threshold=1.0, reliance="low")
  prompts = Prompts.from_pieces([_pieces(QUERIES[0])])
  out = dec(params, prompts, max_new_tokens=1, gate=gate, prefill=[response],
            return_logits=True)
  assert out.cls_steps[0, :out.n_evals[0]].tolist() == [0, 3]

  seg = build_segment(VOCAB, _pieces(QUERIES[0]) + [(response, Role.RESPONSE)], -1,
                      windows=[(1, 2, -1)])
  b = packed([seg], seq_len=len(seg))
  mask = np.array(masks.attention_mask(*(jnp.asarray(b[k]) for k in (
      "roles", "segment_ids", "positions", "cls_window")), "sft"))
  resp = np.nonzero(b["roles"][0] == Role.RESPONSE)[0]
  mask[0, resp[2:], 0] = False  # x2.. read the re-evaluated [CLS] (row 1), not the first
  mask[0, resp[2:], 1] = True
  positions = masks.cls_positions(jnp.asarray(mask), jnp.asarray(b["roles"]),
                                  jnp.asarray(b["positions"]))
  full, p_cls = _full_logits(cfg, params, b["tokens"][0], np.asarray(positions[0]), mask[0])
  _close(out.logits[0, 1:6], full[resp[:5]])
  np.testing.assert_allclose(out.cls_probs[0, :2], p_cls[:2], atol=1e-6)
  # Without the re-evaluation the later logits differ: the slot-0 update reaches them.
  first = dec(params, prompts, max_new_tokens=1, gate=GateConfig(schedule="first",
                                                                 reliance="low"),
              prefill=[response], return_logits=True)
  _close(first.logits[0, :3], out.logits[0, :3])
  assert np.abs(first.logits[0, 3:6] - out.logits[0, 3:6]).max() > 1e-2


def test_batch_rows_decode_as_alone(setup):
  """Rows of different lengths, one refused at the prompt pass (θ between the rows' signals), one
  with a forced prefill: each row decodes exactly as alone."""
  cfg, params, dec = setup
  queries = [(10, 11, 12, 13, 14, 15), QUERIES[1], (30, 31, 32, 33, 34)]  # 9..14 tokens
  p0 = dec.classify(params, Prompts.from_pieces([_pieces(q) for q in queries]))
  order = np.argsort(p0)
  gate = GateConfig(schedule="annealing", threshold=float(p0[order[1]] + p0[order[2]]) / 2)
  prefill = [[], [], [25, 26]]
  kw = dict(max_new_tokens=10, gate=gate, refusal_ids=REFUSAL, newline_ids=NEWLINE)
  together = dec(params, Prompts.from_pieces([_pieces(q) for q in queries]), prefill=prefill,
                 **kw)
  assert together.refused.tolist() == [i == order[2] for i in range(3)]
  assert together.refusal_step[order[2]] == (3 if order[2] == 2 else 0)  # after "\n"
  for i, q in enumerate(queries):
    alone = dec(params, Prompts.from_pieces([_pieces(q)]), prefill=[prefill[i]], **kw)
    assert together.response(i) == alone.response(0)
    assert together.trace(i)[0] == alone.trace(0)[0]
    np.testing.assert_allclose(together.trace(i)[1], alone.trace(0)[1], atol=1e-5)


def test_eos_stops_a_row(setup):
  cfg, params, _ = setup
  prompts = Prompts.from_pieces([_pieces(q) for q in QUERIES])
  gate = GateConfig(schedule="first", reliance="low")
  free = Decoder(cfg)(params, prompts, max_new_tokens=8, gate=gate)
  eos = free.tokens[0, 3]  # pretend row 0's 4th token is EOS
  out = Decoder(cfg, eos_ids=[int(eos)])(params, prompts, max_new_tokens=8, gate=gate)
  for i in range(2):
    expected = free.response(i)
    assert out.response(i) == (expected[:expected.index(eos)] if eos in expected else expected)


def test_errors(setup):
  cfg, params, dec = setup
  with pytest.raises(ValueError, match="Prompt 1 .* exceeds the model's maximum length of 64"):
    dec(params, Prompts.from_pieces([_pieces(QUERIES[0]), [([10] * 60, Role.QUERY)]]),
        max_new_tokens=8, gate=OFF)
  with pytest.raises(ValueError, match="Prompt 0 is empty"):
    Prompts.from_pieces([[]])
  with pytest.raises(ValueError, match="No prompts"):
    Prompts.from_pieces([])
  with pytest.raises(ValueError, match="role.*RESPONSE"):
    Prompts.from_pieces([[([1, 2], Role.RESPONSE)]])
  with pytest.raises(ValueError, match="refusal_ids"):
    dec(params, Prompts.from_pieces([_pieces(QUERIES[0])]), max_new_tokens=4,
        gate=GateConfig())
  with pytest.raises(ValueError, match="max_new_tokens"):
    dec(params, Prompts.from_pieces([_pieces(QUERIES[0])]), max_new_tokens=0, gate=OFF)


def _copies_in_loops(hlo: str, min_elements: int) -> list[str]:
  """Instructions of the compiled loops (not the entry computation, not the insides of
  fusions) that copy or slice out an f32 array of at least ``min_elements``."""
  fused = set(re.findall(r"calls=(%[\w.-]+)", hlo))
  found, computation = [], None
  for line in hlo.splitlines():
    if line and not line.startswith(" "):
      computation = line.split(" ")[0]
      continue
    m = re.match(r"\s*(?:ROOT )?(%\S+) = f32\[([\d,]*)\]\S* ([\w-]+)\(", line)
    if not m or computation == "ENTRY" or computation in fused:
      continue
    name, dims, op = m.groups()
    moves = op in ("copy", "slice", "dynamic-slice") or (
        op == "fusion" and re.search(r"copy|slice", name)
        and not re.search(r"update-slice|scatter", name))
    if moves and np.prod([int(d) for d in dims.split(",") if d]) >= min_elements:
      found.append(f"{computation}: {line.strip()[:120]}")
  return found


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("schedule", ["off", "annealing"])
def test_loop_never_copies_cache_or_weights(monkeypatch, schedule, scan):
  """The compiled decode loops read every layer's weights and cache buffers in place and
  update the cache in place: no copy or slice of either on any step. (A scanned layer stack
  slices each layer's weights and cache out of the stacked arrays at every step; a layer scan
  over the cache as input and output, or a lax.cond between the one- and two-row steps,
  copies the cache.)"""
  from safety_align.decode import decoder as decoder_lib  # pylint: disable=g-import-not-at-top
  cfg = tiny_model_config(scan_layers=scan, n_layers=3)
  params, decoder = _params(cfg), Decoder(cfg, eos_ids=[EOS], max_length=64)
  lowered = []
  jitted = decoder_lib._decode  # pylint: disable=protected-access

  def spy(*args, **kwargs):
    lowered.append(jitted.lower(*args, **kwargs))
    return jitted(*args, **kwargs)
  monkeypatch.setattr(decoder_lib, "_decode", spy)
  decoder(params, Prompts.from_pieces([_pieces(q) for q in QUERIES]), max_new_tokens=8,
          gate=GateConfig(schedule=schedule), refusal_ids=REFUSAL, newline_ids=NEWLINE)
  hlo = lowered[0].compile().as_text()
  # One layer's cache buffer [B=2, Hkv, S, Dh], S >= prompts + 8 response slots.
  s_len = int(re.search(r"f32\[2,%d,(\d\d+),%d\]" % (cfg.n_kv_heads, cfg.dim_per_head),
                        hlo).group(1))
  layer_cache = 2 * cfg.n_kv_heads * s_len * cfg.dim_per_head
  smallest_weight = cfg.d_model * cfg.n_kv_heads * cfg.dim_per_head  # one layer's k_proj
  assert _copies_in_loops(hlo, min(layer_cache, smallest_weight)) == []
