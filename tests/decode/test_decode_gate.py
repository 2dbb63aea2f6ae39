"""The gate's functions one call at a time (state transitions, windows, schedules, settings)
and the window mask the decoder builds from the cache metadata (rule 4). The gate as the
compiled decoder drives it: tests/decode/test_decode_gate_compiled.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from safety_align.decode import gate as g
from safety_align.decode.cache import DecodeState, prompt_pass_inputs, window_mask
from safety_align.masks import Role


def _arrays(**kw):
  return g.GateConfig(**kw).arrays(32)


def test_update_transitions_and_windows():
  """Rules 2 and 3 on one row's state: an alarm at step 4 anchors S_t = 3 and opens a
  suspicion (window [S_t - r2, S_t + r3], re-evaluated every step); a benign re-evaluation
  is a false alarm (rule 2 again); tau consecutive alarms confirm (the insertion is decided)
  and the window stays."""
  cfg = _arrays(schedule="periodic", period=4, r2=2, r3=1, tau=2)
  one = jnp.array([True])
  state = g.init(cfg, jnp.array([0.1]))
  assert int(state.mode[0]) == g.SLIDING and int(state.insert_idx[0]) == -1
  assert [bool(g.due(cfg, state, n, one)[0]) for n in range(1, 9)] == [
      n % 4 == 0 for n in range(1, 9)]
  assert tuple(int(x[0]) for x in g.window(cfg, state, 4)) == (0, 2, 3)
  state = g.update(cfg, state, one, jnp.array([0.9]), 4)
  assert (int(state.mode[0]), int(state.anchor[0]), int(state.streak[0])) == (g.SUSPECT, 3, 1)
  assert bool(g.due(cfg, state, 5, one)[0]) and not bool(g.due(cfg, state, 5, ~one)[0])
  assert tuple(int(x[0]) for x in g.window(cfg, state, 5)) == (0, 1, 4)
  cleared = g.update(cfg, state, one, jnp.array([0.2]), 5)
  assert (int(cleared.mode[0]), int(cleared.anchor[0]), int(cleared.streak[0])) == (
      g.SLIDING, -1, 0)
  assert tuple(int(x[0]) for x in g.window(cfg, cleared, 8)) == (0, 6, 7)
  confirmed = g.update(cfg, state, one, jnp.array([0.9]), 5)
  assert int(confirmed.mode[0]) == g.CONFIRMED and bool(confirmed.triggered[0])
  assert int(confirmed.insert_idx[0]) == 0
  assert tuple(int(x[0]) for x in g.window(cfg, confirmed, 9)) == (0, 1, 4)
  assert not bool(g.due(cfg, confirmed, 6, one)[0])  # back to the schedule
  again = g.update(cfg, confirmed, one, jnp.array([0.1]), 8)  # no transition once confirmed
  assert int(again.mode[0]) == g.CONFIRMED and int(again.anchor[0]) == 3


def test_rule_1_window_and_low_reliance():
  cfg = _arrays(r1=5, reliance="low")
  state = g.init(cfg, jnp.array([0.8]))
  assert int(state.mode[0]) == g.QUERY and not bool(state.triggered[0])
  assert tuple(int(x[0]) for x in g.window(cfg, state, 12)) == (1, 0, 4)
  medium = g.init(_arrays(r1=5), jnp.array([0.8]))
  assert bool(medium.triggered[0]) and int(medium.insert_idx[0]) == 0


@pytest.mark.parametrize("schedule,expected", [
    ("off", []), ("first", []), ("every", list(range(1, 31))),
    ("periodic", [10, 20, 30]), ("annealing", [1, 2, 3, 5, 8, 12, 18, 27])])
def test_schedule_steps(schedule, expected):
  cfg = g.GateConfig(schedule=schedule)
  assert np.nonzero(g.schedule_steps(cfg, 30))[0].tolist() == expected


def test_annealing_stops():
  steps = np.nonzero(g.schedule_steps(g.GateConfig(), 500))[0].tolist()
  assert steps == [1, 2, 3, 5, 8, 12, 18, 27, 41, 62]
  custom = g.GateConfig(anneal_growth=2.0, anneal_stop=20)
  assert np.nonzero(g.schedule_steps(custom, 500))[0].tolist() == [1, 2, 4, 8, 16]


def test_config_errors():
  with pytest.raises(ValueError, match="Unknown gate 'sometimes'.*annealing"):
    g.GateConfig(schedule="sometimes")
  with pytest.raises(ValueError, match="Unknown reliance 'max'.*medium"):
    g.GateConfig(reliance="max")
  with pytest.raises(ValueError, match="tau"):
    g.GateConfig(tau=0)


def test_window_mask_never_reads_rule4_tokens():
  """The decoder's [CLS] window row over real prompt-pass metadata: with a window covering
  every position, only QUERY (rule 1) and RESPONSE keys, and the row's own slot, are visible."""
  ids = np.array([[0, 0, 1, 3, 4, 10, 11, 12, 5]], np.int32)  # pads BOS template query template
  roles = np.array([[0, 0, Role.BOS, Role.TEMPLATE, Role.TEMPLATE, Role.QUERY, Role.QUERY,
                     Role.QUERY, Role.TEMPLATE]], np.int32)
  _, rls, pos, _ = prompt_pass_inputs(64, jnp.asarray(ids), jnp.asarray(roles), jnp.array([7]),
                                      True)
  rls = jnp.concatenate([rls, jnp.full((1, 4), Role.RESPONSE, jnp.int32)], axis=1)
  pos = jnp.concatenate([pos, jnp.arange(7, 11, dtype=jnp.int32)[None]], axis=1)
  cache = DecodeState(kv=None, roles=rls, positions=pos)
  roles_np = np.asarray(rls[0])
  for sees_query in (False, True):
    for self_slot in (0, 1):
      mask, cls_pos = window_mask(cache, jnp.array([sees_query]), jnp.array([-100]),
                                  jnp.array([100]), jnp.array([self_slot]))
      seen = np.nonzero(np.asarray(mask[0]))[0]
      others = [s for s in seen if s != self_slot]
      assert {Role(int(roles_np[s])) for s in others} == (
          {Role.QUERY, Role.RESPONSE} if sees_query else {Role.RESPONSE})
      assert self_slot in seen and int(cls_pos[0]) == 11
  # A rule-2 window [8, 9] (positions): exactly those two RESPONSE tokens.
  mask, cls_pos = window_mask(cache, jnp.array([False]), jnp.array([8]), jnp.array([9]),
                              jnp.array([0]))
  assert np.nonzero(np.asarray(mask[0]))[0].tolist() == [0, 12, 13] and int(cls_pos[0]) == 10
