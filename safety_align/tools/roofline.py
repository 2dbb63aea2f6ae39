"""What a compiled TPU program costs: collectives in its optimised HLO, the model's analytic
FLOPs, and a roofline time.

``collectives(hlo_text)``: every all-gather / reduce-scatter / all-reduce / all-to-all /
collective-permute of the optimised HLO (the TPU compiler puts many inside fusions), counted
as executed: an instruction in a ``while`` body counts the loop's trip count times (its
``known_trip_count``, or the constant bound of its condition: the scanned layers, the scanned
micro-batches), once where the condition has no constant (a data-dependent loop). Bytes are the data one chip moves over ICI: all-gather its result less its own
share, reduce-scatter its operand less the kept share, all-reduce twice that (reduce-scatter +
all-gather), all-to-all and collective-permute their result.

Analytic FLOPs of a training step (``train_flops``): ``6·N·tokens`` (forward + backward of
every matmul weight, N without the input embedding table) ``+ 12·L·H·Dh·T·tokens`` (attention
scores and values at full ``T x T``, PaLM's convention). XLA's ``cost_analysis()`` counts a
``while`` body once, so a scanned model under-counts by about its layer count: the report
compares the two and uses the analytic figure when they differ by more than ``TOLERANCE``.

The roofline (``Roofline``): ``max(FLOPs / peak, HBM bytes / HBM bandwidth, collective bytes /
ICI bandwidth)`` per chip, an optimistic bound (no overlap loss, every link busy). MFU at that
time is an upper bound, not a measurement.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

from safety_align import model as model_lib

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
TOLERANCE = 0.15
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"=\s*(.*?)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(\w+)\[([\d,]*)\]")
_CALLEES = re.compile(r"(to_apply|calls|body|condition|branch_computations)=\{?([%\w.,\- ]+)\}?")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_WHILE = re.compile(r"condition=%?([\w.\-]+).*body=%?([\w.\-]+)|body=%?([\w.\-]+).*condition=%?([\w.\-]+)")
_CONSTANT = re.compile(r"s32\[\][^=]*constant\((\d+)\)")


def _array_bytes(shape: str) -> list[int]:
  return [_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
          for dtype, dims in _ARRAY.findall(shape)]


def _group_size(line: str) -> int:
  named = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
  if named:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", named.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", named.group(2)))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
  if iota:
    return int(iota.group(2))
  groups = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  return len(groups.group(1).split(",")) if groups else 1


def _trip_count(condition: list[str]) -> int:
  """A while loop's trip count from its condition (``i < N``: the s32 constant N); 1 where
  the condition has none (a data-dependent loop: counted per iteration)."""
  found = [int(n) for line in condition for n in _CONSTANT.findall(line)]
  return max(found) if found else 1


def _multipliers(hlo_text: str, trips: bool) -> tuple[dict, dict, set]:
  """(computation -> its lines, computation -> times it runs per call of the entry, the
  computations inside some while loop). ``trips``: a loop body runs its trip count (else
  once: per iteration)."""
  lines, calls, current, entry = collections.defaultdict(list), [], None, None
  loop_bodies, whiles = set(), []
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = head.group(2)
      entry = current if head.group(1) else entry
      continue
    if current is None:
      continue
    lines[current].append(line)
    loop = _WHILE.search(line) if " while(" in line else None
    if loop:
      condition, body = (loop.group(1), loop.group(2)) if loop.group(1) else (
          loop.group(4), loop.group(3))
      trip = _TRIP.search(line)
      whiles.append((current, body, condition, int(trip.group(1)) if trip else None))
      continue
    for _, names in _CALLEES.findall(line):
      for name in names.replace("%", "").split(","):
        if name.strip():
          calls.append((current, name.strip(), 1))
  for caller, body, condition, trip in whiles:
    n = (trip or _trip_count(lines[condition])) if trips else 1
    calls += [(caller, body, n), (caller, condition, n)]
    loop_bodies.update({(body, n), (condition, n)})
  times = collections.Counter({entry: 1})
  callees = collections.defaultdict(list)
  for caller, callee, n in calls:
    callees[caller].append((callee, n))
  stack, looped = [(entry, False)], set()
  while stack:  # the call graph is a DAG: each path multiplies the trip counts along it
    name, in_loop = stack.pop()
    for callee, n in callees[name]:
      times[callee] += times[name] * n
      inner = in_loop or (callee, n) in loop_bodies
      if inner:
        looped.add(callee)
      stack.append((callee, inner))
  return lines, times, looped


def collectives(hlo_text: str, per_iteration: bool = False) -> "Collectives":
  """The executed collectives of an optimised HLO module (module docstring).
  ``per_iteration``: only those inside while loops, each loop body counted once (a decoding
  step's, without the prompt pass's)."""
  lines, times, looped = _multipliers(hlo_text, trips=not per_iteration)
  counts, moved = collections.Counter(), collections.Counter()
  for name, body in lines.items():
    if per_iteration and name not in looped:
      continue
    for line in body:
      m = _INSTRUCTION.search(line)
      if not m or not times[name]:
        continue
      kind, arrays, group = m.group(2), _array_bytes(m.group(1)), _group_size(line)
      size = max(arrays) if m.group(3) else sum(arrays)  # async: (operand, result, ...)
      share = (group - 1) / group if group > 1 else 0.0
      traffic = {"all-gather": size * share, "reduce-scatter": size * (group - 1),
                 "all-reduce": 2 * size * share}.get(kind, size)
      counts[kind] += times[name]
      moved[kind] += times[name] * traffic
  return Collectives(dict(counts), dict(moved))


@dataclasses.dataclass(frozen=True)
class Collectives:
  """Executed collectives per kind: ``counts`` and ICI ``bytes`` moved per chip."""

  counts: dict
  bytes: dict

  @property
  def total_bytes(self) -> int:
    return sum(self.bytes.values())

  def describe(self) -> str:
    return ", ".join(f"{k} {self.counts[k]} x ({self.bytes[k] / 2**30:.2f} GiB)"
                     for k in KINDS if self.counts.get(k)) or "none"


def matmul_params(cfg: model_lib.ModelConfig, n_params: int) -> int:
  """N of ``6·N``: the parameters less the input embedding table (a lookup, not a matmul),
  which with tied embeddings is also the LM head and stays."""
  return n_params if cfg.tie_embeddings else n_params - (cfg.vocab_size + 1) * cfg.d_model


def train_flops(cfg: model_lib.ModelConfig, n_params: int, tokens: int, seq_len: int) -> float:
  """Model FLOPs of one training step over ``tokens`` tokens of rows of ``seq_len``."""
  attention = 12 * cfg.n_layers * cfg.n_heads * cfg.dim_per_head * seq_len
  return (6 * matmul_params(cfg, n_params) + attention) * tokens


def decode_flops(cfg: model_lib.ModelConfig, n_params: int, rows: int, cache_len: int) -> float:
  """FLOPs of one decoding step of ``rows`` query rows over a ``cache_len`` KV cache (dense
  attention reads the whole cache)."""
  attention = 4 * cfg.n_layers * cfg.n_heads * cfg.dim_per_head * cache_len
  return (2 * matmul_params(cfg, n_params) + attention) * rows


@dataclasses.dataclass(frozen=True)
class Roofline:
  """Per-chip work of one step and the chip's rates -> the bound and its limiting term."""

  flops: float
  hbm_bytes: float
  ici_bytes: float
  peak_flops: float
  hbm_bw: float
  ici_bw: float

  @property
  def terms(self) -> dict:
    return {"compute": self.flops / self.peak_flops, "HBM": self.hbm_bytes / self.hbm_bw,
            "ICI": self.ici_bytes / self.ici_bw}

  @property
  def seconds(self) -> float:
    return max(self.terms.values())

  @property
  def bound(self) -> str:
    return max(self.terms, key=self.terms.get)

  def mfu(self, model_flops_per_chip: float) -> float:
    """Model FLOPs utilisation at the roofline time: an upper bound."""
    return model_flops_per_chip / self.seconds / self.peak_flops


def agrees(measured: float, analytic: float) -> bool:
  """Whether XLA's figure is within ``TOLERANCE`` of the analytic one."""
  return analytic > 0 and abs(measured / analytic - 1) <= TOLERANCE
