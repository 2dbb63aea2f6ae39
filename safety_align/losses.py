"""The multi-task objective ``L = L_lm + λ·L_cls + λ_w·L_cls_window`` (METHOD.md section 4).

``L_lm`` is next-token cross-entropy, averaged over the target tokens of the whole batch (a
global token mean, so packing several examples into one row weighs every token equally):
all text tokens in ``pretrain``, RESPONSE tokens only in ``sft``. A token's target is the
next token of the same segment. ``L_cls`` is the cross-entropy of each labelled *main*
``[CLS]`` row (the segment's own, empty ``cls_window``) against its label, averaged over those
rows; ``L_cls_window`` the same over the labelled *window* ``[CLS]`` rows (non-empty
``cls_window``, the SFT window augmentation), so adding window rows never dilutes the main
term's λ.

Under gradient accumulation every term is a mean over the whole accumulated batch:
``term_counts`` of all micro-batches come first, and each micro-batch's ``total_loss`` divides
its sums by those global counts (``Objective.counts``), so the micro-batch losses, gradients
and metrics add up to the big batch's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp

from safety_align.masks import Role, check_phase

COUNTS = ("lm_tokens", "cls_rows", "cls_window_rows")  # the denominators, in ``term_counts``


@dataclasses.dataclass(frozen=True)
class Objective:
  """The weights of the [CLS] terms and, optionally, the denominators of all three terms.

  ``counts`` maps ``COUNTS`` to scalars (``term_counts`` of the whole accumulated batch);
  None: this batch's own counts (plain per-batch means).
  """

  cls_weight: float
  window_cls_weight: float
  counts: dict[str, Any] | None = None


def lm_targets(tokens, roles, segment_ids, phase: str, lm_mask=None):
  """Next-token targets and their weights.

  ``lm_mask`` [B, T] bool (optional) switches individual tokens off as *targets* (e.g. a
  harmful response prefix shown to the model in a recovery example but never trained on).

  Returns:
    targets [B, T] int32 (the next token), weights [B, T] float32: 1 where position t's
    prediction of token t+1 counts in ``L_lm`` for ``phase``.
  """
  check_phase(phase)
  chex.assert_rank([tokens, roles, segment_ids], 2)
  chex.assert_type([tokens, roles, segment_ids], int)
  chex.assert_equal_shape([tokens, roles, segment_ids])
  if lm_mask is not None:
    chex.assert_type(lm_mask, bool)
    chex.assert_equal_shape([tokens, lm_mask])
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  next_roles = jnp.concatenate([roles[:, 1:], jnp.zeros_like(roles[:, :1])], axis=1)
  next_segment = jnp.concatenate(
      [segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
  is_text = (roles != Role.PAD) & (roles != Role.CLS)
  counted = is_text & (next_segment == segment_ids) & (segment_ids > 0)
  if phase == "pretrain":
    counted &= (next_roles != Role.PAD) & (next_roles != Role.CLS)
  else:
    counted &= next_roles == Role.RESPONSE
  if lm_mask is not None:
    counted &= jnp.concatenate([lm_mask[:, 1:], jnp.zeros_like(lm_mask[:, :1])], axis=1)
  # Uncounted targets (e.g. the [CLS] id, outside the LM vocabulary) are zeroed.
  return jnp.where(counted, targets, 0).astype(jnp.int32), counted.astype(jnp.float32)


def lm_loss(lm_logits, targets, weights):
  """Token-mean cross-entropy. lm_logits [B, T, V] -> (loss, number of tokens)."""
  total, n = _lm_sum(lm_logits, targets, weights)
  return total / jnp.maximum(n, 1.0), n


def _lm_sum(lm_logits, targets, weights):
  logp = jax.nn.log_softmax(lm_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights), jnp.sum(weights)


def cls_rows(cls_labels, cls_window):
  """[B, T] float32 masks of the labelled main and window [CLS] rows.

  ``cls_window`` [B, T, 2]: a row is a window row when its window is non-empty (``masks.py``).
  """
  labelled = cls_labels >= 0
  window = cls_window[..., 0] <= cls_window[..., 1]
  return ((labelled & ~window).astype(jnp.float32), (labelled & window).astype(jnp.float32))


def _cls_sums(cls_logits, cls_labels, w):
  """(summed cross-entropy, summed correct) of the [CLS] rows weighted by ``w`` [B, T]."""
  labels = jnp.maximum(cls_labels, 0)
  logp = jax.nn.log_softmax(cls_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(cls_logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum(nll * w), jnp.sum(correct * w)


def cls_loss(cls_logits, cls_labels):
  """Mean cross-entropy over labelled [CLS] rows -> (loss, accuracy, number of rows)."""
  w = (cls_labels >= 0).astype(jnp.float32)
  n = jnp.sum(w)
  nll, correct = _cls_sums(cls_logits, cls_labels, w)
  denom = jnp.maximum(n, 1.0)
  return nll / denom, correct / denom, n


def term_counts(batch, phase: str) -> dict[str, jax.Array]:
  """The denominators of the three terms (``COUNTS``) from a batch's layout alone: float32
  scalars; with a leading micro-batch axis (``[k, B, T]`` arrays) summed over it too."""
  flat = {k: v.reshape((-1,) + v.shape[-1 - (k == "cls_window"):]) for k, v in batch.items()}
  _, weights = lm_targets(flat["tokens"], flat["roles"], flat["segment_ids"], phase,
                          flat.get("lm_mask"))
  main, window = cls_rows(flat["cls_labels"], flat["cls_window"])
  return dict(lm_tokens=jnp.sum(weights), cls_rows=jnp.sum(main),
              cls_window_rows=jnp.sum(window))


def total_loss(lm_logits, cls_logits, batch, phase: str, objective: Objective | float):
  """``L_lm + λ·L_cls + λ_w·L_cls_window`` and the per-term metrics.

  Args:
    lm_logits: [B, T, V]; cls_logits: [B, T, 2].
    batch: dict with ``tokens``, ``roles``, ``segment_ids``, ``cls_labels``, ``cls_window``
      ([B, T, 2]) and optionally ``lm_mask`` ([B, T] each).
    objective: an ``Objective``, or a float λ for both [CLS] terms (per-batch means).
  Returns:
    (loss, metrics) with metrics ``loss``, ``lm_loss``, ``cls_loss`` and ``cls_accuracy``
    (main [CLS] rows), ``cls_window_loss`` and ``cls_window_accuracy`` (window rows), and this
    batch's counts ``lm_tokens``, ``cls_rows``, ``cls_window_rows``. With ``objective.counts``
    the means are this batch's share of the accumulated batch's: they sum over micro-batches.
  """
  if not isinstance(objective, Objective):
    objective = Objective(cls_weight=objective, window_cls_weight=objective)
  chex.assert_rank([lm_logits, cls_logits, batch["cls_labels"], batch["cls_window"]],
                   [3, 3, 2, 3])
  chex.assert_type([lm_logits, cls_logits, batch["cls_labels"], batch["cls_window"]],
                   [float, float, int, int])
  chex.assert_equal_shape_prefix([lm_logits, cls_logits, batch["tokens"], batch["cls_labels"],
                                  batch["cls_window"]], 2)
  chex.assert_axis_dimension(cls_logits, 2, 2)
  chex.assert_axis_dimension(batch["cls_window"], 2, 2)
  targets, weights = lm_targets(batch["tokens"], batch["roles"], batch["segment_ids"], phase,
                                batch.get("lm_mask"))
  lm_sum, n_tok = _lm_sum(lm_logits, targets, weights)
  main, window = cls_rows(batch["cls_labels"], batch["cls_window"])
  main_nll, main_correct = _cls_sums(cls_logits, batch["cls_labels"], main)
  window_nll, window_correct = _cls_sums(cls_logits, batch["cls_labels"], window)
  counts = dict(lm_tokens=n_tok, cls_rows=jnp.sum(main), cls_window_rows=jnp.sum(window))
  denom = {k: jnp.maximum(v, 1.0) for k, v in (objective.counts or counts).items()}
  metrics = dict(lm_loss=lm_sum / denom["lm_tokens"],
                 cls_loss=main_nll / denom["cls_rows"],
                 cls_accuracy=main_correct / denom["cls_rows"],
                 cls_window_loss=window_nll / denom["cls_window_rows"],
                 cls_window_accuracy=window_correct / denom["cls_window_rows"], **counts)
  loss = (metrics["lm_loss"] + objective.cls_weight * metrics["cls_loss"]
          + objective.window_cls_weight * metrics["cls_window_loss"])
  return loss, dict(metrics, loss=loss)
