"""Pure statistics of the reports: Wilson intervals of proportions, AUROC and its interval, and
a binary classifier's figures at a threshold (numpy only; no model, no evaluation state)."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def wilson(p: float, n: int, z: float = Z95) -> list[float] | None:
  """Wilson score interval [lo, hi] of a proportion ``p`` of ``n``; None without data."""
  if not n or not math.isfinite(p):
    return None
  d = 1 + z * z / n
  center = (p + z * z / (2 * n)) / d
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
  return [max(0.0, center - half), min(1.0, center + half)]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
  """P(a positive outranks a negative), ties half; ``scores`` and ``labels`` (0/1) are [n]."""
  pos, neg = scores[labels == 1], scores[labels == 0]
  if not len(pos) or not len(neg):
    return float("nan")
  return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def auroc_interval(a: float, n_pos: int, n_neg: int, z: float = Z95) -> list[float] | None:
  """Hanley & McNeil's (1982) interval [lo, hi] of an AUROC ``a`` over ``n_pos`` positives
  and ``n_neg`` negatives (its exponential-scores approximation); None without data."""
  if not n_pos or not n_neg or not math.isfinite(a):
    return None
  q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
  var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
  half = z * math.sqrt(max(var, 0.0))
  return [max(0.0, a - half), min(1.0, a + half)]


def classifier_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
  """AUROC, accuracy (Wilson interval), F1 and counts of ``probs`` [n] > ``threshold`` against
  ``labels`` [n] (1 = malicious)."""
  pred = probs > threshold
  tp = float(np.sum(pred & (labels == 1)))
  precision = tp / max(pred.sum(), 1)
  recall = tp / max((labels == 1).sum(), 1)
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  accuracy = float(np.mean(pred == labels)) if len(labels) else float("nan")
  return dict(auroc=auroc(probs, labels), accuracy=accuracy,
              accuracy_ci=wilson(accuracy, len(labels)), f1=float(f1), n=int(len(labels)),
              n_malicious=int((labels == 1).sum()), n_benign=int((labels == 0).sum()))


def missing(x) -> bool:
  """``x`` is no number to report: None, NaN or infinite."""
  return x is None or (isinstance(x, float) and not math.isfinite(x))
