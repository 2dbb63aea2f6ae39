"""The sequence a suffix attack optimises, laid out as the [CLS]-gated decoder sees it
(METHOD.md sections 3, 5), and its forward over a cached prefix (``gcg``, ``embedding`` and
``prefill_adaptive`` share it):

  ``[CLS] <s> opening query SUFFIX closing TARGET [window CLS rows ...]``

The ``n`` suffix tokens are QUERY tokens appended to the user's query, so the first
classification (``[CLS]`` reads the QUERY tokens only, at the position one past the last of
them) reads the suffix too, and the target response tokens read ``[CLS]``. Window ``[CLS]``
rows are the gate's re-evaluations over the target (``Windows``, ``gate_windows``): each reads
what ``masks.window_row`` (the decoder's own rule) lets it read, i.e. a span of target tokens
and, for rule 1, the QUERY (suffix included); nobody reads them.

``gate_windows`` places the window rows where the gate re-evaluates within the target: at
each step ``n`` of ``window_schedule`` (annealing by default) a rule-2 sliding window of the
latest r2 tokens and rule 1's QUERY + ``[0, r1-1]`` window (as far as tokens exist at ``n``),
since the attack cannot know which branch the first classification takes. Not modelled: rule 3
windows (after an alarm; the loss keeps alarms off) and the implicit path of a re-evaluation
(later response tokens read the re-evaluated ``[CLS]``; here they read the first one).

Everything before the suffix (BOS, opening, query) is run once into a KV cache (``prefill``)
and broadcast to the candidates; ``block_forward`` feeds only ``[CLS]``, the suffix, the
closing template, the target and the window rows. A model without [CLS] (``use_cls=False``,
the implicit-alignment baseline) is laid out without it: the plain LM sequence, as its
decoder runs it.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from safety_align import masks
from safety_align.data.packing import build_segment, without_cls
from safety_align.decode import gate as gate_lib
from safety_align.masks import Role
from safety_align.model import KVCache, ModelConfig, Transformer

Array = jax.Array
Pieces = Sequence[tuple[Sequence[int], Role]]

@flax.struct.dataclass
class Windows:
  """Window [CLS] rows: ``sees_query`` [W] bool (rule 1) and ``lo``, ``hi`` [W] int32,
  inclusive response indices (0 = first response token)."""

  sees_query: Array
  lo: Array
  hi: Array

  @classmethod
  def of(cls, rows: Sequence[tuple[bool, int, int]]) -> "Windows":
    rows = list(rows)
    return cls(sees_query=jnp.asarray([bool(r[0]) for r in rows], bool).reshape(-1),
               lo=jnp.asarray([r[1] for r in rows], jnp.int32).reshape(-1),
               hi=jnp.asarray([r[2] for r in rows], jnp.int32).reshape(-1))

  def __len__(self) -> int:
    return int(self.lo.shape[0])


def gate_steps(gate: gate_lib.GateConfig, n_response: int) -> np.ndarray:
  """The steps ``n`` in ``[1, n_response]`` at which ``gate``'s schedule re-evaluates."""
  return np.nonzero(gate_lib.schedule_steps(gate, n_response))[0]


def gate_windows(gate: gate_lib.GateConfig, n_response: int) -> Windows:
  """The windows ``gate`` reads at its re-evaluations over ``n_response`` tokens (see the
  module doc): per scheduled step ``n``, rule 2's ``[n-r2, n-1]`` and rule 1's QUERY +
  ``[0, min(n, r1)-1]``, duplicates dropped."""
  rows = []
  for n in gate_steps(gate, n_response):
    for row in ((False, max(0, n - gate.r2), n - 1), (True, 0, min(n, gate.r1) - 1)):
      if row not in rows:
        rows.append(row)
  return Windows.of(rows)


@flax.struct.dataclass
class Layout:
  """The attacked sequence in cache-slot order: slots ``[0, P)`` the cached prefix (BOS,
  opening, query), slots ``[P, S)`` the block re-run per candidate: ``[CLS]`` (if the model
  has it), suffix (``n_suffix`` placeholders), closing template, target, then one ``[CLS]``
  slot per window row.

  prefix_tokens, prefix_positions [1, P]; prefix_mask [1, P, S]; block_tokens,
  block_positions [1, T]; block_mask [1, T, S] (T = S - P); key_roles, key_positions [1, S]
  the slots' roles and positions; target_rows [R]: block rows whose logits predict target_ids
  [R]; response_start: the position of response token 0; windows: the window rows (their mask
  rows and positions are filled by ``block_rows``, traced, so changing them recompiles
  nothing). Masks and positions of the text and the first ``[CLS]`` are the SFT-phase ones of
  the same sequence in training layout (``masks.attention_mask``, ``masks.cls_positions``),
  permuted.
  """

  prefix_tokens: Array
  prefix_positions: Array
  prefix_mask: Array
  block_tokens: Array
  block_positions: Array
  block_mask: Array
  key_roles: Array
  key_positions: Array
  target_rows: Array
  target_ids: Array
  response_start: Array
  windows: Windows
  n_suffix: int = flax.struct.field(pytree_node=False)
  has_cls: bool = flax.struct.field(pytree_node=False, default=True)

  @property
  def suffix_start(self) -> int:
    """Block row of the first suffix token."""
    return int(self.has_cls)

  @property
  def n_windows(self) -> int:
    return len(self.windows)


def split_prompt(prompt_pieces: Pieces) -> tuple[list, list]:
  """(prefix pieces up to the last QUERY piece, closing TEMPLATE pieces after it)."""
  pieces = [([int(t) for t in ids], Role(r)) for ids, r in prompt_pieces]
  bad = sorted({r.name for _, r in pieces} - {"BOS", "TEMPLATE", "QUERY"})
  if bad:
    raise ValueError(f"Prompt pieces hold only BOS, TEMPLATE and QUERY tokens; got {bad}.")
  query = [i for i, (_, r) in enumerate(pieces) if r == Role.QUERY]
  if not query:
    raise ValueError("The prompt pieces have no QUERY piece for the suffix to extend.")
  prefix, closing = pieces[:query[-1] + 1], pieces[query[-1] + 1:]
  if any(r != Role.TEMPLATE for _, r in closing):
    raise ValueError("Only TEMPLATE pieces may follow the last QUERY piece of a prompt.")
  return prefix, closing


def build_layout(cfg: ModelConfig, prompt_pieces: Pieces, target_ids: Sequence[int],
                 n_suffix: int, windows: Windows | None = None, use_cls: bool = True) -> Layout:
  """The :class:`Layout` of ``prompt_pieces`` + an ``n_suffix``-token suffix (0: none) +
  target, with ``windows`` over the target (``None``: none); ``use_cls=False``: no [CLS] at
  all (a model trained without it)."""
  prefix, closing = split_prompt(prompt_pieces)
  target = [int(t) for t in target_ids]
  if not target:
    raise ValueError("The target response is empty.")
  windows = Windows.of([]) if windows is None else windows
  if len(windows) and not use_cls:
    raise ValueError("Window [CLS] rows need a model with [CLS] (use_cls=True).")
  lo, hi = np.asarray(windows.lo), np.asarray(windows.hi)
  if np.any(lo < 0) or np.any(lo > hi) or np.any(hi >= len(target)):
    raise ValueError(f"Windows must satisfy 0 <= lo <= hi < {len(target)} (the target's "
                     f"length); got lo={lo.tolist()}, hi={hi.tolist()}.")
  n_prefix = sum(len(ids) for ids, _ in prefix)
  if not n_prefix:
    raise ValueError("Nothing precedes the suffix (no BOS, template or query tokens).")
  seg = build_segment(cfg.cls_id, prefix + [([0] * n_suffix, Role.QUERY)] + closing
                      + [(target, Role.RESPONSE)], label=-1)
  if not use_cls:
    seg = without_cls(seg)
  c = int(use_cls)
  roles, positions = seg.roles[None], seg.positions[None]
  mask = masks.attention_mask(roles, np.ones_like(roles), positions, seg.cls_window[None], "sft")
  positions = np.asarray(masks.cls_positions(mask, roles, positions))[0]
  perm = np.r_[c:c + n_prefix, 0:c, c + n_prefix:len(seg)]  # slot -> training-layout index
  w = len(windows)
  mask = np.pad(np.asarray(mask)[0][perm][:, perm], ((0, w), (0, w)))  # window rows: below
  positions = np.r_[positions[perm], np.zeros(w, np.int32)][None]
  tokens = np.r_[seg.tokens[perm], np.full(w, cfg.cls_id, np.int32)][None]
  key_roles = np.r_[seg.roles[perm], np.full(w, int(Role.CLS), np.int32)][None]
  n_closing = sum(len(ids) for ids, _ in closing)
  if not n_suffix + n_closing:
    raise ValueError("Neither a suffix nor a closing template follows the query: the token "
                     "that predicts the first target token would lie in the cached prefix.")
  p = n_prefix
  return Layout(
      prefix_tokens=jnp.asarray(tokens[:, :p]), prefix_positions=jnp.asarray(positions[:, :p]),
      prefix_mask=jnp.asarray(mask[None, :p]), block_tokens=jnp.asarray(tokens[:, p:]),
      block_positions=jnp.asarray(positions[:, p:]), block_mask=jnp.asarray(mask[None, p:]),
      key_roles=jnp.asarray(key_roles), key_positions=jnp.asarray(positions),
      target_rows=jnp.asarray(c - 1 + n_suffix + n_closing + np.arange(len(target)), jnp.int32),
      target_ids=jnp.asarray(target, jnp.int32),
      response_start=jnp.int32(n_prefix + n_suffix + n_closing), windows=windows,
      n_suffix=n_suffix, has_cls=use_cls)


@functools.partial(jax.jit, static_argnames="cfg")
def prefill(cfg: ModelConfig, params, layout: Layout) -> KVCache:
  """The prefix run once into a batch-1 cache (block slots still empty)."""
  p, s = layout.prefix_tokens.shape[1], layout.block_mask.shape[-1]
  _, _, cache = Transformer(cfg).apply(
      {"params": params}, layout.prefix_tokens, layout.prefix_positions, layout.prefix_mask,
      KVCache.zeros(cfg, 1, s), jnp.arange(p)[None], cls_keys=jnp.zeros((1, s), bool))
  return cache


def embed(cfg: ModelConfig, params, tokens: Array) -> Array:
  """[B, T] ids -> [B, T, D] input embeddings."""
  return Transformer(cfg).apply({"params": params}, tokens, method=Transformer.embed_tokens)


def block_rows(layout: Layout) -> tuple[Array, Array]:
  """(block mask [1, T, S], block positions [1, T]) with the window rows filled in: each reads
  what ``masks.window_row`` allows for its window (the decoder's rule) and its own slot."""
  w = layout.n_windows
  if not w:
    return layout.block_mask, layout.block_positions
  s = layout.key_roles.shape[1]
  keys = lambda a: jnp.broadcast_to(a, (w, s))  # noqa: E731
  win = layout.windows
  row, pos = masks.window_row(keys(layout.key_roles), keys(layout.key_positions),
                              win.sees_query, win.lo + layout.response_start,
                              win.hi + layout.response_start, s - w + jnp.arange(w))
  return (layout.block_mask.at[0, -w:].set(row),
          layout.block_positions.at[0, -w:].set(pos))


def block_forward(cfg: ModelConfig, params, cache: KVCache, layout: Layout,
                  x: Array) -> tuple[Array, Array]:
  """(lm_logits [B, T, V], cls_logits [B, T, 2]) of block input embeddings x [B, T, D] over
  the cached prefix."""
  b, t = x.shape[:2]
  p = layout.prefix_tokens.shape[1]
  mask, positions = block_rows(layout)
  rows = lambda a: jnp.broadcast_to(a, (b,) + a.shape[1:])  # noqa: E731
  # The batch axis is the 4th from the end in both cache layouts (stacked or per layer).
  kv = jax.tree.map(lambda a: jnp.broadcast_to(a, a.shape[:-4] + (b,) + a.shape[-3:]), cache)
  is_cls = rows(layout.block_tokens == cfg.cls_id)
  lm, cls, _ = Transformer(cfg).apply(
      {"params": params}, x, rows(positions), rows(mask), kv,
      rows(jnp.arange(p, p + t)[None]), method=Transformer.forward_embedded,
      cls_queries=is_cls, cls_keys=jnp.pad(is_cls, ((0, 0), (p, 0))))
  return lm, cls


def cls_terms(layout: Layout, cls: Array) -> tuple[Array, Array, Array, Array]:
  """From block cls_logits [B, T, 2]: (first P(malicious) [B] (NaN without [CLS]), its
  -log P(benign) [B] (0 without), window P(malicious) [B, W], mean window -log P(benign) [B]
  (0 without windows))."""
  b, w = cls.shape[0], layout.n_windows
  if layout.has_cls:
    first = jax.nn.log_softmax(cls[:, 0], axis=-1)
    p_first, first_nll = jnp.exp(first[:, 1]), -first[:, 0]
  else:
    p_first, first_nll = jnp.full((b,), jnp.nan), jnp.zeros((b,))
  if not w:
    return p_first, first_nll, jnp.zeros((b, 0)), jnp.zeros((b,))
  win = jax.nn.log_softmax(cls[:, -w:], axis=-1)
  return p_first, first_nll, jnp.exp(win[..., 1]), -jnp.mean(win[..., 0], axis=-1)
