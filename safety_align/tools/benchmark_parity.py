"""A multiple-choice benchmark scored by ``SafetyModel.score`` against transformers scoring the
same requests as lm-evaluation-harness does.

  python -m safety_align.tools.benchmark_parity --gguf=FILE --converted=DIR \\
      [--task=arc_easy] [--n=0] [--data_dir=DIR]

Ours: the import ``--converted`` as the plain LM (``uses_cls=False``), each context as bare text
(``eval.benchmarks.mc_choices``, ``chat=False``). The reference: transformers' model of the
GGUF ``--gguf`` (its own loader and tokenizer), each request tokenised as the harness does (the
continuation's tokens are those of context + continuation after the context's), one forward
per question. Prints both ``acc`` / ``acc_norm`` with seconds per question and the share of
questions both score alike (right or wrong); exits 1 when the ``acc`` differ by more than
``--max_diff``. Needs torch and transformers.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

import safety_align as sa
from safety_align.eval import benchmarks

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("gguf", None, "llama.cpp .gguf file (the reference: transformers' loader).")
  flags.DEFINE_string("converted", None, "Import of the same file (convert import_gguf).")
  flags.DEFINE_string("task", "arc_easy", f"One of {benchmarks.TASKS}.")
  flags.DEFINE_integer("n", 0, "Questions (0: all), eval.benchmarks' fixed subset.")
  flags.DEFINE_string("data_dir", "", "Benchmark folder ('' = a temporary one).")
  flags.DEFINE_integer("batch_size", 16, "Our rows per forward pass.")
  flags.DEFINE_float("max_diff", 0.02, "Tolerance on |acc ours - acc transformers|.")
  flags.DEFINE_integer("torch_threads", 0, "torch's CPU threads (0: its default; on a small "
                       "shared machine 1 avoids oversubscription).")


def harness_choices(model, tokenizer, questions) -> dict:
  """transformers' per-question ``acc`` / ``acc_norm`` picks (``mc_choices``' format), each
  request tokenised as lm-evaluation-harness' ``_encode_pair``."""
  import torch  # pylint: disable=g-import-not-at-top
  acc, acc_norm = [], []
  for q in questions:
    rows = []
    for context, cont in zip(q["contexts"], q["continuations"]):
      n_space = len(context) - len(context.rstrip())  # trailing spaces go to the continuation
      context, cont = context[:len(context) - n_space], context[len(context) - n_space:] + cont
      whole = tokenizer(context + cont, add_special_tokens=False)["input_ids"]
      ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
      rows.append((whole, len(ctx)))
    width = max(len(w) for w, _ in rows)
    ids = torch.tensor([w + [0] * (width - len(w)) for w, _ in rows])
    mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w, _ in rows])
    with torch.no_grad():
      logp = torch.log_softmax(model(ids, attention_mask=mask).logits.double(), -1)
    ll = np.array([float(sum(logp[i, j - 1, w[j]] for j in range(n, len(w))))
                   for i, (w, n) in enumerate(rows)])
    chars = np.array([len(c) for c in q["continuations"]])
    acc.append(int(np.argmax(ll) == q["gold"]))
    acc_norm.append(int(np.argmax(ll / chars) == q["gold"]))
  return dict(acc=acc, acc_norm=acc_norm)


def main(argv) -> None:
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  data_dir = FLAGS.data_dir or tempfile.mkdtemp(prefix="benchmarks_")
  benchmarks.prepare(data_dir, [FLAGS.task], False)
  questions = benchmarks.read_questions(benchmarks.task_file(data_dir, FLAGS.task), FLAGS.n)
  ours_model = sa.load(FLAGS.converted, uses_cls=False, batch_size=FLAGS.batch_size)
  t0 = time.time()
  ours = benchmarks.mc_choices(ours_model, questions, chat=False)
  t_ours = time.time() - t0
  where = dict(pretrained_model_name_or_path=os.path.dirname(os.path.abspath(FLAGS.gguf)),
               gguf_file=os.path.basename(FLAGS.gguf))
  hf = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(**where)
  t0 = time.time()
  theirs = harness_choices(hf, tok, questions)
  t_hf = time.time() - t0
  n = len(questions)
  report = dict(task=FLAGS.task, n=n,
                ours=dict(benchmarks.mc_summary(ours), seconds_per_question=t_ours / n),
                transformers=dict(benchmarks.mc_summary(theirs), seconds_per_question=t_hf / n),
                same_verdict=float(np.mean(np.array(ours["acc"]) == np.array(theirs["acc"]))))
  print(json.dumps(report, indent=2))
  if abs(report["ours"]["acc"] - report["transformers"]["acc"]) > FLAGS.max_diff:
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["gguf", "converted"])
  app.run(main)
