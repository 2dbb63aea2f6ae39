"""What a compiled TPU program costs: its collectives and matmul FLOPs as executed (from the
optimised HLO), the model's analytic FLOPs and the hardware's, and a roofline time.

Executed: an instruction in a ``while`` body runs the loop's trip count times (its
``known_trip_count``, or the constant bound of its condition: the scanned layers, the scanned
micro-batches; once where the condition has no constant, a data-dependent loop), times the
runs of the computation holding the loop (nested loops multiply, once per call site).

``collectives(hlo_text)``: every all-gather / reduce-scatter / all-reduce / all-to-all /
collective-permute, one per logical collective: the TPU compiler splits an asynchronous one
into a start, continuation fusions and a done that repeat the instruction with the same
``channel_id``, so instructions are grouped by channel. Bytes are the data one chip moves over
ICI: all-gather its result less its own share, reduce-scatter its operand less the kept
share, all-reduce twice that (reduce-scatter + all-gather), all-to-all and collective-permute
their result.

FLOPs of a training step, per chip: the model's (``train_flops``: ``6·N·tokens`` + ``6·L·H·
Dh·T·tokens`` causal attention: the MFU numerator) and the
hardware's (``train_hardware_flops``: what the chip executes, the remat policy's recompute,
blockwise attention's recomputed blocks and its whole blocks on the causal diagonal),
cross-checked against the matmuls of the compiled HLO (``matmul_flops``). XLA's
``cost_analysis()`` counts a ``while`` body once (a scanned model under-counts by about its
layer count), so it is shown and not used.

The roofline (``Roofline``): ``max(hardware FLOPs / peak, HBM bytes / HBM bandwidth,
collective bytes / ICI bandwidth)`` per chip, an optimistic bound (no overlap loss, every link
busy). MFU at that time (model FLOPs / time / peak) is an upper bound, not a measurement: at
most model / hardware FLOPs when compute-bound.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
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
_CALLEES = re.compile(r"(to_apply|calls|body|condition|branch_computations|true_computation|"
                      r"false_computation)=\{?([%\w.,\- ]+)\}?")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_WHILE = re.compile(r"condition=%?([\w.\-]+).*body=%?([\w.\-]+)|body=%?([\w.\-]+).*condition=%?([\w.\-]+)")
_DEFINITION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CHANNEL = re.compile(r"channel_id=(\d+)")
_CONSTANT = re.compile(r"[su]32\[\][^=]*constant\((\d+)\)")


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


def _trip_count(condition: list[str], body: list[str]) -> int:
  """A while loop's trip count: its condition ``i < N`` (``i`` the loop tuple's element k, N
  an integer constant) with the body's element k ``i + s`` (a constant step s, 1 where the
  body does not show one; the TPU compiler's windowed matmul loops step by 2), counting from
  0: ``ceil(N / s)``. 1 where the condition has no constant (a data-dependent loop: counted
  per iteration)."""
  defs = {m.group(1): line for line in condition + body if (m := _DEFINITION.match(line))}
  constant = lambda name: (int(c.group(1)) if (c := _CONSTANT.search(defs.get(name, "")))
                           else None)
  index = lambda name: (int(i.group(1)) if (i := re.search(
      r"get-tuple-element\(.*index=(\d+)", defs.get(name, ""))) else None)
  for line in condition:
    m = re.search(r"compare\(%([\w.\-]+), %([\w.\-]+)\), direction=LT", line)
    if not m or constant(m.group(2)) is None:
      continue
    bound, k, step = constant(m.group(2)), index(m.group(1)), 1
    root = next((l for l in body if l.lstrip().startswith("ROOT ") and " tuple(" in l), "")
    items = re.findall(r"%([\w.\-]+)", root.split(" tuple(", 1)[-1])
    if k is not None and k < len(items):
      add = re.search(r" add\(%([\w.\-]+), %([\w.\-]+)\)", defs.get(items[k], ""))
      step = next((c for c in map(constant, add.groups()) if c), 1) if add else 1
    return -(-bound // step)
  found = [int(n) for line in condition for n in _CONSTANT.findall(line)]
  return max(found) if found else 1


def _multipliers(hlo_text: str, trips: bool) -> tuple[dict, dict, set]:
  """(computation -> its lines, computation -> times it runs per call of the entry, the
  computations inside some while loop). ``trips``: a loop body runs its trip count (else
  once: per iteration)."""
  lines, calls, current, entry = collections.defaultdict(list), [], None, None
  whiles = []
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
          calls.append((current, name.strip(), 1, False))
  for caller, body, condition, trip in whiles:
    n = (trip or _trip_count(lines[condition], lines[body])) if trips else 1
    calls += [(caller, body, n, True), (caller, condition, n, True)]
  callers = collections.defaultdict(list)
  for caller, callee, n, loop in calls:
    callers[callee].append((caller, n, loop))

  # The call graph is a DAG: a computation runs as often as all its call sites together, each
  # as often as its own computation runs times the loop's trip count (once per call site, not
  # once per path: a nested loop multiplies its own trips by the enclosing loop's, once).
  @functools.cache
  def runs(name: str) -> int:
    return 1 if name == entry else sum(runs(c) * n for c, n, _ in callers[name])

  @functools.cache
  def in_loop(name: str) -> bool:
    return any(loop or in_loop(c) for c, _, loop in callers[name])

  times = {name: runs(name) for name in lines}
  looped = {name for name in lines if in_loop(name)}
  return lines, times, looped


def collectives(hlo_text: str, per_iteration: bool = False) -> "Collectives":
  """The executed collectives of an optimised HLO module (module docstring).
  ``per_iteration``: only those inside while loops, each loop body counted once (a decoding
  step's, without the prompt pass's)."""
  lines, times, looped = _multipliers(hlo_text, trips=not per_iteration)
  ops = {}  # one logical collective -> (kind, runs, bytes per run, op_name)
  for name, body in lines.items():
    if (per_iteration and name not in looped) or not times[name]:
      continue
    for i, line in enumerate(body):
      m = _INSTRUCTION.search(line)
      if not m:
        continue
      kind, arrays, group = m.group(2), _array_bytes(m.group(1)), _group_size(line)
      size = max(arrays) if m.group(3) else sum(arrays)  # async: (operand, result, ...)
      share = (group - 1) / group if group > 1 else 0.0
      traffic = {"all-gather": size * share, "reduce-scatter": size * (group - 1),
                 "all-reduce": 2 * size * share}.get(kind, size)
      channel = _CHANNEL.search(line)
      key = channel.group(1) if channel else (name, i)
      op_name = _OP_NAME.search(line)
      _, runs, moved, source = ops.get(key, (kind, 0, 0.0, op_name and op_name.group(1)))
      ops[key] = (kind, max(runs, times[name]), max(moved, traffic), source)
  counts, moved = collections.Counter(), collections.Counter()
  for kind, runs, traffic, _ in ops.values():
    counts[kind] += runs
    moved[kind] += runs * traffic
  return Collectives(dict(counts), dict(moved), tuple(ops.values()))


def matmul_flops(hlo_text: str) -> float:
  """The FLOPs of every matmul in an optimised HLO module as executed: each ``dot`` and
  ``convolution`` (TPU HLO writes matmuls as convolutions) at ``2 x output elements x
  contracted elements``, times its computation's runs (``while`` trip counts applied, as for
  the collectives). Every branch of a ``conditional`` counts as taken (the blockwise key blocks
  the mask skips at run time included): an upper bound on the matmul work."""
  lines, times, _ = _multipliers(hlo_text, trips=True)
  total = 0.0
  for name, body in lines.items():
    if not times[name]:
      continue
    shapes = {}
    for line in body:
      m = _DEFINITION.match(line)
      if not m:
        continue
      shapes[m.group(1)] = dims = _dims(m.group(2))
      if m.group(3) not in ("dot", "convolution"):
        continue
      operands = re.findall(r"%([\w.\-]+)", line[m.end():].split(")", 1)[0])
      if m.group(3) == "dot":
        lhs = shapes.get(operands[0]) if operands else None
        contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        if lhs is None or contract is None:
          continue
        k = math.prod(lhs[int(i)] for i in contract.group(1).split(",") if i)
        total += times[name] * 2.0 * math.prod(dims) * k
      elif len(operands) > 1 and operands[0] in shapes and operands[1] in shapes:
        total += times[name] * _convolution_flops(line, shapes[operands[0]],
                                                  shapes[operands[1]], dims)
  return total


def _convolution_flops(line: str, lhs: tuple, rhs: tuple, out: tuple) -> float:
  """2 x the multiply-adds of an HLO convolution, counting only the kernel taps that land on
  an input element (not on padding or between dilated elements), as XLA's cost analysis
  does: the TPU compiler writes batched matmuls as convolutions whose batch dimension is a
  dilated, padded window, so ``output x window`` would over-count them by the window."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line)
  if labels is None:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  window = re.search(r"window=\{([^}]*)\}", line)
  fields = dict(f.split("=") for f in window.group(1).split()) if window else {}
  n = sum(c.isdigit() for c in rhs_l)
  get = lambda key, default: ([int(x) for x in fields[key].split("x")] if key in fields
                              else [default] * n)
  stride, lhs_dilate, rhs_dilate = get("stride", 1), get("lhs_dilate", 1), get("rhs_dilate", 1)
  pads = ([int(p) for p in pad.split("_")] for pad in fields["pad"].split("x")) if (
      "pad" in fields) else ([0, 0] for _ in range(n))
  taps = 1
  for s, (low, _) in zip(range(n), pads):
    size_in = lhs[lhs_l.index(str(s))]
    size_k, size_out = rhs[rhs_l.index(str(s))], out[out_l.index(str(s))]
    extent = (size_in - 1) * lhs_dilate[s] + 1
    taps *= sum(1 for o in range(size_out) for k in range(size_k)
                if 0 <= (p := o * stride[s] + k * rhs_dilate[s] - low) < extent
                and p % lhs_dilate[s] == 0)
  other = math.prod(d for d, label in zip(out, out_l) if not label.isdigit())
  return 2.0 * other * rhs[rhs_l.index("i")] * taps


def _dims(shape: str) -> tuple[int, ...]:
  """The dimensions of an array shape (``bf16[2,32]{1,0}`` -> (2, 32)); () for a tuple."""
  m = re.match(r"\w+\[([\d,]*)\]", shape)
  return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


@dataclasses.dataclass(frozen=True)
class Collectives:
  """Executed collectives per kind: ``counts`` and ICI ``bytes`` moved per chip; ``ops``:
  each logical collective as (kind, runs, bytes per run, the JAX op it came from)."""

  counts: dict
  bytes: dict
  ops: tuple = ()

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
  """Model FLOPs of one training step over ``tokens`` tokens of rows of ``seq_len``: every
  matmul weight forward and backward, ``6·N``, and causal attention's scores and values,
  ``6·L·H·Dh·T`` per token (PaLM's ``12·L·H·Dh·T`` halved: a causal row reads half the
  [T, T] scores on average; counting them all would let MFU pass 100% where the blockwise
  kernel skips the future)."""
  attention = 6 * cfg.n_layers * cfg.n_heads * cfg.dim_per_head * seq_len
  return (6 * matmul_params(cfg, n_params) + attention) * tokens


# Matmul passes over each visible (query block, key block) pair of blockwise attention, in
# units of one [BLOCK, BLOCK] x D matmul (``attention.blockwise_text``): the forward's scores
# and values (2); in the backward, its custom_vjp recomputes each query block under
# jax.checkpoint (2) and each key step again under its own jax.checkpoint (the scores: 1),
# then the four gradient matmuls (dV, dP, dQ, dK: 4).
BLOCKWISE_PASSES = 2 + 2 + 1 + 4
# The [CLS] rows' dense chunks (``attention.cls_rows``, one jax.checkpoint level): forward 2,
# the scores again in the backward 1, gradients 4.
CLS_PASSES = 2 + 1 + 4
# The same for dense attention: forward 2, backward 4, plus the forward again where the remat
# policy does not save the attention matmuls (they have batch dimensions).
_DENSE_RECOMPUTED = ("full", "dots_no_batch")


def train_hardware_flops(cfg: model_lib.ModelConfig, n_params: int, tokens: int, seq_len: int,
                         skipped: bool = True) -> float:
  """FLOPs the chip executes for one training step (``train_flops``' model FLOPs plus what
  the implementation adds): the remat policy's recomputed matmuls (``full``: every layer's
  forward again), and for blockwise attention the recomputed blocks (``BLOCKWISE_PASSES``),
  whole [BLOCK, BLOCK] blocks on the causal diagonal (half masked), and one dense chunk of
  ``CLS_CHUNK`` [CLS] rows per row (``attention.cls_rows``; an assumption: a row with more
  [CLS] rows runs more chunks). ``skipped``: the key blocks no query reads (the future) and the
  chunks without a [CLS] row are skipped at run time, as ``attention.py`` does, for rows of one
  segment (packed segments skip more); else every block and chunk is counted, as the HLO's
  matmul count (``matmul_flops``) counts them.
  Dense attention computes every [T, T] score (twice the model's causal attention), plus the
  forward again under ``model.remat`` in ``_DENSE_RECOMPUTED``."""
  from safety_align import attention as attention_lib  # pylint: disable=g-import-not-at-top
  mm = matmul_params(cfg, n_params)
  layers = mm - (cfg.vocab_size + 1) * cfg.d_model  # less the LM head, outside the remat
  matmuls = (6 * mm + (2 * layers if cfg.remat == "full" else 0)) * tokens
  heads = cfg.n_layers * cfg.n_heads * cfg.dim_per_head
  rows = tokens // seq_len
  if cfg.attention == "dense":
    passes = 3 + (1 if cfg.remat in _DENSE_RECOMPUTED else 0)
    return matmuls + 4 * passes * heads * seq_len * tokens
  block = min(attention_lib.BLOCK, seq_len)
  n = -(-seq_len // block)
  pairs = n * (n + 1) // 2 if skipped else n * n
  unit = 2 * block * block * heads  # one [block, block] x D matmul, every layer and head
  chunk = min(attention_lib.CLS_CHUNK, seq_len)
  chunks = 1 if skipped else -(-seq_len // chunk)
  cls_rows = CLS_PASSES * 2 * chunk * seq_len * heads * chunks
  return matmuls + rows * (BLOCKWISE_PASSES * pairs * unit + cls_rows)


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
  """Whether the compiled program's figure is within ``TOLERANCE`` of the analytic one."""
  return analytic > 0 and abs(measured / analytic - 1) <= TOLERANCE
