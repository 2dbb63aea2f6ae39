"""Qi et al.'s deep safety alignment ("Safety Alignment Should Be Made More Than Just a Few
Tokens Deep", 2024) as a baseline: SFT of the source model without [CLS] on safety-recovery
augmentation plus anchor data.

Data (``training_segments``):

* recovery examples, for ``augment_fraction`` of the malicious pairs with a harmful response:
  the query, then as RESPONSE the first ``k`` tokens of the harmful response (never LM
  targets: ``lm_mask`` off), a newline (as the gate's mid-response insertion), the pair's
  refusal and EOS (LM targets). ``k`` (``sample_k``): uniform in [1, ``k_short``] with
  probability ``short_fraction``, else uniform in [1, ``k_max``] (defaults 1/2, 10, 100: up to
  ~100 harmful tokens as Qi et al., most of the mass short, 55% at <= 10), at most the harmful
  response's length - 1. The project's own ``data.pipeline.recovery_segments`` is the same
  example with ``k`` uniform in [5, 40];
* anchors: every training pair as ordinary SFT (benign pairs: their answer, the utility
  anchor; malicious pairs: their refusal from the first token).

Training: the source's parameters, one ``sft`` phase of ``training_loop.run_phase`` into the
folder (``use_cls=False``, as ``eval.no_cls`` trains the no-[CLS] baseline), with a
``config.json`` and the source's tokenizer beside it so ``sa.load`` reads the folder. A build
whose folder already has the finished checkpoint only loads it (an unfinished one resumes).

``DeepAlignedModel``: gate off is the source, any other gate the aligned model (decoded gate
off: a plain LM). Its ``config``, ``params``, ``max_length`` and ``eos_ids`` are the aligned
model's, so white-box attacks search against the defended weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np

from safety_align import checkpoint, sharding, training_loop, workdir
from safety_align.api import load
from safety_align.defences import common
from safety_align.data import corpus
from safety_align.data.packing import Segment, build_segment, without_cls
from safety_align.data.encoding import encode_sft
from safety_align.data.pipeline import Pipeline, fit_examples
from safety_align.data.chat_templates import get_template
from safety_align.model import ModelConfig

PHASE = "sft"


def sample_k(rng: np.random.Generator, n_harmful: int, *, k_short: int, k_max: int,
             short_fraction: float) -> int:
  """Harmful prefix tokens of one recovery example (module doc)."""
  hi = k_short if rng.random() < short_fraction else k_max
  return min(int(rng.integers(1, hi + 1)), n_harmful - 1)


def recovery_segment(tok, template, cls_id: int, query: Sequence[int],
                     harmful: Sequence[int], refusal: Sequence[int], k: int) -> Segment:
  """``query -> harmful[:k] \\n refusal EOS`` without [CLS]; the ``k`` harmful tokens are no
  LM targets."""
  response = list(harmful[:k]) + tok.encode("\n") + list(refusal)
  return without_cls(build_segment(cls_id, template.pieces(tok, query, response), -1,
                                   untrained=[(0, k - 1)]))


def training_segments(records: Sequence[dict], tok, template, cls_id: int,
                      section) -> list[Segment]:
  """The anchors, then the recovery examples (module doc); a seeded draw."""
  out = [without_cls(s) for r in records for s in encode_sft(r, tok, template, cls_id)]
  rng = np.random.default_rng([section.seed, 3])
  eligible = [r for r in records if r["label"] == 1 and r.get("harmful_response")]
  chosen = rng.permutation(len(eligible))[:round(section.augment_fraction * len(eligible))]
  for i in np.sort(chosen):
    r = eligible[i]
    harmful = tok.encode(r["harmful_response"])
    if len(harmful) < 2:
      continue
    k = sample_k(rng, len(harmful), k_short=section.k_short, k_max=section.k_max,
                 short_fraction=section.short_fraction)
    out.append(recovery_segment(tok, template, cls_id, tok.encode(r["prompt"]), harmful,
                                tok.encode(r["response"]), k))
  return out


def train_config(source: str, section, folder: str) -> ml_collections.ConfigDict:
  """The training run's config: the source's model, one SFT phase without [CLS]."""
  src = workdir.read_config(source)
  data = src.get("data", {})
  seq_len = section.seq_len or data.get("seq_len")
  if not seq_len:
    raise ValueError(f"{source} has no data.seq_len (an import directory): set "
                     "deep_alignment.seq_len to the training row length.")
  return ml_collections.ConfigDict(dict(
      seed=section.seed, use_cls=False, phases=PHASE, init_from=os.path.abspath(source),
      init_phase="", model=src["model"],
      mesh=src.get("mesh", dict(data=-1, fsdp=1, tensor=1)),
      special_tokens=src.get("special_tokens", {}),
      data=dict(source="deep_alignment", data_dir="", seq_len=seq_len, overlong="drop",
                tokenizer=os.path.join(folder, workdir.TOKENIZER_FILE), seed=section.seed,
                chat_template=src.get("chat_template") or data.get("chat_template", "demo")),
      sft=dict(split="deep_alignment", steps=section.steps, batch_size=section.batch_size,
               cls_weight=0.0, lr=section.lr, schedule="cosine",
               warmup_steps=section.warmup_steps, end_lr_fraction=0.1,
               weight_decay=section.weight_decay, b1=0.9, b2=0.95, grad_clip=1.0,
               grad_accum=1),
      checkpoint=dict(every_steps=section.steps, keep=1, async_save=False),
      log_every_steps=max(1, section.steps // 10)))


def train(source: str, section, records: Sequence[dict], folder: str, tok) -> None:
  """SFT of ``source`` on ``training_segments(records)`` into ``folder`` (resumes there)."""
  config = train_config(source, section, folder)
  training_loop.check_config(config)
  workdir.write_config(folder, config)
  tok.save(config.data.tokenizer)
  tok.save_special_tokens(os.path.join(folder, "tokenizer_config.json"))
  model_cfg = ModelConfig.from_config(config.model)
  segments = fit_examples(
      training_segments(records, tok, get_template(config.data.chat_template), model_cfg.cls_id,
                        section), config.data.seq_len, "drop", tok)
  pipeline = Pipeline(segments, section.batch_size, config.data.seq_len, section.seed,
                      jax.process_index(), jax.process_count())
  params = jax.tree.map(lambda x: x.astype(model_cfg.weight_dtype),
                        workdir.load_for_inference(source).params)
  log = training_loop.MetricsLog(folder)
  try:
    training_loop.run_phase(config, folder, PHASE, pipeline, sharding.make_mesh(dict(config.mesh)),
                            log, init_params_=params)
  finally:
    log.close()


class DeepAlignedModel(common.Defended):
  """Gate off: the source; on: the aligned model (module doc)."""

  name = "deep_alignment"

  def __init__(self, source, aligned):
    super().__init__(source)
    self.aligned = aligned

  @property
  def max_length(self):
    return self.aligned.max_length

  @property
  def eos_ids(self):
    return self.aligned.eos_ids

  @property
  def config(self):
    return self.aligned.config

  @property
  def params(self):
    return self.aligned.params

  def lm_logits(self, token_ids) -> np.ndarray:
    return self.aligned.lm_logits(token_ids)

  def score(self, prompts, continuations, **kwargs):
    """``SafetyModel.score`` of the aligned model, the weights the defence decodes with."""
    return self.aligned.score(prompts, continuations, **kwargs)

  def generate(self, prompts, *, gate="annealing", **kwargs):
    """``SafetyModel.generate``'s arguments; ``gate`` off: the source, else the aligned model."""
    model = self.aligned if common.defence_on(gate) else self.source
    return model.generate(prompts, gate="off", **kwargs)


def _check_records(records) -> list[dict]:
  records = list(records)
  for i, r in enumerate(records):
    if not (isinstance(r, dict) and r.get("label") in (0, 1)
            and all(isinstance(r.get(f), str) and r[f] for f in ("prompt", "response"))):
      raise ValueError(f"train_data[{i}] must be a dict with a non-empty 'prompt' and "
                       "'response' (malicious pairs: a refusal), a 'label' of 0 or 1 and "
                       f"optionally a 'harmful_response', got {r!r:.80}.")
  return records


def build(source, section: ml_collections.ConfigDict, train_data, log,
          folder: str) -> DeepAlignedModel:
  """The deep-alignment baseline of ``source`` (a workdir or import directory: training
  starts from its checkpoint), trained on ``train_data`` (chat pairs {prompt, response,
  label, harmful_response}; None: the demo's ``corpus.sft_pairs("train")``) into
  ``folder``."""
  if not isinstance(source, str):
    raise TypeError("deep_alignment trains from a checkpoint: give the source model's workdir "
                    f"or import directory (a path), not a {type(source).__name__}.")
  model = common.load_source(source)
  records = _check_records(corpus.sft_pairs("train", section.seed) if train_data is None
                           else train_data)
  digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
  common.check_settings(folder, dict(baseline="deep_alignment", source=common.source_id(source),
                                     data=digest, **section.to_dict()))
  done = checkpoint.saved_steps(folder, PHASE)
  if done and done[-1] >= section.steps:
    log(f"deep_alignment: loading {folder} (step {done[-1]})")
  else:
    log(f"deep_alignment: training {section.steps} SFT steps from {source} into {folder}")
    train(source, section, records, folder, model.tokenizer)
  aligned = load(folder, max_length=model.max_length, batch_size=model.batch_size,
                 gate_defaults=model.gate_defaults)
  return DeepAlignedModel(model, aligned)
