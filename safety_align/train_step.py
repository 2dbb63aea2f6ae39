"""The sharded train state and the jitted train step of one phase (``Trainer``). Gradient
accumulation: ``phase.steps`` counts optimiser steps (so do the checkpoint and log intervals);
step ``s`` takes the ``grad_accum`` micro-batches ``s·k .. s·k + k - 1`` of ``batch_size`` rows
at once (``[k, B, T]``), counts each loss term's targets over all of them, scans the
micro-batches summing the gradients of ``term sum / global count`` and makes one update: every
term is a mean over the whole accumulated batch, as for one batch of ``k·B`` rows (not
``optax.MultiSteps``' mean of per-micro-batch means).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from safety_align import losses, sharding
from safety_align.data import packing
from safety_align.masks import check_phase
from safety_align.model import ModelConfig, Transformer, forward_batch, init_params
from safety_align.optim import make_optimizer, trainable_mask

FINITE = "all_finite"  # metrics key: whether the step's loss and gradient norm are finite


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def objective(phase_cfg) -> tuple[float, float]:
  """(λ of the main [CLS] term, λ_w of the window [CLS] term) of a phase; ``window_cls_weight``
  defaults to ``cls_weight``."""
  return phase_cfg.cls_weight, phase_cfg.get("window_cls_weight", phase_cfg.cls_weight)


@contextlib.contextmanager
def mesh_context(mesh, rules: tuple | None = None):
  """Trace the model sharded over ``mesh``: ``jax.set_mesh`` and ``rules`` (default
  ``sharding.RULES``), so every
  logical constraint of ``model.py`` (activations; parameters at init) reaches XLA. Flax finds
  the mesh through ``jax.sharding.get_abstract_mesh()``, which a bare ``with mesh:`` leaves
  empty: the constraints would then be silently dropped."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES if rules is None else rules):
    yield


class Trainer:
  """Sharded init, the jitted train step and its shardings for one phase.

  The step takes ``grad_accum`` micro-batches stacked on a leading axis (``[k, B, T]``
  arrays, rows sharded as a batch's) and makes one optimiser update (module docstring).
  ``rules``: the logical-axis rules (default ``sharding.RULES``).
  """

  def __init__(self, model_cfg: ModelConfig, phase_cfg, phase: str, mesh,
               rules: tuple = sharding.RULES):
    check_phase(phase)
    self.model_cfg, self.phase_cfg, self.phase, self.mesh = model_cfg, phase_cfg, phase, mesh
    self.rules = rules
    self.grad_accum = phase_cfg.get("grad_accum", 1)
    self.model = Transformer(model_cfg)
    self.tx = make_optimizer(phase_cfg)
    boxed = jax.eval_shape(functools.partial(init_params, model_cfg), jax.random.key(0))
    self.param_shardings = sharding.logical_sharding(boxed, mesh, rules)
    abstract_params = nn.meta.unbox(boxed)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    self.opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh))
    self.state_shardings = TrainState(step=sharding.replicated(mesh),
                                      params=self.param_shardings,
                                      opt_state=self.opt_shardings)
    self.abstract_params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_params, self.param_shardings)
    self.abstract_opt = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_opt, self.opt_shardings)
    self.batch_sharding = sharding.batch_sharding(mesh)  # one [B, ...] micro-batch
    # [k, B, ...]: the micro-batch axis unsharded, rows as a batch's.
    self.micro_batches_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, *self.batch_sharding.spec))
    self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings,
                                                         self.micro_batches_sharding),
                         out_shardings=(self.state_shardings, sharding.replicated(mesh)),
                         donate_argnums=(0,))

  def init_state(self, rng, params=None) -> TrainState:
    """A fresh state, initialised sharded (never whole on one host), or from ``params``."""
    with mesh_context(self.mesh, self.rules):
      if params is None:
        params = jax.jit(lambda r: nn.meta.unbox(init_params(self.model_cfg, r)),
                         out_shardings=self.param_shardings)(rng)
      else:
        params = jax.device_put(params, self.param_shardings)
      opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32),
                                          sharding.replicated(self.mesh)),
                      params=params, opt_state=opt_state)

  def abstract_state(self) -> TrainState:
    """The state as sharded ``ShapeDtypeStruct``s (for ``lower`` without any allocation)."""
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32,
                                                sharding=sharding.replicated(self.mesh)),
                      params=self.abstract_params, opt_state=self.abstract_opt)

  def abstract_batch(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """One step's micro-batches (``[grad_accum, batch_size, seq_len]``, packing's dtypes) as
    sharded ``ShapeDtypeStruct``s."""
    shape = (self.grad_accum, batch_size, seq_len)
    out = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.micro_batches_sharding)
           for k in packing.BATCH_KEYS}
    out["lm_mask"] = jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=self.micro_batches_sharding)
    out["cls_window"] = jax.ShapeDtypeStruct(shape + (2,), jnp.int32,
                                             sharding=self.micro_batches_sharding)
    return out

  def lower(self, batch_size: int, seq_len: int):
    """The sharded train step lowered for ``batch_size`` rows of ``seq_len`` per micro-batch
    (``.compile().memory_analysis()`` is the compiler's per-device memory)."""
    with mesh_context(self.mesh, self.rules):
      return self._step.lower(self.abstract_state(), self.abstract_batch(batch_size, seq_len))

  def _loss(self, params, batch, counts):
    lm_logits, cls_logits = forward_batch(self.model, params, batch, self.phase)
    cls_weight, window_cls_weight = objective(self.phase_cfg)
    return losses.total_loss(lm_logits, cls_logits, batch, self.phase,
                             losses.Objective(cls_weight, window_cls_weight, counts))

  def _grads(self, params, batch, counts):
    """(metrics, gradients) of one micro-batch, each term divided by ``counts``; frozen
    parameters get zeros, their gradient never computed."""
    if not self.phase_cfg.get("trainable", ""):
      (_, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(params, batch, counts)
      return metrics, grads
    mask = trainable_mask(params, self.phase_cfg.trainable)
    train = jax.tree.map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    merge = lambda t: jax.tree.map(lambda m, a, b: a if m else b, mask, t, frozen,  # noqa: E731
                                   is_leaf=lambda x: x is None)
    (_, metrics), grads = jax.value_and_grad(
        lambda t: self._loss(merge(t), batch, counts), has_aux=True)(train)
    return metrics, jax.tree.map(lambda m, g, p: g if m else jnp.zeros_like(p), mask, grads,
                                 params, is_leaf=lambda x: x is None)

  def loss_and_grads(self, params, micro_batches):
    """(metrics, gradients) of one optimiser step's ``[k, B, ...]`` micro-batches: every loss
    term a mean over all ``k·B`` rows (``losses.term_counts`` first), the gradients summed over
    a ``lax.scan`` of the micro-batches in float32. Metrics as ``losses.total_loss``'s, of the
    whole accumulated batch."""
    counts = losses.term_counts(micro_batches, self.phase)
    if self.grad_accum == 1:
      return self._grads(params, jax.tree.map(lambda x: x[0], micro_batches), counts)

    def body(acc, batch):
      metrics, grads = self._grads(params, batch, counts)
      acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
      return acc, metrics
    acc = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    acc = jax.lax.with_sharding_constraint(acc, self.param_shardings)
    acc, metrics = jax.lax.scan(body, acc, micro_batches)
    grads = jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
    return jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics), grads

  def _train_step(self, state: TrainState, micro_batches):
    metrics, grads = self.loss_and_grads(state.params, micro_batches)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics[FINITE] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def step(self, state: TrainState, batch: dict[str, np.ndarray]):
    """One optimiser step on numpy arrays (this host's rows): ``[k, B, T]`` micro-batches
    (``k = grad_accum``), or, with ``grad_accum`` 1, one ``[B, T]`` batch."""
    k = batch["tokens"].shape[0] if batch["tokens"].ndim == 3 else None
    if k is None and self.grad_accum == 1:
      batch = {key: v[None] for key, v in batch.items()}
    elif k != self.grad_accum:
      got = "one [B, T] batch" if k is None else f"{k} micro-batches"
      raise ValueError(f"config.{self.phase}.grad_accum={self.grad_accum}: a step takes "
                       f"{self.grad_accum} micro-batches stacked as [k, B, T] arrays, got "
                       f"{got}: stack them (trainer.micro_batches) or set grad_accum.")
    with mesh_context(self.mesh, self.rules):
      batch = {key: _global_array(v, self.micro_batches_sharding) for key, v in batch.items()}
      return self._step(state, batch)


def micro_batches(pipeline, step: int, k: int) -> dict[str, np.ndarray]:
  """The ``k`` micro-batches of optimiser step ``step`` (pipeline batches ``step·k`` to
  ``step·k + k - 1``), stacked: ``[k, B, ...]``."""
  batches = [pipeline.batch(step * k + i) for i in range(k)]
  return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def _global_array(local: np.ndarray, sharding_: jax.sharding.NamedSharding) -> jax.Array:
  if jax.process_count() == 1:
    return jax.device_put(local, sharding_)
  return jax.make_array_from_process_local_data(sharding_, local)

