"""The ADA-style probe baseline (Any-Depth Alignment): linear probes on the frozen source
model's hidden states, re-read during generation.

Training (``train_probe``): for every layer, an L2-regularised logistic regression (Newton's
method on standardised features) on the residual stream after that block at the last prompt
token (the end of the assistant header), malicious (1) vs benign (0) training prompts; the
layer is chosen by AUROC on a held-out validation part of those prompts only. States come from
the source's plain causal forward (``SafetyModel.hidden_states``, no [CLS]).

Inference (``ProbeModel``, gate on): the probe reads the state at step 0 (the prompt: also
``classify``) and then every ``every`` response tokens (25, as ADA), ``read="newest"``: at the
newest token, or ``read="header"``: at the end of the assistant header re-inserted after it
(ADA's own reading; one forward per check). At the first check with P(malicious) above the
threshold, step ``s``: ``action="refuse"`` inserts the gate's refusal prefix there (after a
newline mid-response; after any forced prefill) and the model goes on; ``"halt"`` inserts it
and stops, as the gate's high reliance. Decoding is causal and each token's sampling key is
(seed, prompt, step), so this equals generating in chunks of ``every`` tokens and checking
between them: the wrapper decodes once, reads every check in one forward, and re-decodes only
the rows that fired, from their first ``s`` tokens plus the prefix. ``cls_probs`` /
``cls_steps`` hold the checks made (up to the one that fired).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import ml_collections
import numpy as np

from safety_align import calls
from safety_align.defences import common
from safety_align.data import corpus
from safety_align.masks import Role
from safety_align.stats import auroc

ACTIONS = ("refuse", "halt")
READS = ("newest", "header")
PROBE_FILE = "probe.npz"


def hidden_states(model, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                  batch_size: int = 32, layers: Sequence[int] | None = None) -> np.ndarray:
  """[L, M, D] float32: the source's state after each block in ``layers`` (default all) at
  ``positions[i]`` of token sequence ``sequences[i]`` (M = all positions, in order). Forwards
  run in length order, in ``calls.chunks`` of at most ``batch_size`` rows: long sequences in
  fewer rows, as the prompt pass batches them."""
  order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
  picked = {}
  for chunk in calls.chunks(np.array([len(sequences[i]) for i in order]), batch_size):
    rows = [order[j] for j in chunk]
    padded = np.zeros((len(rows), max(len(sequences[i]) for i in rows)), np.int32)
    for r, i in enumerate(rows):  # right padding: causal, so nothing before it changes
      padded[r, :len(sequences[i])] = sequences[i]
    states = model.hidden_states(padded, layers)
    picked.update({i: states[:, r, positions[i]] for r, i in enumerate(rows)})
  return np.concatenate([picked[i] for i in range(len(sequences))], axis=1).astype(np.float32)


def prompt_ids(model, prompt: str, system: str | None = None) -> list[int]:
  return [t for ids, _ in model.template.prompt_pieces(model.tokenizer, prompt, system=system)
          for t in ids]


def header_ids(model) -> list[int]:
  """The assistant header: the chat template's closing piece (where a response starts)."""
  ids, role = model.template.prompt_pieces(model.tokenizer, "x")[-1]
  if role != Role.TEMPLATE:
    raise ValueError("read='header' needs a chat template that ends the prompt with an "
                     "assistant header; use read='newest'.")
  return list(ids)


@dataclasses.dataclass(frozen=True)
class Probe:
  """The chosen layer's logistic regression on standardised states: P(malicious) =
  sigmoid(((h - mean) / scale) . weight + bias). ``val_auroc``: every layer's, which chose it."""

  layer: int
  mean: np.ndarray
  scale: np.ndarray
  weight: np.ndarray
  bias: float
  val_auroc: tuple[float, ...]

  def prob(self, h: np.ndarray) -> np.ndarray:
    """[M, D] states of the probe's own ``layer`` -> [M] P(malicious)."""
    z = ((h - self.mean) / self.scale) @ self.weight + self.bias
    return 1.0 / (1.0 + np.exp(-z))

  def save(self, path: str) -> None:
    with open(path + ".tmp", "wb") as f:
      np.savez(f, layer=self.layer, mean=self.mean, scale=self.scale, weight=self.weight,
               bias=self.bias, val_auroc=np.array(self.val_auroc))
    os.replace(path + ".tmp", path)

  @classmethod
  def load(cls, path: str) -> "Probe":
    with np.load(path) as z:
      return cls(layer=int(z["layer"]), mean=z["mean"], scale=z["scale"], weight=z["weight"],
                 bias=float(z["bias"]), val_auroc=tuple(float(a) for a in z["val_auroc"]))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iters: int = 100):
  """(weight [D], bias) minimising mean log-loss + l2/2 |weight|^2 (Newton's method; the
  bias unpenalised). x [N, D] (standardised), y [N] in {0, 1}."""
  a = np.concatenate([x, np.ones((len(x), 1))], axis=1).astype(np.float64)
  reg = np.full(a.shape[1], l2)
  reg[-1] = 1e-8
  w = np.zeros(a.shape[1])
  for _ in range(iters):
    p = 1.0 / (1.0 + np.exp(-a @ w))
    grad = a.T @ (p - y) / len(y) + reg * w
    hess = (a.T * (p * (1 - p))) @ a / len(y) + np.diag(reg)
    step = np.linalg.solve(hess, grad)
    w -= step
    if np.max(np.abs(step)) < 1e-9:
      break
  return w[:-1], float(w[-1])


def train_probe(states: np.ndarray, labels: np.ndarray, *, l2: float, val_fraction: float,
                seed: int) -> Probe:
  """The probe of ``states`` [L, N, D] (prompt-end states) and ``labels`` [N] (module doc)."""
  labels = np.asarray(labels)
  if not 0 < val_fraction < 1:
    raise ValueError(f"probe.val_fraction must be in (0, 1), got {val_fraction}.")
  order = np.random.default_rng(seed).permutation(len(labels))
  n_val = round(val_fraction * len(labels))
  val, train = order[:n_val], order[n_val:]
  for part, idx in (("training", train), ("validation", val)):
    if len(set(labels[idx].tolist())) < 2:
      raise ValueError(f"The probe's {part} part has prompts of one class only: give more "
                       "labelled prompts (both benign and malicious), or change val_fraction.")
  fits, scores = [], []
  for h in states:
    mean, scale = h[train].mean(0), h[train].std(0) + 1e-6
    w, b = fit_logistic((h[train] - mean) / scale, labels[train], l2)
    fits.append((mean, scale, w, b))
    scores.append(auroc(((h[val] - mean) / scale) @ w + b, labels[val]))
  layer = int(np.argmax(scores))
  mean, scale, w, b = fits[layer]
  return Probe(layer, mean.astype(np.float32), scale.astype(np.float32),
               w.astype(np.float32), b, tuple(scores))


class ProbeModel(common.Defended):
  """The source model with the probe (module doc); ``classify`` is the probe's P(malicious)
  of the query."""

  name = "probe"
  has_classifier = True

  def __init__(self, source, probe: Probe, *, every: int = 25, action: str = "refuse",
               threshold: float = 0.5, read: str = "newest", batch_size: int = 32):
    super().__init__(source)
    if action not in ACTIONS:
      raise ValueError(f"probe.action={action!r}: expected one of {ACTIONS}.")
    if read not in READS:
      raise ValueError(f"probe.read={read!r}: expected one of {READS}.")
    if not isinstance(every, int) or every < 1:
      raise ValueError(f"probe.every must be an integer >= 1, got {every!r}.")
    self.probe, self.every, self.action, self.threshold = probe, every, action, threshold
    self.read, self.feature_batch = read, batch_size

  def classify(self, prompts: Sequence[str]) -> np.ndarray:
    ids = [prompt_ids(self.source, p) for p in prompts]
    return self._prob(ids, [[len(x) - 1] for x in ids])

  def _prob(self, sequences, positions) -> np.ndarray:
    """[M] P(malicious) at ``positions`` of ``sequences`` (the probe's layer only)."""
    states = hidden_states(self.source, sequences, positions, self.feature_batch,
                           layers=[self.probe.layer])
    return self.probe.prob(states[0])

  def check_steps(self, n_tokens: int) -> list[int]:
    """The steps a response of ``n_tokens`` is checked at: 0, then every ``every`` tokens
    while it goes on."""
    return [0] + list(range(self.every, n_tokens, self.every))

  def check_probs(self, prompts: Sequence[str], responses: Sequence[Sequence[int]],
                  steps: Sequence[Sequence[int]], system: str | None = None) -> list[list[float]]:
    """Per prompt, P(malicious) at each of its ``steps`` (after that many response tokens)."""
    heads = [prompt_ids(self.source, p, system) for p in prompts]
    if self.read == "newest":
      seqs = [h + list(r) for h, r in zip(heads, responses)]
      pos = [[len(h) + s - 1 for s in st] for h, st in zip(heads, steps)]
    else:
      header = header_ids(self.source)
      seqs = [h + list(r[:s]) + (header if s else []) for h, r, st in zip(heads, responses, steps)
              for s in st]
      pos = [[len(x) - 1] for x in seqs]
    probs = self._prob(seqs, pos)
    out, k = [], 0
    for st in steps:
      out.append([float(p) for p in probs[k:k + len(st)]])
      k += len(st)
    return out

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               gate="annealing", prefill: Sequence[str] | None = None,
               system: str | None = None, sampling=None, batch_size: int | None = None):
    """``SafetyModel.generate``'s arguments; ``gate`` off: the source, else the probe."""
    on = common.defence_on(gate)
    gens = self.source.generate(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=seed, gate="off", prefill=prefill, system=system, sampling=sampling,
        batch_size=batch_size)
    if not on:
      return gens
    tok, prompts = self.tokenizer, list(prompts)
    n_forced = [len(tok.encode(p)) for p in prefill] if prefill else [0] * len(prompts)
    steps = [self.check_steps(len(g.tokens)) for g in gens]
    probs = self.check_probs(prompts, [g.tokens for g in gens], steps, system)
    refusal, newline = tok.encode(self.gate_defaults.refusal_prefix), tok.encode("\n")
    out, fired = list(gens), {}
    for i, (g, st, pr) in enumerate(zip(gens, steps, probs)):
      first = next((j for j, p in enumerate(pr) if p > self.threshold), None)
      if first is None:
        out[i] = dataclasses.replace(g, cls_probs=pr, cls_steps=st)
        continue
      at = max(st[first], n_forced[i])
      start = g.tokens[:at] + (newline if at else [])
      fired[i] = (start + refusal, len(start), st[:first + 1], pr[:first + 1])
    budget = {i: n_forced[i] + max_new_tokens for i in fired}
    go_on = [i for i in fired if self.action == "refuse" and len(fired[i][0]) < budget[i]]
    continued = dict(zip(go_on, [t for t, _ in common.decode(
        self.source, [prompts[i] for i in go_on], [fired[i][0] for i in go_on],
        max_new_tokens=[budget[i] - len(fired[i][0]) for i in go_on],
        sampler_of=common.samplers(sampling, len(prompts), temperature, top_k, top_p),
        seed=seed, rows=go_on, system=system)] if go_on else []))
    for i, (forced, refusal_step, st, pr) in fired.items():
      tokens = continued.get(i, forced[:budget[i]])
      out[i] = dataclasses.replace(gens[i], text=tok.decode(tokens), tokens=tokens, refused=True,
                                   refusal_step=refusal_step, cls_probs=pr, cls_steps=st)
    return out


def _check_data(data) -> list[dict]:
  data = list(data)
  for i, d in enumerate(data):
    if not (isinstance(d, dict) and isinstance(d.get("prompt"), str) and d["prompt"]
            and d.get("label") in (0, 1)):
      raise ValueError(f"train_data[{i}] must be a dict with a non-empty 'prompt' and a "
                       f"'label' of 0 (benign) or 1 (malicious), got {d!r:.80}.")
  return data


def build(source, section: ml_collections.ConfigDict, train_data, log, folder: str) -> ProbeModel:
  """The probe baseline of ``source`` (a workdir path or a ``SafetyModel``), trained on
  ``train_data`` ({prompt, label} dicts; None: the demo's ``corpus.sft_pairs("train")``) and
  cached as ``folder/probe.npz`` (a second build loads it)."""
  model = common.load_source(source)
  data = _check_data(corpus.sft_pairs("train", section.seed) if train_data is None
                     else train_data)
  if section.n_train:
    data = data[:section.n_train]
  digest = hashlib.sha256(json.dumps([[d["prompt"], d["label"]] for d in data]).encode())
  common.check_settings(folder, dict(
      baseline="probe", source=common.source_id(source), data=digest.hexdigest(),
      l2=section.l2, val_fraction=section.val_fraction, seed=section.seed))
  path = os.path.join(folder, PROBE_FILE)
  if os.path.exists(path):
    probe = Probe.load(path)
    log(f"probe: loaded {path} (layer {probe.layer})")
  else:
    log(f"probe: reading {len(data)} training prompts' states")
    ids = [prompt_ids(model, d["prompt"]) for d in data]
    states = hidden_states(model, ids, [[len(x) - 1] for x in ids], section.batch_size)
    probe = train_probe(states, np.array([d["label"] for d in data]), l2=section.l2,
                        val_fraction=section.val_fraction, seed=section.seed)
    probe.save(path)
    log(f"probe: layer {probe.layer} chosen, validation AUROC by layer "
        + ", ".join(f"{a:.3f}" for a in probe.val_auroc) + f"; saved {path}")
  return ProbeModel(model, probe, every=section.every, action=section.action,
                    threshold=section.threshold, read=section.read,
                    batch_size=section.batch_size)
