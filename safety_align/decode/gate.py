"""The safety gate (METHOD.md section 5) as pure functions on per-row array state.

Coordinates: response index ``j`` (0 = first response token, forced prefill tokens and the
inserted refusal prefix included). "Step ``n``" is the moment ``n`` response tokens exist: the
first classification (the prompt pass) is step 0, a re-evaluation at step ``n`` reads tokens
``0 .. n-1`` at most.

Modes of a row (strategic attention, windows in response indices):

* ``QUERY``     (rule 1, the first classification was malicious): QUERY + ``[0, r1-1]``;
* ``SLIDING``   (rule 2): the latest r2 tokens ``[n-r2, n-1]``;
* ``SUSPECT``   (rule 3, open): a re-evaluation first said malicious at step ``n_t``; with
  ``S_t = n_t - 1`` (the newest token then) the following ones read ``[S_t-r2, S_t+r3]``. A
  benign one is a false alarm (back to ``SLIDING``); ``tau`` consecutive malicious ones
  (the first alarm included) confirm it;
* ``CONFIRMED`` (rule 3, confirmed): same window, no more transitions.

Strategic decoding: a malicious first classification, or a confirmation, triggers the
insertion of the refusal prefix (``reliance`` ``medium``: then the model goes on; ``high``: the
response stops after the prefix; ``low``: never inserted, only the ``[CLS]`` cache slot is
updated). Mid-response the prefix follows a newline; at most one insertion per response;
forced (prefill-attack) tokens come first, so an insertion due during them waits for their end.

Schedules say at which steps a row re-evaluates; a row in ``SUSPECT`` re-evaluates at every
step whatever the schedule, so an insertion comes at most ``tau`` steps after the first alarm.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("off", "first", "periodic", "every", "annealing")
RELIANCES = ("low", "medium", "high")
LOW, MEDIUM, HIGH = range(3)
QUERY, SLIDING, SUSPECT, CONFIRMED = range(4)
DEFAULT_REFUSAL = "Sorry, I cannot fulfill your request because"


@dataclasses.dataclass(frozen=True)
class GateConfig:
  """Settings of the gate.

  ``schedule``: ``off`` (no [CLS] at all: the plain decoder), ``first`` (prompt pass only),
  ``periodic`` (every ``period`` steps), ``every``, ``annealing`` (steps 1, then
  ``s <- ceil(anneal_growth * s)`` while ``s <= anneal_stop``: 1, 2, 3, 5, 8, 12, 18, 27, 41,
  62 by default, 10 re-evaluations in the first 64 steps and none after).
  """

  schedule: str = "annealing"
  reliance: str = "medium"
  threshold: float = 0.5  # θ: malicious iff P(malicious) > threshold
  tau: int = 3
  r1: int = 10
  r2: int = 10
  r3: int = 10
  period: int = 10
  anneal_growth: float = 1.5
  anneal_stop: int = 64
  refusal_prefix: str = DEFAULT_REFUSAL

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"Unknown gate {self.schedule!r}: expected one of {SCHEDULES}.")
    if self.reliance not in RELIANCES:
      raise ValueError(f"Unknown reliance {self.reliance!r}: expected one of {RELIANCES}.")
    if not 0.0 <= self.threshold <= 1.0:
      raise ValueError(f"gate threshold must be in [0, 1], got {self.threshold}.")
    for name in ("tau", "r1", "r2", "period"):
      if getattr(self, name) < 1:
        raise ValueError(f"gate {name} must be >= 1, got {getattr(self, name)}.")
    if self.r3 < 0 or self.anneal_stop < 0:
      raise ValueError("gate r3 and anneal_stop must be >= 0.")
    if self.anneal_growth <= 1.0:
      raise ValueError(f"gate anneal_growth must be > 1, got {self.anneal_growth}.")
    if self.reliance != "low" and not self.refusal_prefix:
      raise ValueError("An empty refusal_prefix needs reliance='low'.")

  @property
  def enabled(self) -> bool:
    return self.schedule != "off"

  def arrays(self, n_max: int) -> "GateArrays":
    """The settings as traced arrays, for steps up to ``n_max`` (one compiled program serves
    every schedule, threshold and window size)."""
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return GateArrays(
        enabled=jnp.asarray(self.enabled), reliance=i32(RELIANCES.index(self.reliance)),
        threshold=jnp.float32(self.threshold), tau=i32(self.tau), r1=i32(self.r1),
        r2=i32(self.r2), r3=i32(self.r3), table=jnp.asarray(schedule_steps(self, n_max)))


@flax.struct.dataclass
class GateArrays:
  """``GateConfig`` as arrays: scalars and ``table`` [n_max + 1] (``schedule_steps``), or per
  row (``rows``): [B] and ``table`` [B, n_max + 1], so rows with different gates share one
  program."""

  enabled: jax.Array
  reliance: jax.Array
  threshold: jax.Array
  tau: jax.Array
  r1: jax.Array
  r2: jax.Array
  r3: jax.Array
  table: jax.Array

  def rows(self, b: int) -> "GateArrays":
    """The same settings for each of ``b`` rows."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (b,) + jnp.shape(x)), self)


def schedule_steps(cfg: GateConfig, n_max: int) -> np.ndarray:
  """[n_max + 1] bool: whether the schedule re-evaluates at step n (step 0 is the prompt pass)."""
  due = np.zeros(n_max + 1, bool)
  if cfg.schedule == "every":
    due[1:] = True
  elif cfg.schedule == "periodic":
    due[cfg.period::cfg.period] = True
  elif cfg.schedule == "annealing":
    s = 1
    while s <= min(cfg.anneal_stop, n_max):
      due[s] = True
      s = max(s + 1, math.ceil(cfg.anneal_growth * s))
  return due


@flax.struct.dataclass
class GateState:
  """Per-row gate state, all [B].

  ``insert_idx``: next index into the insertion sequence (newline + prefix) to emit, -1 when
  no insertion is pending or running. ``refusal_step``: response index of the prefix's first
  token once emitted, else -1.
  """

  mode: jax.Array
  anchor: jax.Array  # S_t, -1 outside rule 3
  streak: jax.Array  # consecutive malicious re-evaluations in rule 3
  triggered: jax.Array  # bool: the insertion was decided
  insert_idx: jax.Array
  refusal_step: jax.Array


def init(cfg: GateArrays, p0) -> GateState:
  """State after the first classification ``p0`` [B] (P(malicious) of the query)."""
  malicious = (p0 > cfg.threshold) & cfg.enabled
  trigger = malicious & (cfg.reliance != LOW)
  minus = jnp.full(p0.shape, -1, jnp.int32)
  return GateState(
      mode=jnp.where(malicious, QUERY, SLIDING).astype(jnp.int32),
      anchor=minus, streak=jnp.zeros_like(minus), triggered=trigger,
      insert_idx=jnp.where(trigger, 0, -1).astype(jnp.int32), refusal_step=minus)


def due(cfg: GateArrays, state: GateState, n, active):
  """[B] bool: rows re-evaluating at step ``n`` (scalar or [B]: schedule, or an open
  suspicion)."""
  if cfg.table.ndim == 1:
    scheduled = cfg.table[n]
  else:  # per-row schedules
    n = jnp.broadcast_to(n, active.shape)
    scheduled = jnp.take_along_axis(cfg.table, n[:, None], axis=1)[:, 0]
  return (scheduled | (state.mode == SUSPECT)) & active


def window(cfg: GateArrays, state: GateState, n):
  """The window of a re-evaluation at step ``n``: (sees_query [B], lo [B], hi [B]) inclusive
  response indices (lo may be negative; only existing RESPONSE tokens are ever visible)."""
  rule1 = state.mode == QUERY
  rule3 = (state.mode == SUSPECT) | (state.mode == CONFIRMED)
  lo = jnp.where(rule1, 0, jnp.where(rule3, state.anchor - cfg.r2, n - cfg.r2))
  hi = jnp.where(rule1, cfg.r1 - 1, jnp.where(rule3, state.anchor + cfg.r3, n - 1))
  return rule1, lo.astype(jnp.int32), hi.astype(jnp.int32)


def update(cfg: GateArrays, state: GateState, evaluated, prob, n) -> GateState:
  """Apply the re-evaluations of step ``n``: ``evaluated`` [B] bool, ``prob`` [B] P(malicious)."""
  malicious = prob > cfg.threshold
  alarm = evaluated & malicious & (state.mode == SLIDING)
  again = evaluated & malicious & (state.mode == SUSPECT)
  false_alarm = evaluated & ~malicious & (state.mode == SUSPECT)
  streak = jnp.where(alarm, 1, jnp.where(again, state.streak + 1,
                                         jnp.where(false_alarm, 0, state.streak)))
  anchor = jnp.where(alarm, n - 1, jnp.where(false_alarm, -1, state.anchor))
  mode = jnp.where(alarm, SUSPECT, jnp.where(false_alarm, SLIDING, state.mode))
  confirm = (mode == SUSPECT) & (streak >= cfg.tau)
  mode = jnp.where(confirm, CONFIRMED, mode)
  trigger = confirm & ~state.triggered & (cfg.reliance != LOW)
  return state.replace(
      mode=mode.astype(jnp.int32), anchor=anchor.astype(jnp.int32),
      streak=streak.astype(jnp.int32), triggered=state.triggered | trigger,
      insert_idx=jnp.where(trigger, 0, state.insert_idx).astype(jnp.int32))


def emit(cfg: GateArrays, state: GateState, *, j, sampled, forced, is_forced, active,
         insertion, n_newline: int, n_insert=None):
  """Choose the token at response index ``j``: forced > inserted > sampled.

  Args:
    j: response index of the token being chosen (scalar or [B]).
    sampled, forced: [B] candidate tokens; is_forced, active: [B] bool.
    insertion: [Q] (or per row [B, Q]) newline tokens (``n_newline`` of them) then the
      refusal prefix; ``n_insert`` [B]: each row's insertion length (default Q).
  Returns:
    (token [B], was_sampled [B] bool, finished [B] bool: ``high`` reliance and the prefix is
    complete, new state).
  """
  q = insertion.shape[-1]
  n_insert = q if n_insert is None else n_insert
  pending = (state.insert_idx >= 0) & active
  idx = jnp.where((state.insert_idx == 0) & (j == 0), n_newline, state.insert_idx)
  inserting = pending & ~is_forced
  at = jnp.clip(idx, 0, q - 1)
  inserted = (insertion[at] if insertion.ndim == 1
              else jnp.take_along_axis(insertion, at[:, None], axis=1)[:, 0])
  token = jnp.where(is_forced, forced, jnp.where(inserting, inserted, sampled))
  refusal_step = jnp.where(inserting & (idx == n_newline), j, state.refusal_step)
  nxt = jnp.where(inserting, idx + 1, state.insert_idx)
  last = inserting & (nxt == n_insert)
  finished = last & (cfg.reliance == HIGH)
  state = state.replace(insert_idx=jnp.where(last, -1, nxt).astype(jnp.int32),
                        refusal_step=refusal_step.astype(jnp.int32))
  return token.astype(jnp.int32), ~is_forced & ~inserting, finished, state
