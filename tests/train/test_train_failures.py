"""Training stops loudly, never saving what it cannot trust: a non-finite loss stops the run
before its checkpoint (the error names the step and the last good checkpoint), Ctrl-C saves and
the same command resumes, and bad config values get a sentence."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import smoke_config
from safety_align import checkpoint, losses, training_loop
from safety_align.data import pipeline


def test_nan_loss_stops_before_any_non_finite_checkpoint(trained, tmp_path, monkeypatch):
  """A batch that makes the loss (and gradients) NaN at step 3 of 6: the error names step 3
  and the last good checkpoint (step 2); nothing after it is saved."""
  total_loss, batch = losses.total_loss, pipeline.Pipeline.batch

  def poisoned_loss(lm_logits, cls_logits, b, phase, weight):
    loss, metrics = total_loss(lm_logits, cls_logits, b, phase, weight)
    loss = loss * jnp.where((b["cls_labels"] == 7).any(), jnp.nan, 1.0)
    return loss, dict(metrics, loss=loss)

  def poisoned_batch(self, k):
    out = batch(self, k)
    if k == 2:
      out["cls_labels"] = out["cls_labels"].copy()
      out["cls_labels"][0, 0] = 7  # row 0 starts with a document's [CLS]
    return out

  monkeypatch.setattr(losses, "total_loss", poisoned_loss)
  monkeypatch.setattr(pipeline.Pipeline, "batch", poisoned_batch)
  with pytest.raises(checkpoint.NonFiniteError,
                     match=r"pretrain step 3: loss nan, grad_norm nan.*Last good checkpoint: "
                           r"step 2 \(.*pretrain/2\)"):
    training_loop.train(smoke_config("pretrain", steps=6, like=trained), str(tmp_path))
  assert checkpoint.saved_steps(tmp_path, "pretrain") == [1, 2]  # orbax saves a run's first
  params, meta, _ = checkpoint.latest_params(str(tmp_path), ("pretrain",))
  assert meta["step"] == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))

  ckpt = checkpoint.PhaseCheckpointer(str(tmp_path), "sft", every_steps=1, keep=1,
                                      async_save=False)
  with pytest.raises(checkpoint.NonFiniteError, match="Refusing to save sft step 1: NaN or Inf "
                                                      "in params/w"):
    ckpt.save(1, {"w": jnp.array([1.0, jnp.nan])}, {}, {"step": 1}, force=True)
  ckpt.close()
  assert checkpoint.saved_steps(tmp_path, "sft") == []


def test_sigint_saves_and_the_run_resumes(trained, tmp_path, monkeypatch):
  batch = pipeline.Pipeline.batch

  def interrupting(self, k):
    if k == 2:
      os.kill(os.getpid(), signal.SIGINT)
    return batch(self, k)

  monkeypatch.setattr(pipeline.Pipeline, "batch", interrupting)
  with pytest.raises(training_loop.Interrupted, match=r"pretrain: SIGINT at step 3/6: saved "
                                                  r".*pretrain/3; rerun the same command"):
    training_loop.train(smoke_config("pretrain", steps=6, like=trained), str(tmp_path))
  assert checkpoint.saved_steps(tmp_path, "pretrain") == [2, 3]  # keep=2
  monkeypatch.setattr(pipeline.Pipeline, "batch", batch)
  training_loop.train(smoke_config("pretrain", steps=6, like=trained), str(tmp_path))
  rows = [r["step"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]
  assert rows == [2, 4, 6]


def test_config_checks():
  for field, value, match in [("pretrain.steps", -1, r"config\.pretrain\.steps=-1"),
                              ("sft.batch_size", 0, r"config\.sft\.batch_size=0"),
                              ("data.overlong", "cut", r"overlong='cut': expected one of")]:
    config = smoke_config()
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ValueError, match=match):
      training_loop.check_config(config)
  config = smoke_config()
  config.sft.batch_size = 4
  with pytest.raises(ValueError, match=r"config\.sft\.batch_size=4 is not divisible by the 8 "
                                       "data-parallel devices"):
    training_loop.check_config(config)
  assert training_loop.unknown_key(config, "model.d_model") is None
  assert training_loop.unknown_key(config, "model.d_modle") == (
      "--config.model.d_modle: config.model has no field 'd_modle'; did you mean "
      "config.model.d_model?")
