"""From records to packed training batches, resumable as a pure function of the step.

``encoding.encode_pretrain`` / ``encode_sft`` turn records into :class:`~packing.Segment` s; a
:class:`Pipeline` groups a seeded permutation of them into batches and packs batch ``k`` on
demand; a :class:`MixedPipeline` gives a share of the steps long rows (``data.long_seq_len``:
the SFT examples longer than ``data.seq_len``, e.g. queries inside real jailbreak wrappers);
``make_pipeline`` does it all for a phase of a config.
"""

from __future__ import annotations

import math
import os
from typing import Iterator, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from safety_align import sharding
from safety_align.data import corpus, mixtures, tfds_builders
from safety_align.data.encoding import encode_records
from safety_align.data.packing import Segment, build_segment, pack, truncate, without_cls
from safety_align.data.chat_templates import Template, get_template
from safety_align.data.tokenizer import Tokenizer, check_vocab, train_bpe
from safety_align.masks import Role

OVERLONG = ("drop", "truncate_response", "error")  # config.data.overlong: SFT examples > seq_len


class Pipeline:
  """Packed batches of ``segments``; batch ``k`` is a pure function of ``(seed, k)``.

  Epoch ``e`` visits the segments in the order of a permutation seeded by ``(seed, e)`` and
  groups them greedily into batches (first-fit into ``batch_size`` rows of ``seq_len``, as
  ``packing.pack`` places them); batches are numbered across epochs. Groupings are computed
  lazily and cached, so ``batch(k)`` costs one ``pack``.

  With several hosts, ``batch(k)`` returns this host's *contiguous* block of rows,
  ``global[p * b:(p + 1) * b]`` with ``p = process_index`` and ``b = batch_size //
  process_count`` (the layout ``jax.make_array_from_process_local_data`` expects for a batch
  axis sharded over the devices in process order).
  """

  def __init__(self, segments: Sequence[Segment], batch_size: int, seq_len: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    if not segments:
      raise ValueError("The pipeline has no examples: check the data source and split.")
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} "
                       "hosts: use a multiple of the host count.")
    self.segments = list(segments)
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
    self.process_index, self.process_count = process_index, process_count
    self._lengths = np.minimum([len(s) for s in self.segments], seq_len)
    self._counts: list[int] = []           # batches in each epoch computed so far
    self._groups: dict[int, list[list[int]]] = {}  # the last epochs' groupings

  def _epoch_groups(self, epoch: int) -> list[list[int]]:
    if epoch not in self._groups:
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.segments))
      groups, current = [], []
      fill = np.zeros(self.batch_size, np.int64)
      for i in order:
        free = np.flatnonzero(fill + self._lengths[i] <= self.seq_len)
        if not len(free):  # the batch is full: start the next one
          groups.append(current)
          current = []
          fill[:] = 0
          free = [0]
        fill[free[0]] += self._lengths[i]
        current.append(int(i))
      groups.append(current)
      if len(self._groups) >= 2:
        self._groups.pop(min(self._groups))
      self._groups[epoch] = groups
    return self._groups[epoch]

  def locate(self, k: int) -> tuple[int, int]:
    """(epoch, index within the epoch) of batch ``k``."""
    if k < 0:
      raise ValueError(f"Batch index must be >= 0, got {k}.")
    epoch = 0
    while True:
      if epoch == len(self._counts):
        self._counts.append(len(self._epoch_groups(epoch)))
      if k < self._counts[epoch]:
        return epoch, k
      k -= self._counts[epoch]
      epoch += 1

  def global_batch(self, k: int) -> dict[str, np.ndarray]:
    """Batch ``k`` of all hosts: ``packing.BATCH_KEYS`` arrays of ``[batch_size, seq_len]``
    (``cls_window`` ``[batch_size, seq_len, 2]``)."""
    epoch, i = self.locate(k)
    group = self._epoch_groups(epoch)[i]
    return pack([self.segments[j] for j in group], self.batch_size, self.seq_len)

  def batch(self, k: int) -> dict[str, np.ndarray]:
    """This host's rows of batch ``k``: ``[batch_size // process_count, seq_len]`` arrays."""
    b = self.batch_size // self.process_count
    rows = slice(self.process_index * b, (self.process_index + 1) * b)
    return {key: v[rows] for key, v in self.global_batch(k).items()}

  def iterate(self, start_step: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(step, batch(step))`` for ``step = start_step, start_step + 1, ...`` (endless)."""
    step = start_step
    while True:
      yield step, self.batch(step)
      step += 1


class MixedPipeline:
  """Short and long rows in one step sequence: optimiser step ``s`` takes its ``grad_accum``
  micro-batches from ``long`` iff ``floor((s + 1) * share) > floor(s * share)`` (a ``share``
  of the steps, evenly spread), else from ``short``; each pipeline's batches are numbered
  over its own steps. So batch ``k`` stays a pure function of ``(seed, k)``, and the
  micro-batches of one step share a shape (the train step compiles once per shape)."""

  def __init__(self, short: Pipeline, long: Pipeline, share: float, grad_accum: int):
    if not 0 < share <= 1:
      raise ValueError(f"config.data.long_share must be in (0, 1], got {share}.")
    self.short, self.long, self.share, self.grad_accum = short, long, share, grad_accum

  def is_long(self, step: int) -> bool:
    return math.floor((step + 1) * self.share) > math.floor(step * self.share)

  def batch(self, k: int) -> dict[str, np.ndarray]:
    """This host's rows of micro-batch ``k`` (of optimiser step ``k // grad_accum``)."""
    step, j = divmod(k, self.grad_accum)
    n_long = math.floor(step * self.share)  # long steps before ``step``
    if self.is_long(step):
      return self.long.batch(n_long * self.grad_accum + j)
    return self.short.batch((step - n_long) * self.grad_accum + j)


def long_rows(config: ml_collections.ConfigDict, phase_name: str) -> tuple[int, float, int]:
  """``(long_seq_len, long_share, long_batch)`` of ``config.data`` for an SFT phase
  (``(0, 0, 0)``: off, and always for pretraining). Long steps take ``batch_size * seq_len /
  long_seq_len`` rows (about the tokens of a short step), a multiple of the data-parallel
  devices, at least one per device."""
  data = config.data
  length, share = data.get("long_seq_len", 0), data.get("long_share", 0.0)
  if not length or phase_name != "sft":
    return 0, 0.0, 0
  context = config.get("context_length", 0)
  if length <= data.seq_len or (context and length > context):
    raise ValueError(f"config.data.long_seq_len={length} must exceed data.seq_len="
                     f"{data.seq_len}" + (f" and be at most the source's context_length="
                                          f"{context}" if context else "") + " (0: off).")
  if not 0 < share <= 1:
    raise ValueError(f"config.data.long_share={share}: long rows need a share of the steps in "
                     "(0, 1] (or long_seq_len=0).")
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(dict(config.mesh),
                                                           jax.device_count())))
  n_data = shape["data"] * shape["fsdp"]
  rows = config[phase_name].batch_size * data.seq_len // length // n_data * n_data
  return length, share, max(rows, n_data)


def phase_records(config: ml_collections.ConfigDict, phase_name: str,
                  workdir: str) -> list[dict]:
  """The training records of ``config.<phase_name>`` (see ``make_pipeline``)."""
  if phase_name not in tfds_builders.KINDS:
    raise ValueError(f"Unknown phase {phase_name!r}: expected one of {tfds_builders.KINDS}.")
  phase, data = config[phase_name], config.data
  tfds_dir = os.path.join(workdir, "tfds")
  if data.source == "demo":
    if phase.split != phase_name:
      raise ValueError(f"config.{phase_name}.split={phase.split!r}: the demo corpus has one "
                       f"dataset per phase; set it to {phase_name!r}.")
    return tfds_builders.load_records("demo", "train", data.data_dir or tfds_dir,
                                      kind=phase_name, seed=data.seed)
  if data.source == "real":
    return mixtures.phase_records(config, phase_name, data.data_dir or tfds_dir)
  if not data.data_dir:
    raise ValueError(f"config.data.source={data.source!r} needs config.data.data_dir: the "
                     f"folder with {phase.split}.jsonl.")
  return tfds_builders.load_records(data.source, phase.split, tfds_dir, kind=phase_name,
                                    jsonl_dir=data.data_dir)


def replay_segments(records: Sequence[dict], n: int, tok: Tokenizer, seed: int) -> list[Segment]:
  """``n`` pretraining documents (a seeded draw, cycling if ``n`` exceeds them) as plain LM
  segments without a [CLS] row: under the SFT mask a main [CLS] reads QUERY tokens, which a
  document has none of, so only its LM loss is replayed."""
  if not records:
    raise ValueError("Replay needs pretraining documents, and the pretraining data is empty.")
  order = np.random.default_rng([seed, 1]).permutation(len(records))
  chosen = [records[order[i % len(records)]] for i in range(n)]
  return [without_cls(s) for s in encode_records(chosen, "pretrain", tok, cls_id=0)]


def recovery_segments(records: Sequence[dict], fraction: float, tok: Tokenizer,
                      template: Template, cls_id: int, seed: int) -> list[Segment]:
  """Recovery examples for ``round(fraction * n)`` of the ``n`` malicious records with a
  ``harmful_response`` (a seeded draw): the query, then as RESPONSE the first ``k`` tokens of
  the harmful response (``k`` uniform in [5, 40], at most its length - 1; never LM targets),
  a newline, the record's refusal and EOS (LM targets), main [CLS] label 1. They show a
  refusal after some response text, as the gate's mid-response insertion (METHOD.md sec. 5)
  produces, and teach the model to end after it. No window [CLS] rows: ``encoding.encode_sft``'s
  segments train the windows over both texts."""
  if not 0 <= fraction <= 1:
    raise ValueError(f"config.sft.recovery must be in [0, 1], got {fraction}.")
  eligible = [r for r in records if r["label"] == 1 and r.get("harmful_response")]
  rng = np.random.default_rng([seed, 2])
  order = rng.permutation(len(eligible))[:round(fraction * len(eligible))]
  chosen = [eligible[i] for i in np.sort(order)]
  newline = tok.encode("\n")
  out = []
  for q, a, h in zip(*(tok.encode_batch([r[f] for r in chosen])
                       for f in ("prompt", "response", "harmful_response"))):
    k = min(int(rng.integers(5, 41)), len(h) - 1)
    out.append(build_segment(cls_id, template.pieces(tok, q, h[:k] + newline + a), 1,
                             untrained=[(0, k - 1)]))
  return out


def fit_examples(segments: Sequence[Segment], seq_len: int, policy: str,
                 tok: Tokenizer, field: str = "seq_len") -> list[Segment]:
  """SFT examples longer than ``seq_len`` (``config.data.<field>``) by ``policy``
  (``OVERLONG``), reported in one log line.

  "drop" leaves them out; "truncate_response" cuts the response of those whose prompt fits
  (window rows past the cut lose their label) and drops the rest; "error" raises. A query is
  never cut: its [CLS] label is about the whole query.
  """
  if policy not in OVERLONG:
    raise ValueError(f"config.data.overlong={policy!r}: expected one of {OVERLONG}.")
  over = [i for i, s in enumerate(segments) if len(s) > seq_len]
  if not over:
    return list(segments)
  longest = max(len(segments[i]) for i in over)
  first = segments[over[0]]
  query = tok.decode(first.tokens[first.roles == Role.QUERY])
  what = (f"{len(over)} of {len(segments)} SFT examples are longer than config.data.{field}="
          f"{seq_len} tokens (the longest {longest}; e.g. the query {query[:30]!r})")
  if policy == "error":
    raise ValueError(f"{what}: raise config.data.{field}, or set config.data.overlong to "
                     "'drop' or 'truncate_response'.")
  out, cut = [], 0
  for s in segments:
    if len(s) <= seq_len:
      out.append(s)
    elif policy == "truncate_response" and _prompt_length(s) < seq_len:
      out.append(truncate(s, seq_len))
      cut += 1
  if not out:
    raise ValueError(f"{what}, which leaves no example: raise config.data.{field}.")
  done = [f"cut the response of {cut}"] * bool(cut) + [f"dropped {len(over) - cut}"] * bool(
      len(over) - cut)
  logging.warning("%s: %s (config.data.overlong=%r).", what, ", ".join(done), policy)
  return out


def _prompt_length(segment: Segment) -> int:
  """Tokens before the first response token ([CLS] rows included)."""
  response = np.flatnonzero(segment.roles == Role.RESPONSE)
  return int(response[0]) if len(response) else len(segment)


def make_pipeline(config: ml_collections.ConfigDict, phase_name: str, tokenizer: Tokenizer,
                  cls_id: int, workdir: str) -> Pipeline | MixedPipeline:
  """The pipeline of ``config.<phase_name>`` (records: documents for "pretrain", chat pairs
  for "sft").

  ``config.data.source``: "demo" reads the demo corpus' train split (prepared by TFDS in
  ``config.data.data_dir``, default ``WORKDIR/tfds``); "jsonl" reads
  ``<config.data.data_dir>/<config.<phase>.split>.jsonl`` (prepared into ``WORKDIR/tfds``);
  "real" reads the published datasets named by ``config.<phase>.split`` from the user's
  copies under ``config.data.manual_dir`` (``data/real_datasets.py``, ``data/mixtures.py``).

  ``config.sft.replay`` > 0 mixes ``replay`` pretraining documents per SFT example into the
  SFT phase (``replay_segments``), as real recipes replay pretraining data during SFT.
  ``config.sft.recovery`` > 0 adds recovery examples for that fraction of the malicious pairs
  with a harmful response (``recovery_segments``).

  ``config.data.long_seq_len`` > 0 (with ``long_share``, ``long_rows``): the SFT examples
  longer than ``seq_len`` (up to ``long_seq_len``; longer ones by ``overlong``) train in rows
  of ``long_seq_len`` on that share of the steps (``MixedPipeline``), so ``[CLS]`` reads long
  queries; the short rows and their step shape stay as they were.
  """
  records = phase_records(config, phase_name, workdir)
  phase, data = config[phase_name], config.data
  use_cls = config.get("use_cls", True)
  augment = use_cls and bool(phase.get("window_augmentation", False))
  markers = corpus.HARM_MARKERS if data.source == "demo" else ()  # see encoding.encode_sft
  segments = encode_records(records, phase_name, tokenizer, cls_id,
                            get_template(data.chat_template), phase.get("window", 10), augment,
                            markers, phase.get("harmful_opener", ""),
                            phase.get("untrained_refusal_prefix", ""))
  recovery = phase.get("recovery", 0.0) if phase_name == "sft" else 0.0
  if recovery > 0:
    segments += recovery_segments(records, recovery, tokenizer,
                                  get_template(data.chat_template), cls_id, data.seed)
  long_len, share, long_batch = long_rows(config, phase_name)
  if phase_name == "sft":
    segments = fit_examples(segments, long_len or data.seq_len, data.get("overlong", "drop"),
                            tokenizer, "long_seq_len" if long_len else "seq_len")
  if not use_cls:
    segments = [without_cls(s) for s in segments]
  long = [s for s in segments if len(s) > data.seq_len] if long_len else []
  segments = [s for s in segments if len(s) <= data.seq_len] if long_len else segments
  replay = phase.get("replay", 0.0) if phase_name == "sft" else 0.0
  if replay > 0:
    segments += replay_segments(phase_records(config, "pretrain", workdir),
                                round(replay * len(records)), tokenizer, data.seed)
  host = (jax.process_index(), jax.process_count())
  short = Pipeline(segments, phase.batch_size, data.seq_len, data.seed, *host)
  if not long_len:
    return short
  if not long:
    raise ValueError(f"config.data.long_seq_len={long_len}, but no SFT example is longer than "
                     f"data.seq_len={data.seq_len}: add long examples (e.g. long jailbreak "
                     "templates) or set long_seq_len=0.")
  logging.info("%s: %d of %d examples in rows of %d tokens on %.0f%% of the steps.",
               phase_name, len(long), len(long) + len(segments), long_len, 100 * share)
  return MixedPipeline(short, Pipeline(long, long_batch, long_len, data.seed, *host), share,
                       phase.get("grad_accum", 1))


def demo_tokenizer(workdir: str, config: ml_collections.ConfigDict) -> Tokenizer:
  """``WORKDIR/tokenizer.json`` if present, else a byte-level BPE of
  ``config.model.vocab_size`` tokens trained on the demo corpus and saved there."""
  path = os.path.join(workdir, "tokenizer.json")
  if os.path.isfile(path):
    return Tokenizer.load(path)
  return train_bpe(corpus.all_texts(config.data.seed), config.model.vocab_size, path,
                   get_template(config.data.chat_template).special_tokens)


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """``config.data.tokenizer`` (a tokenizer.json), or the demo BPE; checked against the
  model's text vocabulary."""
  if config.data.tokenizer:
    tok = Tokenizer.load(config.data.tokenizer)
    saved = os.path.join(workdir, "tokenizer.json")
    if os.path.abspath(config.data.tokenizer) != os.path.abspath(saved):
      tok.save(saved)  # the workdir is self-contained for sa.load
      tok.save_special_tokens(os.path.join(workdir, "tokenizer_config.json"))
  elif config.data.source != "demo":
    raise ValueError(f"config.data.source={config.data.source!r} needs config.data.tokenizer "
                     "(e.g. <init_from>/tokenizer.json); only the demo trains its own BPE.")
  else:
    tok = demo_tokenizer(workdir, config)
  check_vocab(tok, config.model.vocab_size)
  return tok
