"""Samplers: greedy limits, the top-k / top-p supports and frequencies, per-row seeding, and
reproducible sampled decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config, tiny_params
from safety_align.decode import Decoder, GateConfig, Greedy, Prompts, make_sampler
from safety_align.decode.sampling import argmax, row_keys
from safety_align.masks import Role

V, DRAWS = 16, 4000


@pytest.fixture(scope="module")
def logits():
  return jax.random.normal(jax.random.key(1), (V,)) * 2.0


def _draws(sampler, logits, seed=0):
  """DRAWS samples from one row of logits (a batch of DRAWS identical rows)."""
  keys = row_keys(seed, jnp.arange(DRAWS), 0)
  return np.asarray(jax.jit(sampler.__call__)(jnp.tile(logits, (DRAWS, 1)), keys))


def _freq(draws):
  return np.bincount(draws, minlength=V) / len(draws)


def _target(logits, keep):
  p = np.where(keep, np.exp(np.asarray(logits, np.float64)), 0.0)
  return p / p.sum()


def test_argmax_equals_jnp_argmax_on_ties_nan_and_inf():
  rows = np.array([[0., 3., 1., 3.],  # tie: the first maximum
                   [-np.inf] * 4,  # all -inf: index 0
                   [1., np.nan, 5., np.nan],  # NaN: the first NaN
                   [-np.inf, 2., np.inf, np.inf],
                   [-7., -2., -2., -9.]], np.float32)
  rows = np.concatenate([rows, np.asarray(jax.random.normal(jax.random.key(0), (3, 4)))])
  np.testing.assert_array_equal(jax.jit(argmax)(rows), jnp.argmax(rows, axis=-1))


@pytest.mark.parametrize("settings", [dict(top_k=1), dict(top_p=1e-6),
                                      dict(top_k=3, top_p=1e-6)])
def test_degenerate_filters_equal_greedy(logits, settings):
  greedy = int(np.argmax(logits))
  assert set(_draws(make_sampler(temperature=1.5, **settings), logits)) == {greedy}
  assert int(Greedy()(logits[None], None)[0]) == greedy


@pytest.mark.parametrize("k", [2, 5])
def test_top_k_support_and_frequencies(logits, k):
  draws = _draws(make_sampler(temperature=1.0, top_k=k), logits)
  top = set(np.argsort(-np.asarray(logits))[:k].tolist())
  assert set(draws.tolist()) == top
  np.testing.assert_allclose(_freq(draws), _target(logits, np.isin(np.arange(V), list(top))),
                             atol=0.03)


def test_top_p_is_the_nucleus(logits):
  p = np.asarray(jax.nn.softmax(logits), np.float64)
  order = np.argsort(-p)
  top_p = float(p[order[:3]].sum() - 1e-4)  # the 3 most likely tokens reach it, 2 do not
  draws = _draws(make_sampler(temperature=1.0, top_p=top_p), logits)
  assert set(draws.tolist()) == set(order[:3].tolist())
  np.testing.assert_allclose(_freq(draws), _target(logits, np.isin(np.arange(V), order[:3])),
                             atol=0.03)


def test_temperature_flattens(logits):
  draws = _draws(make_sampler(temperature=2.0), logits)
  np.testing.assert_allclose(_freq(draws), _target(np.asarray(logits) / 2.0, np.ones(V, bool)),
                             atol=0.03)


def test_seeds_rows_and_steps():
  sampler = make_sampler(temperature=1.0)
  flat = jnp.zeros((4, 1000))  # uniform: any difference is the key's

  def draw(seed, rows, step):
    return np.asarray(sampler(flat, row_keys(seed, jnp.asarray(rows), step)))

  np.testing.assert_array_equal(draw(0, [0, 1, 2, 3], 5), draw(0, [0, 1, 2, 3], 5))
  np.testing.assert_array_equal(draw(0, [2, 2, 2, 2], 5), [draw(0, [0, 1, 2, 3], 5)[2]] * 4)
  assert (draw(0, [0, 1, 2, 3], 5) != draw(1, [0, 1, 2, 3], 5)).any()
  assert (draw(0, [0, 1, 2, 3], 5) != draw(0, [0, 1, 2, 3], 6)).any()


def test_sampler_errors():
  for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-2),
              dict(top_k=1.5)):
    with pytest.raises(ValueError):
      make_sampler(**bad)


def test_sampled_decoding_is_reproducible():
  cfg = tiny_model_config()
  params = tiny_params(cfg)
  dec = Decoder(cfg)
  prompts = Prompts.from_pieces([[([1], Role.BOS), ([10, 11, 12], Role.QUERY)]] * 2)
  gate = GateConfig(schedule="off")

  def run(seed, **settings):
    return dec(params, prompts, max_new_tokens=16, gate=gate, seed=seed,
               sampler=make_sampler(**settings)).tokens

  a = run(0, temperature=1.0)
  np.testing.assert_array_equal(a, run(0, temperature=1.0))
  assert (a[0] != a[1]).any()  # same prompt, other row: other draws
  assert (a != run(1, temperature=1.0)).any()
  greedy = dec(params, prompts, max_new_tokens=16, gate=gate).tokens
  np.testing.assert_array_equal(run(3, temperature=0.7, top_k=1), greedy)
