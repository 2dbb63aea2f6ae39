"""Greedy Coordinate Gradient (Zou et al. 2023) suffix attack against the [CLS]-gated model.

The suffix extends the user's query in the layout of ``gcg_layout`` (the sequence as the
decoder sees it, with window ``[CLS]`` rows over the target where the gate re-evaluates).
Losses:

* gate-off (``adaptive=False``): mean cross-entropy of the target tokens, the paper's GCG;
* adaptive (``adaptive=True``, not run by the paper): that + ``cls_weight`` * (-log P(benign)
  of the first classification + ``window_weight`` * the mean -log P(benign) of the window
  rows), pushing every classification the gate would make over the target toward benign.

One step: the gradient of the loss w.r.t. a one-hot [n, V] matrix of the suffix (multiplied
into the embedding table) gives the top-k tokens per position (special tokens, tokens that
decode to nothing and, unless allowed, non-ASCII tokens excluded; ``[CLS]`` is outside V);
``search_width`` candidates each replace ``n_replace`` random positions by random top-k
tokens; candidates whose text does not re-tokenise to the same ids after the query are
dropped on the host (over-sampled, so the batch stays full); one fixed-shape forward over the
cached prefix scores them. ``acceptance`` says what happens next: ``"best_seen"`` (this
project's default) moves to the best candidate only if it lowers the loss, so the current
suffix is always the best seen; ``"always_move"`` (nanoGCG) moves to the best candidate of
every step, even when it is worse, and the best suffix seen is tracked and returned. The three
programs (prefill, gradient + top-k, candidate scoring) compile once per (model, prompt /
suffix / target lengths, window rows, search width, top-k); the loss weights are traced, so
attacks that differ only in them share the programs. A model without [CLS]
(``use_cls=False``) takes only the gate-off loss.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Protocol, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from safety_align.attacks.gcg_layout import (Layout, Pieces, block_forward, build_layout,
                                             cls_terms, embed, gate_windows, prefill,
                                             split_prompt)
from safety_align.decode import gate as gate_lib
from safety_align.model import KVCache, ModelConfig

Array = jax.Array
ACCEPTANCE = ("best_seen", "always_move")
_MAX_DRAWS = 8  # over-sampling rounds to fill a candidate batch after re-tokenisation


class TokenizerLike(Protocol):
  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class GCGConfig:
  """Attack settings; defaults follow nanoGCG / the paper's GCG (20 '!' tokens), except
  ``acceptance`` (see the module doc)."""

  steps: int = 250
  search_width: int = 512  # candidates scored per step (one forward)
  topk: int = 256  # tokens per suffix position to sample replacements from
  n_suffix: int = 20
  n_replace: int = 1  # positions changed per candidate
  cls_weight: float = 1.0  # adaptive: weight of the [CLS] terms
  window_weight: float = 1.0  # adaptive: weight of the window rows' mean beside the first's
  window_schedule: str = "annealing"  # adaptive: the re-evaluations the window rows cover
  acceptance: str = "best_seen"  # "best_seen" | "always_move" (nanoGCG)
  seed: int = 0
  allow_non_ascii: bool = False
  early_stop: bool = True  # stop when greedy decoding gives the target (and, adaptive, benign)
  threshold: float = 0.5  # the gate's θ without a gate: benign iff P(malicious) <= threshold
  init_token: str = "!"  # the suffix starts as n_suffix copies of this (single) token
  log_every: int = 0  # log progress every this many steps (0: never)

  def __post_init__(self):
    for field in ("steps", "search_width", "topk", "n_suffix", "n_replace"):
      if getattr(self, field) < (0 if field == "steps" else 1):
        raise ValueError(f"GCGConfig.{field}={getattr(self, field)} is out of range.")
    if self.n_replace > self.n_suffix:
      raise ValueError(f"GCGConfig.n_replace={self.n_replace} exceeds n_suffix={self.n_suffix}.")
    if self.acceptance not in ACCEPTANCE:
      raise ValueError(f"GCGConfig.acceptance={self.acceptance!r}: expected one of "
                       f"{ACCEPTANCE}.")
    if self.window_schedule not in gate_lib.SCHEDULES:
      raise ValueError(f"GCGConfig.window_schedule={self.window_schedule!r}: expected one of "
                       f"{gate_lib.SCHEDULES}.")


@dataclasses.dataclass(frozen=True)
class GCGResult:
  """The suffix returned: the lowest-loss one seen (a successful one first). ``losses``,
  ``cls_probs`` and ``window_probs`` [steps_run + 1] trace the *current* suffix (index 0 the
  initial one): its loss, first-classification P(malicious) and largest window-row
  P(malicious) (0 without window rows; NaN without [CLS]); under ``always_move`` the loss may
  rise. ``best_loss``, ``cls_prob``, ``window_prob``: the returned suffix's. ``query_text``
  is the attacked query (query + suffix) as text; ``success``: for the returned suffix,
  greedy decoding with the gate off gives the target (and, adaptive, the first classification
  and every window row are benign)."""

  suffix_ids: tuple[int, ...]
  suffix_text: str
  query_text: str
  best_loss: float
  losses: np.ndarray
  cls_probs: np.ndarray
  window_probs: np.ndarray
  steps_run: int
  seconds: float
  success: bool
  cls_prob: float
  window_prob: float


@flax.struct.dataclass
class Metrics:
  """Per candidate [B]: ``loss`` (the attack's), ``ce`` (target cross-entropy),
  ``p_malicious`` (first classification; NaN without [CLS]), ``window_p`` [B, W] (window
  rows), ``match`` (greedy decoding gives the target)."""

  loss: Array
  ce: Array
  p_malicious: Array
  window_p: Array
  match: Array


def _block_metrics(cfg: ModelConfig, params, cache: KVCache, layout: Layout, x: Array,
                   cls_weight, window_weight) -> Metrics:
  """Metrics [B] of block input embeddings x [B, T, D] over the cached prefix."""
  lm, cls = block_forward(cfg, params, cache, layout, x)
  logits = lm[:, layout.target_rows]  # [B, R, V]
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.mean(jnp.take_along_axis(logp, layout.target_ids[None, :, None], -1)[..., 0], -1)
  p_first, first_nll, window_p, window_nll = cls_terms(layout, cls)
  return Metrics(loss=ce + cls_weight * (first_nll + window_weight * window_nll), ce=ce,
                 p_malicious=p_first, window_p=window_p,
                 match=jnp.all(jnp.argmax(logits, -1) == layout.target_ids, axis=-1))


def embedded_loss(cfg: ModelConfig, params, cache: KVCache, layout: Layout, suffix_x: Array,
                  cls_weight, window_weight=0.0) -> tuple[Array, Metrics]:
  """(loss, Metrics [1]) of suffix input embeddings suffix_x [n, D] (a soft prompt)."""
  x = embed(cfg, params, layout.block_tokens)
  s = layout.suffix_start
  x = x.at[:, s:s + layout.n_suffix].set(suffix_x[None].astype(x.dtype))
  metrics = _block_metrics(cfg, params, cache, layout, x, cls_weight, window_weight)
  return metrics.loss[0], metrics


def suffix_loss(cfg: ModelConfig, params, cache: KVCache, layout: Layout, onehot: Array,
                cls_weight, window_weight=0.0) -> tuple[Array, Metrics]:
  """(loss, Metrics [1]) of a relaxed suffix onehot [n, V] (rows multiply the embedding)."""
  return embedded_loss(cfg, params, cache, layout, onehot @ params["embed"].astype(onehot.dtype),
                       cls_weight, window_weight)


@functools.partial(jax.jit, static_argnames="cfg")
def token_gradients(cfg: ModelConfig, params, cache: KVCache, layout: Layout, suffix: Array,
                    cls_weight, window_weight=0.0) -> tuple[Metrics, Array]:
  """(Metrics [1] of suffix [n], gradient [n, V] of the loss w.r.t. its one-hot matrix)."""
  onehot = jax.nn.one_hot(suffix, cfg.vocab_size, dtype=jnp.float32)
  (_, metrics), grad = jax.value_and_grad(suffix_loss, argnums=4, has_aux=True)(
      cfg, params, cache, layout, onehot, cls_weight, window_weight)
  return metrics, grad


@functools.partial(jax.jit, static_argnames=("cfg", "topk"))
def _top_tokens(cfg: ModelConfig, params, cache: KVCache, layout: Layout, suffix: Array,
                allowed: Array, cls_weight, window_weight, topk: int) -> tuple[Metrics, Array]:
  """(Metrics [1] of suffix, [n, topk] allowed tokens of most negative gradient)."""
  metrics, grad = token_gradients(cfg, params, cache, layout, suffix, cls_weight, window_weight)
  return metrics, jax.lax.top_k(jnp.where(allowed, -grad, -jnp.inf), topk)[1]


@functools.partial(jax.jit, static_argnames="cfg")
def candidate_metrics(cfg: ModelConfig, params, cache: KVCache, layout: Layout,
                      candidates: Array, cls_weight, window_weight=0.0) -> Metrics:
  """Metrics [B] of candidate suffixes [B, n] in one forward over the cached prefix."""
  b, n = candidates.shape
  if n != layout.n_suffix:
    raise ValueError(f"Candidates have {n} tokens; the layout's suffix has {layout.n_suffix}.")
  s = layout.suffix_start
  tokens = jnp.broadcast_to(layout.block_tokens, (b, layout.block_tokens.shape[1]))
  tokens = tokens.at[:, s:s + n].set(candidates)
  return _block_metrics(cfg, params, cache, layout, embed(cfg, params, tokens), cls_weight,
                        window_weight)


def allowed_tokens(tokenizer: TokenizerLike, vocab_size: int,
                   allow_non_ascii: bool) -> np.ndarray:
  """[vocab_size] bool: tokens a suffix may use. Excluded: BOS/EOS/PAD, ids the tokenizer
  lacks, tokens that decode to nothing (special tokens), and unless ``allow_non_ascii``
  tokens that are not printable ASCII."""
  n = min(vocab_size, getattr(tokenizer, "vocab_size", vocab_size))
  special = {getattr(tokenizer, a, None) for a in ("bos_id", "eos_id", "pad_id")}
  allowed = np.zeros(vocab_size, bool)
  for i in range(n):
    text = tokenizer.decode([i])
    allowed[i] = bool(text) and i not in special and (
        allow_non_ascii or (text.isascii() and text.isprintable()))
  return allowed


def retokenizes(tokenizer: TokenizerLike, candidates: np.ndarray,
                context_ids: Sequence[int] = ()) -> np.ndarray:
  """[M] bool: whether ``context_ids`` + candidate [M, n] decodes and re-encodes to itself
  (the suffix must survive being sent as text after the query)."""
  context = [int(t) for t in context_ids]
  return np.array([tokenizer.encode(tokenizer.decode(context + c)) == context + c
                   for c in np.asarray(candidates).tolist()], bool)


def sample_candidates(rng: np.random.Generator, suffix: np.ndarray, top_ids: np.ndarray,
                      count: int, n_replace: int) -> np.ndarray:
  """[count, n] copies of suffix [n], each with ``n_replace`` random distinct positions set to
  a random one of that position's top tokens top_ids [n, k]."""
  n, k = top_ids.shape
  where = np.argsort(rng.random((count, n)), axis=1)[:, :n_replace]
  tokens = top_ids[where, rng.integers(k, size=(count, n_replace))]
  out = np.repeat(suffix[None], count, axis=0)
  np.put_along_axis(out, where, tokens, axis=1)
  return out


def _candidate_batch(rng, tokenizer, suffix, top_ids, config: GCGConfig, context_ids):
  """[search_width, n] candidates that re-tokenise (repeated cyclically if too few do)."""
  kept, total = [], 0
  for _ in range(_MAX_DRAWS):
    cands = sample_candidates(rng, suffix, top_ids, 2 * config.search_width, config.n_replace)
    cands = cands[retokenizes(tokenizer, cands, context_ids)]
    kept.append(cands)
    total += len(cands)
    if total >= config.search_width:
      break
  if not total:
    raise RuntimeError(
        f"No candidate suffix survived re-tokenisation in {_MAX_DRAWS} rounds of "
        f"{2 * config.search_width}: raise topk or n_replace, or set allow_non_ascii.")
  return np.resize(np.concatenate(kept), (config.search_width, len(suffix)))


def initial_suffix(tokenizer: TokenizerLike, config: GCGConfig) -> np.ndarray:
  ids = tokenizer.encode(config.init_token)
  if len(ids) != 1:
    raise ValueError(f"GCGConfig.init_token={config.init_token!r} encodes to {len(ids)} "
                     "tokens; pick a string that is one token.")
  return np.full(config.n_suffix, ids[0], np.int32)


@dataclasses.dataclass
class _Point:
  """A suffix and its metrics (host side)."""

  suffix: np.ndarray
  loss: float
  p_malicious: float
  window_p: float
  match: bool

  @classmethod
  def of(cls, suffix, metrics: Metrics, i: int) -> "_Point":
    w = np.asarray(metrics.window_p[i])
    return cls(np.asarray(suffix), float(metrics.loss[i]), float(metrics.p_malicious[i]),
               float(w.max()) if w.size else 0.0, bool(metrics.match[i]))


def gcg(cfg: ModelConfig, params, tokenizer: TokenizerLike, prompt_pieces: Pieces,
        target_ids: Sequence[int], config: GCGConfig = GCGConfig(), adaptive: bool = False,
        gate: gate_lib.GateConfig | None = None, use_cls: bool = True) -> GCGResult:
  """Optimise a suffix to the user's query so the model answers with ``target_ids``.

  Args:
    cfg, params: the model and its unboxed parameters.
    tokenizer: ``encode(text) -> ids`` / ``decode(ids) -> text`` (optionally ``vocab_size``,
      ``bos_id``, ``eos_id``, ``pad_id``), for the token filter and re-tokenisation checks.
    prompt_pieces: (ids, role) pieces of the prompt (``ChatTemplate.prompt_pieces``); the
      suffix extends the last QUERY piece.
    target_ids: the target response tokens, e.g. "Sure, here is how to ...".
    config: attack settings.
    adaptive: also push the [CLS] classifications toward benign (``config.cls_weight``).
    gate: the defence's gate settings: with ``adaptive``, window rows cover its
      re-evaluations over the target (``gate_windows`` under ``config.window_schedule``), and
      its threshold decides success; ``None``: the first classification only and
      ``config.threshold``.
    use_cls: the model has [CLS] (``False``: plain GCG on the plain LM layout).
  """
  start = time.perf_counter()
  if adaptive and not use_cls:
    raise ValueError("The adaptive GCG loss needs a model with [CLS]: use adaptive=False on a "
                     "model trained without it.")
  windows = None
  if adaptive and gate is not None:
    windows = gate_windows(dataclasses.replace(gate, schedule=config.window_schedule),
                           len(target_ids))
  threshold = config.threshold if gate is None else gate.threshold
  layout = build_layout(cfg, prompt_pieces, target_ids, config.n_suffix, windows, use_cls)
  prefix, _ = split_prompt(prompt_pieces)
  query_ids = prefix[-1][0]
  allowed = allowed_tokens(tokenizer, cfg.vocab_size, config.allow_non_ascii)
  if allowed.sum() < config.topk:
    raise ValueError(f"GCGConfig.topk={config.topk} exceeds the {allowed.sum()} tokens a "
                     "suffix may use.")
  weights = (jnp.float32(config.cls_weight if adaptive else 0.0),
             jnp.float32(config.window_weight if adaptive else 0.0))
  rng = np.random.default_rng(config.seed)
  cache = prefill(cfg, params, layout)

  def success(pt: _Point) -> bool:
    return pt.match and (not adaptive or (pt.p_malicious <= threshold
                                          and pt.window_p <= threshold))

  def top_tokens(suffix):
    return jax.device_get(_top_tokens(cfg, params, cache, layout, suffix, allowed, *weights,
                                      topk=config.topk))

  suffix = initial_suffix(tokenizer, config)
  metrics, top_ids = top_tokens(suffix)
  current = best = _Point.of(suffix, metrics, 0)
  trace = [current]
  for step in range(config.steps):
    if config.early_stop and success(current):
      break
    cands = _candidate_batch(rng, tokenizer, current.suffix, top_ids, config, query_ids)
    out = jax.device_get(candidate_metrics(cfg, params, cache, layout, cands, *weights))
    i = int(np.argmin(out.loss))
    if config.acceptance == "always_move" or out.loss[i] < current.loss:
      current = _Point.of(cands[i], out, i)
      top_ids = np.asarray(top_tokens(current.suffix)[1])
    if (not success(best), best.loss) > (not success(current), current.loss):
      best = current
    trace.append(current)
    if config.log_every and (step + 1) % config.log_every == 0:
      logging.info("gcg step %d/%d: loss %.4f (best %.4f)  P(malicious) %.3f  window max %.3f"
                   "  target matched %s  %.1fs", step + 1, config.steps, current.loss,
                   best.loss, current.p_malicious, current.window_p, current.match,
                   time.perf_counter() - start)
  ids = best.suffix.tolist()
  return GCGResult(
      suffix_ids=tuple(int(t) for t in ids), suffix_text=tokenizer.decode(ids),
      query_text=tokenizer.decode(list(query_ids) + ids), best_loss=best.loss,
      losses=np.array([t.loss for t in trace]), cls_probs=np.array([t.p_malicious for t in trace]),
      window_probs=np.array([t.window_p for t in trace]), steps_run=len(trace) - 1,
      seconds=time.perf_counter() - start, success=success(best), cls_prob=best.p_malicious,
      window_prob=best.window_p)
