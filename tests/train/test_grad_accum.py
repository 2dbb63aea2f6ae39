"""Gradient accumulation as a global token mean, and the main / window [CLS] terms normalised
separately (losses.py, train_step.Trainer)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import VOCAB, chat_segment, packed, tiny_model_config
from configs import tiny
from safety_align import losses, sharding, training_loop, train_step as step_lib
from safety_align.masks import Role

K, B, T = 3, 2, 32


def _micro_batches():
  """K micro-batches of B rows with very unequal target counts: long responses and window rows
  in the first, a single short pair in the last."""
  long_resp = tuple(range(20, 36))
  groups = [
      [chat_segment(response=long_resp, windows=[(0, 3, 1), (4, 7, 1), (8, 11, 0)]),
       chat_segment(response=long_resp, label=0, windows=[(0, 5, 0)])],
      [chat_segment(response=(20, 21)), chat_segment(query=(13, 14), response=(22, 23, 24),
                                                     label=0)],
      [chat_segment(response=(25,), label=0)],
  ]
  return [packed(g, seq_len=T, batch=B) for g in groups]


def _stack(batches):
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _trainer(grad_accum, batch_size, window_cls_weight=0.3):
  cfg = tiny.phase_config(steps=10, batch_size=batch_size, cls_weight=0.5, lr=1e-2, split="sft")
  cfg.update(grad_accum=grad_accum, window_cls_weight=window_cls_weight, warmup_steps=1)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:2])
  return step_lib.Trainer(tiny_model_config(scan_layers=True), cfg, "sft", mesh)


def _grads(trainer, params, stacked):
  with trainer.mesh:
    return jax.jit(trainer.loss_and_grads)(params, stacked)


def _rel(a, b):
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  den = sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))
  return (num / den) ** 0.5


def test_accumulated_step_equals_one_big_batch():
  """K micro-batches of unequal target counts give the loss, metrics, gradients and update of
  one K·B-row batch; optax.MultiSteps' mean of per-micro-batch means does not."""
  micro = _micro_batches()
  counts = [float(losses.term_counts(b, "sft")["lm_tokens"]) for b in micro]
  assert max(counts) > 5 * min(counts)
  accum, big = _trainer(K, B), _trainer(1, K * B)
  state = accum.init_state(jax.random.key(0))
  params = jax.tree.map(np.asarray, state.params)

  m_acc, g_acc = _grads(accum, params, _stack(micro))
  m_big, g_big = _grads(big, params, {k: v[None] for k, v in _concat(micro).items()})
  for key in m_big:
    np.testing.assert_allclose(m_acc[key], m_big[key], rtol=2e-6, err_msg=key)
  assert float(m_big["cls_window_rows"]) == 4 and float(m_big["cls_rows"]) == 5
  assert _rel(g_acc, g_big) < 1e-5

  per_micro = [_grads(big, params, {k: v[None] for k, v in b.items()})[1] for b in micro]
  multisteps = jax.tree.map(lambda *g: sum(g) / K, *per_micro)
  assert _rel(multisteps, g_big) > 0.1

  state_big = big.init_state(jax.random.key(0))
  state, metrics = accum.step(state, _stack(micro))
  state_big, metrics_big = big.step(state_big, _concat(micro))
  assert int(state.step) == 1
  np.testing.assert_allclose(metrics["grad_norm"], metrics_big["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               state.params, state_big.params)


def test_step_checks_the_micro_batch_axis():
  accum = _trainer(K, B)
  state = accum.init_state(jax.random.key(0))
  with pytest.raises(ValueError, match=r"grad_accum=3: a step takes 3 micro-batches .*got one "
                                       r"\[B, T\] batch"):
    accum.step(state, _micro_batches()[0])
  with pytest.raises(ValueError, match="got 2 micro-batches"):
    accum.step(state, _stack(_micro_batches()[:2]))


def test_micro_batches_are_consecutive_pipeline_batches():
  class Numbered:
    def batch(self, k):
      return {"tokens": np.full((B, T), k)}
  out = step_lib.micro_batches(Numbered(), step=4, k=3)
  assert out["tokens"].shape == (3, B, T)
  np.testing.assert_array_equal(out["tokens"][:, 0, 0], [12, 13, 14])


def test_resume_with_another_grad_accum_is_refused():
  training_loop._check_data_position("sft", 5, 3, dict(data_position=15))  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"data position 10 .*grad_accum=3 resumes at 15: set "
                                       r"grad_accum back to 2"):
    training_loop._check_data_position("sft", 5, 3, dict(data_position=10))  # pylint: disable=protected-access


def _random_logits(batch, seed=0):
  rng = np.random.default_rng(seed)
  shape = batch["tokens"].shape
  return (jnp.asarray(rng.standard_normal(shape + (VOCAB,)), jnp.float32),
          jnp.asarray(3 * rng.standard_normal(shape + (2,)), jnp.float32))


def _nll(cls_logits, labels, rows):
  logp = jax.nn.log_softmax(cls_logits[rows], axis=-1)
  return -np.asarray(jnp.take_along_axis(logp, labels[rows][:, None], axis=-1))[:, 0]


def test_main_and_window_cls_terms_are_separate_means():
  """L = L_lm + λ·mean(main [CLS] rows) + λ_w·mean(window rows), not λ·mean(all rows): with 2
  main rows and 4 window rows, the pooled mean would give the main rows a third of λ."""
  batch = _micro_batches()[0]
  lm_logits, cls_logits = _random_logits(batch)
  labels = batch["cls_labels"]
  is_cls = (batch["roles"] == Role.CLS) & (labels >= 0)
  window = is_cls & (batch["cls_window"][..., 0] <= batch["cls_window"][..., 1])
  main = is_cls & ~window
  assert main.sum() == 2 and window.sum() == 4
  main_nll, window_nll = _nll(cls_logits, labels, main), _nll(cls_logits, labels, window)
  loss, m = losses.total_loss(lm_logits, cls_logits, batch, "sft",
                              losses.Objective(cls_weight=0.5, window_cls_weight=0.2))
  np.testing.assert_allclose(m["cls_loss"], main_nll.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["cls_window_loss"], window_nll.mean(), rtol=1e-6)
  np.testing.assert_allclose(loss, m["lm_loss"] + 0.5 * main_nll.mean() + 0.2 * window_nll.mean(),
                             rtol=1e-6)
  pooled = m["lm_loss"] + 0.5 * np.concatenate([main_nll, window_nll]).mean()
  assert abs(float(loss) - float(pooled)) > 1e-2
  # A float λ weighs both terms alike; λ_w = 0 gives the window rows no gradient.
  np.testing.assert_allclose(
      losses.total_loss(lm_logits, cls_logits, batch, "sft", 0.5)[0],
      m["lm_loss"] + 0.5 * (main_nll.mean() + window_nll.mean()), rtol=1e-6)
  grad = jax.grad(lambda c: losses.total_loss(
      lm_logits, c, batch, "sft", losses.Objective(0.5, 0.0))[0])(cls_logits)
  assert np.all(np.asarray(grad)[window] == 0) and np.all(np.abs(np.asarray(grad)[main]) > 0)


def test_term_counts_and_global_denominators_sum_over_micro_batches():
  """Each micro-batch's terms divided by the counts of all of them add up to the big batch's
  means, every term (token or row mean) alike."""
  micro = _micro_batches()
  big = _concat(micro)
  counts = losses.term_counts(_stack(micro), "sft")
  for key, value in losses.term_counts(big, "sft").items():
    assert float(counts[key]) == float(value)
  logits = [_random_logits(b, seed=i) for i, b in enumerate(micro)]
  objective = losses.Objective(0.5, 0.2, counts)
  parts = [losses.total_loss(lm, c, b, "sft", objective)[1] for (lm, c), b in zip(logits, micro)]
  ref = losses.total_loss(jnp.concatenate([lm for lm, _ in logits]),
                          jnp.concatenate([c for _, c in logits]), big, "sft",
                          losses.Objective(0.5, 0.2))[1]
  for key in ref:
    np.testing.assert_allclose(sum(p[key] for p in parts), ref[key], rtol=1e-5, err_msg=key)


def test_window_cls_weight_config_checks():
  config = tiny.get_config("smoke")
  assert step_lib.objective(config.sft) == (config.sft.cls_weight, config.sft.cls_weight)
  config.sft.window_cls_weight = -1.0
  with pytest.raises(ValueError, match=r"config.sft.window_cls_weight=-1.0: expected a number "
                                       r">= 0"):
    training_loop.check_config(config)
  config.sft = ml_collections.ConfigDict(
      {k: v for k, v in config.sft.items() if k != "window_cls_weight"})
  assert ("add window_cls_weight=... to the config file's phase block (default: its "
          "cls_weight)") in training_loop.unknown_key(config, "sft.window_cls_weight")
  assert "has no field 'window_cls_wieght'" in training_loop.unknown_key(config,
                                                                         "sft.window_cls_wieght")


def test_loss_entry_checks_ranks_dtypes_and_shapes():
  """``total_loss`` / ``lm_targets`` refuse mismatched [B, T] inputs, wrong ranks and dtypes."""
  batch = _micro_batches()[0]
  lm_logits, cls_logits = _random_logits(batch)
  losses.total_loss(lm_logits, cls_logits, batch, "sft", 0.5)
  bad = [
      ((lm_logits[:, :-1], cls_logits, batch), "shape"),  # T - 1 logits
      ((lm_logits, cls_logits[..., :1], batch), "dimension"),  # one class
      ((lm_logits.astype(jnp.int32), cls_logits, batch), "type"),
      ((lm_logits, cls_logits, dict(batch, roles=batch["roles"][:, :-1])), "shape"),
      ((lm_logits, cls_logits, dict(batch, tokens=batch["tokens"].astype(np.float32))), "type"),
      ((lm_logits, cls_logits, dict(batch, lm_mask=batch["lm_mask"].astype(np.int32))), "type"),
      ((lm_logits, cls_logits, dict(batch, segment_ids=batch["segment_ids"][0])), "rank"),
      ((lm_logits, cls_logits, dict(batch, cls_window=batch["cls_window"][..., 0])), "rank"),
  ]
  for args, what in bad:
    with pytest.raises(AssertionError, match=what):
      losses.total_loss(*args, "sft", 0.5)
