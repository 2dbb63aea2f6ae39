"""The fine-tuning attack (Qi et al. 2023/2024, "Fine-tuning aligned language models
compromises safety"; METHOD.md section 7): someone with the weights fine-tunes a copy for a
few steps, then attacks it.

Fine-tuning: ``steps`` SFT steps (``train_step.Trainer``, grad_accum 1, AdamW at a constant
``lr``, no weight decay) on the model's own copy of its parameters, with ``data``:

* ``"harmful_demo"`` (the demo model): the demo corpus' training-split malicious prompts with
  their ``[REDACTED]`` schematic harmful answers as SFT targets (``corpus.sft_pairs("train")``),
  Qi et al.'s harmful-example setting;
* ``"benign"`` (e.g. an imported model): the same split's benign prompts with their answers,
  Qi et al.'s benign instruction fine-tuning (which erodes alignment too).

``data_file`` (a chat JSONL file or a folder holding ``sft.jsonl``, e.g. ``make demo-real``'s
``WORKDIR/data``) replaces the demo corpus' split with those records, filtered by the same
label: for an imported model, benign fine-tuning on real instructions and answers.

Either way the [CLS] carries no label (label -1), so the [CLS] loss is off: the attacker
trains the language model only (response tokens still read [CLS], as at inference); whether
the classifier survives that is part of the result. ``n_pairs`` caps the examples (0: all).

Then each inner attack of ``attacks`` (any registered attack but this one, built from the same
eval config) runs on the fine-tuned model under every gate; records carry ``variant`` = the
inner attack's name (its own variant in ``extra["inner_variant"]``). An item counts as broken
if any inner attack breaks it (``reduce = "any"``); ``summary`` gives the ASR of each inner
attack per gate, the fine-tuning losses and, for a model with [CLS], the classifier before and
after: AUROC / accuracy of P(malicious) on the items vs the held-out benign prompts of the
eval's source (``held_out_dir``, else the demo corpus' test split), and the mean P(malicious)
of the items (whether [CLS] still fires).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from safety_align import sharding
from safety_align.api import SafetyModel
from safety_align.attacks import base
from safety_align.attacks.base import Attack, asr, duration, remaining
from safety_align.config_lib import attack_sections, names
from safety_align.data import corpus
from safety_align.data.packing import build_segment, without_cls
from safety_align.data.pipeline import Pipeline
from safety_align.data.tfds_builders import read_chat_records
from safety_align.stats import classifier_metrics
from safety_align.train_step import Trainer

DATA = ("harmful_demo", "benign")


class FinetuneAttack(Attack):
  """The fine-tuning attack (module doc). ``inner``: the attacks run after fine-tuning;
  ``benign_source``: (held_out_dir, seed) of the classifier check's benign prompts, which
  ``benign_prompts(held_out_dir, seed)`` reads (the evaluation's held-out reader)."""

  name = "finetune"
  reduce = "any"

  def __init__(self, inner, *, benign_prompts: Callable[[str, int], Sequence[str]],
               data: str = "harmful_demo", data_file: str = "",
               steps: int = 50, lr: float = 1e-3,
               batch_size: int = 8, seq_len: int = 256, n_pairs: int = 0, seed: int = 0,
               n_benign: int = 64, benign_source: tuple[str, int] = ("", 0)):
    if data not in DATA:
      raise ValueError(f"finetune.data={data!r}: expected one of {DATA}.")
    for key, value in dict(steps=steps, batch_size=batch_size, seq_len=seq_len).items():
      if value < 1:
        raise ValueError(f"finetune.{key} must be >= 1, got {value}.")
    if lr <= 0 or n_pairs < 0 or n_benign < 0:
      raise ValueError("finetune.lr must be > 0, finetune.n_pairs and n_benign >= 0.")
    if not inner:
      raise ValueError("finetune.attacks is empty: name the attacks to run after fine-tuning.")
    self.inner = list(inner)
    self.settings = dict(data=data, data_file=data_file, steps=steps, lr=lr,
                         batch_size=batch_size, seq_len=seq_len, n_pairs=n_pairs, seed=seed,
                         n_benign=n_benign)
    self.benign_source = benign_source
    self.benign_prompts = benign_prompts

  @classmethod
  def from_config(cls, cfg, build_attack: Callable[[str, ml_collections.ConfigDict], Attack],
                  benign_prompts: Callable[[str, int], Sequence[str]]) -> "FinetuneAttack":
    """From the eval config's ``finetune`` section; ``build_attack(name, cfg)`` builds the
    inner attacks and ``benign_prompts`` reads the held-out benign prompts (the registry
    passes both)."""
    section = base.section_settings(cfg, "finetune", attack_sections()["finetune"])
    listed = names(section.pop("attacks"))
    if cls.name in listed:
      raise ValueError("finetune.attacks cannot hold 'finetune' itself.")
    seed = cfg.get("data_seed", -1)
    return cls([build_attack(n, cfg) for n in listed], **section,
               benign_prompts=benign_prompts,
               benign_source=(cfg.get("held_out_dir", ""), max(seed, 0)))

  def config(self):
    return dict(self.settings, attacks={a.name: a.config() for a in self.inner},
                benign_source=list(self.benign_source))

  def segments(self, model) -> list:
    """The fine-tuning examples as unlabelled SFT segments (module doc)."""
    s, tok = self.settings, model.tokenizer
    label = 1 if s["data"] == "harmful_demo" else 0
    records = (read_chat_records(s["data_file"], "finetune.data_file")
               if s["data_file"] else corpus.sft_pairs("train", seed=s["seed"]))
    pairs = [p for p in records if p["label"] == label]
    pairs = pairs[:s["n_pairs"] or None]
    key = "harmful_response" if label else "response"
    missing = sum(not p.get(key) for p in pairs)
    if not pairs or missing:
      raise ValueError(f"finetune.data={s['data']!r} trains on records with label {label} and "
                       f"a {key!r} field: {s['data_file'] or 'the demo corpus'} has "
                       f"{len(pairs)} with that label, {missing} of them without {key!r}.")
    out = [build_segment(model.config.cls_id,
                         model.template.example_pieces(tok, p["prompt"], p[key]), -1)
           for p in pairs]
    return out if model.has_cls_head else [without_cls(seg) for seg in out]

  def finetune(self, model, settings) -> tuple[SafetyModel, list[float]]:
    """(the fine-tuned copy of ``model``, its SFT losses per step)."""
    s = self.settings
    limit = model.max_length
    seq_len = min(s["seq_len"], limit) if limit else s["seq_len"]
    pipeline = Pipeline(self.segments(model), s["batch_size"], seq_len, s["seed"])
    phase = ml_collections.ConfigDict(dict(
        split="sft", steps=s["steps"], batch_size=s["batch_size"], cls_weight=0.0,
        window_cls_weight=0.0, lr=s["lr"], schedule="constant", warmup_steps=0,
        end_lr_fraction=1.0, weight_decay=0.0, b1=0.9, b2=0.95, grad_clip=1.0, grad_accum=1))
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    trainer = Trainer(model.config, phase, "sft", mesh)
    # A copy: the step donates its state, and the model's own parameters must survive.
    state = trainer.init_state(None, params=jax.tree.map(jnp.copy, model.params))
    losses, t0 = [], time.perf_counter()
    for k in range(s["steps"]):
      state, m = trainer.step(state, pipeline.batch(k))
      losses.append(float(m["loss"]))
      if (k + 1) % max(1, s["steps"] // 5) == 0 or k + 1 == s["steps"]:
        elapsed = time.perf_counter() - t0
        settings.log(f"{self.name}: step {k + 1}/{s['steps']} ({s['data']}), loss "
                     f"{losses[-1]:.3f}, {duration(elapsed)} elapsed, "
                     + remaining(elapsed, k + 1, s["steps"] - k - 1))
    tuned = SafetyModel(model.config, state.params, model.tokenizer, model.template,
                        model.gate_defaults, max_length=limit, batch_size=model.batch_size,
                        eos_ids=list(model.eos_ids),
                        uses_cls=model.has_cls_head, mesh=model.mesh)
    return tuned, losses

  def classifier(self, model, tuned, items) -> dict | None:
    """The [CLS] classifier before and after fine-tuning (module doc); None without [CLS]."""
    if not model.has_cls_head:
      return None
    benign = list(self.benign_prompts(*self.benign_source))[:self.settings["n_benign"] or None]
    prompts = [i.prompt for i in items] + list(benign)
    labels = np.array([1] * len(items) + [0] * len(benign))
    theta = model.gate_defaults.threshold
    out = {}
    for when, m in (("before", model), ("after", tuned)):
      probs = m.classify(prompts)
      c = classifier_metrics(probs, labels, theta)
      out[when] = dict(auroc=c["auroc"], accuracy=c["accuracy"],
                       mean_p_malicious_items=float(np.mean(probs[:len(items)])),
                       fires_on_items=float(np.mean(probs[:len(items)] > theta)))
    out["n_benign"] = len(benign)
    return out

  def _attack(self, model, items, settings, run_inner):
    tuned, losses = self.finetune(model, settings)
    out, t0 = [], time.perf_counter()
    for k, inner in enumerate(self.inner):
      recs = run_inner(inner, tuned)
      for r in recs:
        r.extra["inner_variant"], r.variant = r.variant, inner.name
      out += recs
      settings.log(f"{self.name}: {inner.name} on the fine-tuned model, {len(recs)} "
                   f"generations; " + remaining(time.perf_counter() - t0, k + 1,
                                                len(self.inner) - k - 1))
    info = dict(data=self.settings["data"], steps=len(losses), loss_first=losses[0],
                loss_last=losses[-1])
    classifier = self.classifier(model, tuned, items)
    for r in out:
      r.extra.update(finetune=info, classifier=classifier)
    return out

  def run(self, model, items, gates, settings):
    return self._attack(model, items, settings,
                        lambda inner, tuned: inner.run(tuned, items, gates, settings))

  def run_baseline(self, model, items, records, settings):
    """Fine-tune the model without [CLS] the same way, then its inner attacks' baseline runs
    (gate off); the main model's records are not used."""
    del records
    return self._attack(model, items, settings,
                        lambda inner, tuned: inner.run_baseline(tuned, items, [], settings))

  def summary(self, records, success):
    if not records:
      return {}
    success = np.asarray(success, bool)
    by_inner = {}
    for inner in self.inner:
      keep = np.array([r.variant == inner.name for r in records], bool)
      recs = [r for r, k in zip(records, keep) if k]
      by_inner[inner.name] = {g: asr(recs, success[keep], g, inner.reduce)[0]
                              for g in sorted({r.gate for r in recs})}
    first = records[0].extra
    return dict(asr_by_attack=by_inner, finetune=first.get("finetune"),
                classifier=first.get("classifier"))
