"""The runner: one model-like object through the suite (``evaluate_defence``: attacks, benign
prompts, classifier, overhead) and the [CLS] model with its no-[CLS] baseline and the
competitor baselines (``evaluate_model``; ``eval.workdir.run`` calls it on a workdir).

``evaluate_defence`` takes any object with ``generate``, ``classify``, ``has_cls_head``,
``tokenizer``, ``template`` and ``decoder`` (``SafetyModel``, or a defence wrapping one), so
the competitor baselines (``eval.competitors``) are evaluated exactly as the [CLS] model is:
same attacks (those a wrapper can run), prompts, judge and seeds, gate off (undefended) and
``gate_on`` (defence on); their entries go to ``results["baselines"][name]`` with the same
keys (``attacks``, ``benign``, ``classifier`` where it has one, ``overhead``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from safety_align import console
from safety_align.attacks import base
from safety_align.attacks.base import GATE_OFF, AttackedGeneration, Item, RunSettings
from safety_align.attacks.direct import DirectAttack
from safety_align.config_lib import names
from safety_align.defence import Defence
from safety_align.eval import competitors, tradeoff
from safety_align.eval import config as config_lib
from safety_align.eval import benchmarks, metrics, registry, report, utility
from safety_align.eval.judging import Judge, make_judge
from safety_align.eval.progress import Progress, attack_cost
from safety_align.eval.store import ResultStore, key
from safety_align.eval.timing import timing
from safety_align.stats import classifier_metrics

STORE_DIR = "cache"


@dataclasses.dataclass
class Suite:
  """What every model of one evaluation shares: config, held-out data, judge, store, attacks,
  run settings and progress."""

  cfg: Any
  items: list[Item]
  benign: list[str]
  pairs: list[dict]
  judge: Judge
  store: ResultStore
  attacks: list[base.Attack]
  settings: RunSettings
  progress: Progress
  answers: list[dict] = dataclasses.field(default_factory=list)  # eval.utility's references
  # "malicious" / "benign" / "classifier": each prompt's "source/category" (eval.data), or {}
  groups: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  headline: Callable[[str], None] = print  # the result lines (settings.log: the details)

  @property
  def log(self) -> Callable[[str], None]:
    return self.settings.log

  def common(self, model_id: str) -> dict:
    """The part of every stored result's key that every step shares."""
    cfg = self.cfg
    return dict(model=model_id, items=[dataclasses.astuple(i) for i in self.items],
                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, gate=dict(cfg.gate))

  def gates(self, attack: str, gated: bool, schedules: bool = True) -> list[str]:
    """Off, and if ``gated`` ``gate_on`` (+ the schedule baselines if ``schedules``)."""
    if not gated:
      return [GATE_OFF]
    return config_lib.gates_for(self.cfg, attack) if schedules else [GATE_OFF, self.cfg.gate_on]

  def benign_gates(self, gated: bool, schedules: bool = True) -> list[str]:
    cfg = self.cfg
    if not gated:
      return [GATE_OFF]
    return [GATE_OFF, cfg.gate_on] + ([s for s in names(cfg.schedules) if s != cfg.gate_on]
                                      if schedules else [])

  def step(self, name: str, payload, compute: Callable[[], Any]):
    """``store.get`` with progress lines around it (and ``release_compiled`` first)."""
    release_compiled(self.headline)
    stored = self.store.has(name, payload)
    self.progress.start(name)
    out = self.store.get(name, payload, compute)
    self.progress.finish(name, stored)
    return out


def memory_maps() -> tuple[int, int]:
  """(memory mappings this process holds, the kernel's limit); (0, 0) where /proc has
  neither (not Linux)."""
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      limit = int(f.read())
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f), limit
  except (OSError, ValueError):
    return 0, 0


def release_compiled(log: Callable[[str], None]) -> None:
  """Drop every compiled program once the process holds more than half the kernel's memory
  mappings. Each program maps its own code: one evaluation of five models on real text
  (prompt, prefill and batch buckets per model) reached the limit (65,530) after 1.7 h and died
  in LLVM ("Cannot allocate memory"). The steps after recompile what they use."""
  held, limit = memory_maps()
  if limit and held > limit // 2:
    jax.clear_caches()
    log(f"released compiled programs ({held} of {limit} memory mappings held)")


def make_suite(cfg, out_dir: str, items: Sequence[Item], benign: Sequence[str],
               pairs: Sequence[dict] = (), *, log: Callable[[str], None],
               judge: Judge | None = None, answers: Sequence[dict] = (),
               groups: Mapping[str, Sequence[str]] | None = None) -> Suite:
  config_lib.validate(cfg)
  items = list(items)[:cfg.n_malicious or None]
  benign = list(benign)[:cfg.n_benign or None]
  given = list(pairs)
  pairs = given or ([{"prompt": i.prompt, "label": 1} for i in items]
                    + [{"prompt": p, "label": 0} for p in benign])
  groups = dict(groups or {})
  groups = {k: list(v)[:n] for k, v, n in (("malicious", groups.get("malicious", ()), len(items)),
                                           ("benign", groups.get("benign", ()), len(benign)),
                                           ("classifier", groups.get("classifier", ()),
                                            len(pairs) if given else 0)) if v}
  # Per-step lines (starting, generations, stored) only with --verbosity >= 1; by default one
  # progress bar over the steps and one result line per attack.
  detail = log if console.verbosity() >= 1 else lambda msg: None
  return Suite(cfg=cfg, items=items, benign=benign, pairs=pairs, judge=judge or make_judge(cfg),
               store=ResultStore(os.path.join(out_dir, STORE_DIR), detail),
               attacks=registry.build_attacks(cfg),
               settings=RunSettings(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                    log=detail),
               progress=Progress(detail, bar=console.verbosity() < 1), answers=list(answers),
               groups=groups, headline=log)


def plan(suite: Suite, prefix: str, attacks: Sequence[base.Attack], gated: bool,
         classifier: bool, overhead: bool, schedules: bool = True) -> None:
  """Enter one model's steps in the progress plan (costs: ``progress.attack_cost``)."""
  cfg, p = suite.cfg, suite.progress
  for a in attacks:
    p.plan(prefix + a.name, attack_cost(
        a, len(suite.items), len(suite.gates(a.name, gated, schedules)), cfg.max_new_tokens))
  p.plan(prefix + "benign", len(suite.benign) * len(suite.benign_gates(gated, schedules))
         * cfg.max_new_tokens)
  if classifier:
    p.plan(prefix + "classifier", len(suite.pairs))
  if suite.answers:
    p.plan(prefix + "self_answer_nll", len(suite.answers))
  benchmarks.plan(suite, prefix)
  if overhead:
    o = cfg.overhead
    p.plan(prefix + "overhead", o.n_prompts * o.new_tokens * (o.repeats + 1)
           * (len(overhead_gates(cfg, schedules)) + 1))


def overhead_gates(cfg, schedules: bool = True) -> list[str]:
  """The gates timed against gate off: ``overhead.schedules``, or a baseline's one defence-on
  setting, ``gate_on``."""
  return names(cfg.overhead.schedules) if schedules else [cfg.gate_on]


def has_classifier(model: Defence) -> bool:
  """Whether ``model.classify`` works: a [CLS] head, or a baseline's own classifier."""
  return bool(getattr(model, "has_classifier", model.has_cls_head))


def _to_json(records: Sequence[AttackedGeneration]) -> list[dict]:
  return [r.to_json() for r in records]


def _from_json(rows: Sequence[dict]) -> list[AttackedGeneration]:
  return [AttackedGeneration.from_json(d) for d in rows]


def attack_payload(common: dict, attack: base.Attack, gates: Sequence[str],
                   main_records: dict[str, list[AttackedGeneration]] | None = None) -> dict:
  """What an attack's stored records depend on: the shared part, its settings and gates, and
  the main model's records only for a baseline run that replays them
  (``attack.replays_main_records``)."""
  payload = dict(common, attack=attack.config(), gates=list(gates))
  if main_records is not None and attack.replays_main_records:
    payload["main"] = key(_to_json(main_records[attack.name]))
  return payload


def evaluate_defence(model: Defence, suite: Suite, *, model_id: str, prefix: str = "",
                     attacks: Sequence[base.Attack] | None = None, gated: bool | None = None,
                     main_records: dict[str, list[AttackedGeneration]] | None = None,
                     overhead: bool | None = None, schedules: bool = True) -> tuple[dict, dict]:
  """One model-like object through the suite (module doc). ``prefix``: of its stored results'
  names; ``gated``: run the gates (default: iff it has [CLS]), else gate off only;
  ``schedules``: with the schedule baselines (else off and ``gate_on`` only: a competitor
  baseline, whose defence is one setting); ``main_records``: the [CLS] model's records, given
  to ``attack.run_baseline`` (a baseline may replay them) instead of running ``attack.run``.
  Returns ({"attacks", "benign", "classifier", "self_answer_nll", "utility_benchmarks",
  "benign_everyday", "overhead", ...}, records by attack name and "benign");
  ``self_answer_nll`` ({"nll", "n"}, ``eval.utility``) only with reference answers,
  ``utility_benchmarks`` and ``benign_everyday`` (``eval.benchmarks``) only when the config
  runs them."""
  cfg, log = suite.cfg, suite.log
  attacks = suite.attacks if attacks is None else list(attacks)
  gated = model.has_cls_head if gated is None else gated
  classifier = gated and has_classifier(model)  # an ungated baseline's head is not its defence
  overhead = bool(gated and model.has_cls_head and cfg.overhead.n_prompts) \
      if overhead is None else overhead
  if prefix + "benign" not in suite.progress.planned:
    plan(suite, prefix, attacks, gated, classifier, overhead, schedules)
  common = suite.common(model_id)
  out: dict[str, Any] = dict(attacks={})
  records: dict[str, list[AttackedGeneration]] = {}

  def run_attack(attack, gates):
    t0 = time.perf_counter()
    log(f"{prefix}{attack.name}: running under gates {gates}")
    if main_records is None:
      recs = attack.run(model, suite.items, gates, suite.settings)
    else:
      recs = attack.run_baseline(model, suite.items, main_records[attack.name], suite.settings)
    return dict(records=_to_json(recs), seconds=time.perf_counter() - t0)

  for attack in attacks:
    gates = suite.gates(attack.name, gated, schedules)
    payload = attack_payload(common, attack, gates, main_records)
    stored = suite.step(prefix + attack.name, payload,
                        lambda a=attack, g=gates: run_attack(a, g))
    recs = records[attack.name] = _from_json(stored["records"])
    entry = out["attacks"][attack.name] = metrics.attack_summary(
        attack, recs, suite.items, suite.judge, gates, cfg.gate_on, stored["seconds"],
        newline_tokens=len(model.tokenizer.encode("\n")),
        groups=suite.groups.get("malicious", ()))
    suite.headline(f"{prefix}{attack.name}: " + report.asr_line(entry, cfg.gate_on, gated))

  gates = suite.benign_gates(gated, schedules)
  benign_items = [Item(p, "") for p in suite.benign]
  stored = suite.step(prefix + "benign", dict(common, items=suite.benign, gates=gates),
                      lambda: dict(records=_to_json(DirectAttack().run(
                          model, benign_items, gates, suite.settings))))
  records["benign"] = _from_json(stored["records"])
  out["benign"] = metrics.over_refusal(records["benign"], suite.judge, gates, cfg.gate_on,
                                       suite.groups.get("benign", ()))
  rule = tradeoff.rule_of(model, cfg) if gated else None
  if rule:
    out["tradeoff"] = tradeoff.curves(records, suite.items, suite.judge,
                                      {a.name: a.reduce for a in attacks}, cfg.gate_on, *rule,
                                      newline_tokens=len(model.tokenizer.encode("\n")))

  out["classifier"] = dict(auroc=None, accuracy=None, f1=None, n=0)
  if classifier:
    prompts = [p["prompt"] for p in suite.pairs]
    probs = suite.step(prefix + "classifier", dict(model=model_id, prompts=prompts),
                       lambda: model.classify(prompts).tolist())
    out["classifier"] = classifier_metrics(
        np.array(probs), np.array([p["label"] for p in suite.pairs]), cfg.gate.threshold)
    if suite.groups.get("classifier"):
      out["classifier"].update(metrics.classifier_by_group(
          np.array(probs), np.array([p["label"] for p in suite.pairs]),
          suite.groups["classifier"], cfg.gate.threshold))
  if suite.answers:
    prompts = [a["prompt"] for a in suite.answers]
    answers = [a["response"] for a in suite.answers]
    nll = suite.step(prefix + "self_answer_nll", dict(model=model_id, answers=suite.answers),
                     lambda: utility.self_answer_nll(model, prompts, answers))
    out["self_answer_nll"] = dict(nll=nll, n=len(prompts))
  out.update(benchmarks.evaluate(model, suite, model_id=model_id, prefix=prefix, gated=gated))
  out["overhead"] = {}
  if overhead:
    o = cfg.overhead
    prompts = [p["prompt"] for p in suite.pairs][:o.n_prompts]
    timed = overhead_gates(cfg, schedules)
    t = suite.step(prefix + "overhead", dict(model=model_id, overhead=dict(o), gates=timed,
                                             prompts=prompts, gate=dict(cfg.gate)),
                   lambda: timing(model, prompts, timed, new_tokens=o.new_tokens,
                                  repeats=o.repeats, log=log))
    seconds = t["seconds"]
    out["overhead"] = {s: seconds[s] / seconds[GATE_OFF] - 1 for s in timed}
    out["overhead_seconds"] = seconds
    out["overhead_tokens"] = t["tokens"]
    out["overhead_setup"] = dict(n_prompts=len(prompts), new_tokens=o.new_tokens,
                                 repeats=o.repeats,
                                 baseline="the same model's generate, gate off; EOS disabled")
  return out, records


def evaluate_model(model: Defence, cfg, out_dir: str, *, model_id: str, items: Sequence[Item],
                   benign: Sequence[str], all_pairs: Sequence[dict] = (), baseline=None,
                   baseline_id: str = "",
                   defences: Mapping[str, tuple[Any, str]] | None = None,
                   log: Callable[[str], None] | None = None,
                   judge: Judge | None = None,
                   answers: Sequence[dict] = (),
                   groups: Mapping[str, Sequence[str]] | None = None) -> tuple[dict, dict]:
  """The suite on a loaded [CLS] model, optionally its no-[CLS] baseline (gate off; its ASR
  goes into each attack's entry as ``asr_no_cls``) and the competitor ``defences`` ({name:
  (model-like object, model id)}, ``competitors.build``: into ``results["baselines"]``),
  storing under ``out_dir/cache``. Returns (results.json dict, records by entry; the
  baseline's prefixed ``no_cls_``; the competitors' are not kept)."""
  log = log or logger(time.time())
  suite = make_suite(cfg, out_dir, items, benign, all_pairs, log=log, judge=judge,
                     answers=answers, groups=groups)
  chosen = names(cfg.baseline_attacks)
  unknown = sorted(set(chosen) - {a.name for a in suite.attacks})
  if unknown and baseline is not None:
    raise ValueError(f"baseline_attacks {unknown} are not in attacks={cfg.attacks!r}.")
  baseline_attacks = [a for a in suite.attacks if not chosen or a.name in chosen]
  plan(suite, "", suite.attacks, True, model.has_cls_head,
       bool(model.has_cls_head and cfg.overhead.n_prompts))
  if baseline is not None:
    plan(suite, "no_cls_", baseline_attacks, False, False, False)
  defences = dict(defences or {})
  for name, (m, _) in defences.items():
    plan(suite, f"{name}_", competitors.attacks_for(suite.attacks), True, has_classifier(m),
         bool(cfg.overhead.n_prompts), schedules=False)

  results: dict[str, Any] = dict(model=model_id, n_malicious=len(suite.items),
                                 n_benign=len(suite.benign), gate_on=cfg.gate_on,
                                 judge=cfg.judge.harm,
                                 leak_min_tokens=suite.judge.leak_min_tokens)
  main, records = evaluate_defence(model, suite, model_id=model_id)
  results.update(main)
  if baseline is not None:
    bl, bl_records = evaluate_defence(baseline, suite, model_id=baseline_id, prefix="no_cls_",
                                      attacks=baseline_attacks, gated=False,
                                      main_records=records, overhead=False)
    for name, a in bl["attacks"].items():
      results["attacks"][name].update(asr_no_cls=a["asr_gate_off"],
                                      asr_no_cls_ci=a["asr_gate_off_ci"], n_no_cls=a["n"])
    b = bl["benign"]
    results["baseline_no_cls"] = dict(model=baseline_id, over_refusal=b["over_refusal_gate_off"],
                                      over_refusal_ci=b["over_refusal_gate_off_ci"], n=b["n"],
                                      phase=(getattr(baseline, "loaded_from", None)
                                             or {}).get("phase"))
    results["baseline_no_cls"].update({k: bl[k] for k in benchmarks.ENTRY_KEYS if k in bl})
    records.update({f"no_cls_{k}": v for k, v in bl_records.items()})
  if defences:
    results["baselines"] = {}
  for name, (m, mid) in defences.items():
    entry, _ = evaluate_defence(m, suite, model_id=mid, prefix=f"{name}_",
                                attacks=competitors.attacks_for(suite.attacks), gated=True,
                                overhead=bool(cfg.overhead.n_prompts), schedules=False)
    if not has_classifier(m):
      del entry["classifier"]
    results["baselines"][name] = entry
  source = benchmarks.source_entry(suite, baseline, results.get("baseline_no_cls"), defences)
  if source:
    results["source"] = source
  if "tradeoff" in results:
    results["tradeoff"] = tradeoff.assemble(results, results.get("baselines", {}))
  results["judge_unparsed"] = suite.judge.unparsed
  return results, records


def logger(t0: float) -> Callable[[str], None]:
  def log(msg: str) -> None:
    console.say(f"[evaluate {time.time() - t0:6.1f}s] {msg}")
  return log
