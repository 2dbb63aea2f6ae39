"""The optimizer: our scalar-factor global-norm clipping against optax's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from safety_align import optim, train_step as step_lib


def _grads(scale):
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.standard_normal((4, 3)) * scale, jnp.float32),
          "b": jnp.asarray(rng.standard_normal((3,)) * scale, jnp.float32)}


@pytest.mark.parametrize("scale", [0.0, 0.01, 1.0, 100.0])
def test_clip_matches_optax(scale):
  """Below the threshold (and at zero norm) the gradients pass unchanged; above, they are
  scaled to the threshold's norm, as optax.clip_by_global_norm does."""
  grads = _grads(scale)
  ours, _ = optim.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  ref, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  for k in grads:
    np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=0)
  norm = float(optax.global_norm(ours))
  assert norm == pytest.approx(min(float(optax.global_norm(grads)), 1.0), rel=1e-6)
  if scale <= 0.01:
    jax.tree.map(np.testing.assert_array_equal, ours, grads)


def test_optimizer_state_layout_unchanged():
  """The state tree is optax's own (clip state empty), so saved optimizer states load."""
  cfg = tiny.phase_config(steps=10, batch_size=2, cls_weight=0.1, lr=1e-3, split="pretrain")
  params = _grads(1.0)
  ours = optim.make_optimizer(cfg).init(params)
  ref = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                    optax.adamw(optim.learning_rate_schedule(cfg),
                                mask=optim.decay_mask)).init(params)
  assert jax.tree.structure(ours) == jax.tree.structure(ref)


def _update_bytes(tx, params) -> float:
  grads = jax.tree.map(jnp.ones_like, params)

  def update(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  compiled = jax.jit(update).lower(params, tx.init(params), grads).compile()
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]


def test_clipping_fuses_into_the_adamw_update():
  """The compiled update makes 11 passes over the parameter bytes: the norm reads the
  gradients; the two moment updates read a moment and the gradients each and write the
  moment; the parameter update reads both moments and the parameters and writes them.
  optax's clipping adds a clipped gradient copy (one write, and both moment updates read it
  besides the norm's read): 15 passes."""
  cfg = tiny.phase_config(steps=10, batch_size=2, cls_weight=0.1, lr=1e-3, split="pretrain")
  params = {f"w{i}": jnp.ones((256, 512), jnp.float32) for i in range(4)}
  nbytes = sum(x.nbytes for x in params.values())
  ours = _update_bytes(optim.make_optimizer(cfg), params)
  with_optax_clip = _update_bytes(optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(optim.learning_rate_schedule(cfg), mask=optim.decay_mask)), params)
  assert ours <= 11.5 * nbytes < with_optax_clip


def _train_steps(phase_updates, n=3):
  """Params after ``n`` SFT steps of the tiny model on one fixed batch."""
  from conftest import chat_segment, packed, tiny_model_config
  from safety_align import sharding
  cfg = tiny.phase_config(steps=10, batch_size=1, cls_weight=0.5, lr=1e-2, split="sft")
  cfg.grad_clip = 1e9  # the frozen zeros change the global norm; compare unclipped steps
  for k, v in phase_updates.items():
    cfg[k] = v
  model_cfg = tiny_model_config(scan_layers=True)
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1), devices=jax.devices()[:1])
  trainer = step_lib.Trainer(model_cfg, cfg, "sft", mesh)
  state = trainer.init_state(jax.random.key(0))
  start = jax.tree.map(np.asarray, state.params)
  batch = packed([chat_segment(), chat_segment(label=0, query=(13, 14))], seq_len=32)
  for _ in range(n):
    state, _ = trainer.step(state, batch)
  return start, jax.tree.map(np.asarray, state.params)


def test_trainable_subset_freezes_the_rest_exactly():
  """``trainable``: unmatched parameters stay bit-for-bit; matched ones take the same steps
  as under full training (Adam is per parameter); ``cls_lr_scale`` scales the [CLS] steps."""
  paths = lambda t: {optim.param_path(p): x  # noqa: E731
                     for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  start, full = map(paths, _train_steps({}, n=1))
  subset = paths(_train_steps({"trainable": "cls_|mlp"}, n=1)[1])
  subset3 = paths(_train_steps({"trainable": "cls_|mlp"}, n=3)[1])
  for name, x in subset.items():
    if "cls_" in name or "mlp" in name:
      np.testing.assert_allclose(x, full[name], rtol=1e-5, atol=1e-6)
      assert not np.array_equal(subset3[name], x), name
    else:
      np.testing.assert_array_equal(subset3[name], start[name])
  _, scaled = _train_steps({"cls_lr_scale": 0.0})
  scaled = paths(scaled)
  np.testing.assert_array_equal(scaled["cls_embed"], start["cls_embed"])
  assert not np.array_equal(scaled["embed"], start["embed"])
  with pytest.raises(ValueError, match="matches no parameter"):
    _train_steps({"trainable": "no_such_param"})
