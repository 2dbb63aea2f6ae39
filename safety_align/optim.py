"""The optimiser of one training phase: AdamW (weight decay on matrices only) with a warmup +
cosine, step or constant learning-rate schedule, global-norm clipping as one scalar factor, and
per-parameter learning-rate factors (``trainable`` freezes what it does not match,
``cls_lr_scale`` scales the [CLS] branch's parameters). It makes one update per optimiser step;
``train_step.Trainer`` accumulates the gradients.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "step", "constant")


def learning_rate_schedule(phase_cfg) -> optax.Schedule:
  """Warmup + cosine, the paper's step decay (x0.1 at 50% and 75%), or constant."""
  if phase_cfg.schedule not in SCHEDULES:
    raise ValueError(f"schedule={phase_cfg.schedule!r}: expected one of {SCHEDULES}.")
  lr, steps, warmup = phase_cfg.lr, max(phase_cfg.steps, 1), phase_cfg.warmup_steps
  if phase_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * phase_cfg.end_lr_fraction)
  warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
  if phase_cfg.schedule == "step":
    main = optax.piecewise_constant_schedule(
        lr, {max(steps // 2 - warmup, 1): 0.1, max(3 * steps // 4 - warmup, 2): 0.1})
  else:
    main = optax.constant_schedule(lr)
  return optax.join_schedules([warm, main], [warmup])


def decay_mask(params):
  """Weight decay on matrices only: not on norms, biases or (CLS) embeddings."""
  def keep(path, leaf):
    names = [getattr(p, "key", str(p)) for p in path]
    return leaf.ndim >= 2 and not {"embed", "cls_embed"} & set(names)
  return jax.tree_util.tree_map_with_path(keep, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """``optax.clip_by_global_norm`` as one scalar factor, g * min(1, max_norm / ||g||).

  The same clipping (and the same empty state), but a multiply by a scalar fuses into
  AdamW's moment updates, where optax's per-element select-and-divide is written out as a
  clipped copy of the gradients: on XLA:CPU that copy made the 125M model's optimizer update
  2.2x slower (7.5 vs 5.5 GB accessed, ``bench/train.py`` optimizer_update_s).
  """
  def update(updates, state, params=None):
    del params
    factor = jnp.minimum(1.0, max_norm / optax.global_norm(updates))  # norm 0: 1
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


CLS_PARAM_NAMES = ("cls_embed", "cls_head", "cls_gate")  # what the [CLS] branch adds


def param_path(path) -> str:
  """A ``tree_map_with_path`` key path as ``"layers/attn/q_proj/kernel"``."""
  return "/".join(str(getattr(p, "key", p)) for p in path)


def trainable_mask(params, pattern: str):
  """Tree of bools: the parameters whose path matches the regex ``pattern`` (``re.search``;
  "" = all). Raises if it matches none."""
  if not pattern:
    return jax.tree.map(lambda _: True, params)
  regex = re.compile(pattern)
  mask = jax.tree_util.tree_map_with_path(lambda p, _: bool(regex.search(param_path(p))),
                                          params)
  if not any(jax.tree.leaves(mask)):
    names = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    raise ValueError(f"config.<phase>.trainable={pattern!r} matches no parameter; paths look "
                     f"like {names[:4]}.")
  return mask


def scale_by_path(factor) -> optax.GradientTransformation:
  """Multiply each update by ``factor(path)`` (0 freezes a parameter exactly: no step and no
  weight decay)."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda p, u: u * jnp.asarray(factor(param_path(p)), u.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(phase_cfg) -> optax.GradientTransformation:
  """AdamW + clipping, one update per optimiser step (``Trainer`` accumulates the gradients).

  ``phase_cfg.trainable`` (a regex over parameter paths, "" = all) freezes the rest, and
  ``phase_cfg.cls_lr_scale`` multiplies the learning rate of the parameters the [CLS]
  branch adds (freshly initialised in an imported model, so they need a larger step than
  the pretrained weights' fine-tuning rate)."""
  pattern = phase_cfg.get("trainable", "")
  regex = re.compile(pattern) if pattern else None
  cls_scale = phase_cfg.get("cls_lr_scale", 1.0)

  def factor(path: str) -> float:
    if regex is not None and not regex.search(path):
      return 0.0
    return cls_scale if set(path.split("/")) & set(CLS_PARAM_NAMES) else 1.0

  tx = optax.chain(
      clip_by_global_norm(phase_cfg.grad_clip),
      optax.adamw(learning_rate_schedule(phase_cfg), b1=phase_cfg.b1, b2=phase_cfg.b2,
                  weight_decay=phase_cfg.weight_decay, mask=decay_mask))
  if regex is not None or cls_scale != 1.0:
    tx = optax.chain(tx, scale_by_path(factor))
  return tx
