"""``python -m safety_align.evaluate --workdir=DIR [--config=configs/eval/quick.py]
[--config.x=y]``: the attack suite (METHOD.md sections 6-7; the code is ``safety_align.eval``).

Writes ``DIR/eval/results.json`` (API.md schema, plus extra keys), ``DIR/eval/results.md``
(the tables), ``DIR/eval/asr_by_attack.png`` and ``DIR/eval/cls_trace.png``.

What one run measures, on the held-out prompts of the demo corpus (``sft_pairs("test")``,
topics and phrasings never trained on; duplicates dropped) or of ``held_out_dir``:

* per attack (``attacks/``, ``eval/registry.py``): ASR with the gate off and with ``gate_on``
  (annealing, the headline), with the schedules ``first``, ``periodic``, ``every`` for
  ``schedule_attacks``, and for the implicit-alignment baseline (the same SFT without [CLS],
  gate off: ``asr_no_cls``). Success = harm anywhere in the text the model wrote after any
  forced prefill, before or after an inserted refusal alike (``eval/judging.py``);
  ``refused_gate_on`` (inserted or self-written refusal) beside it; every rate with its Wilson
  95% interval (``*_ci``) and ``n``;
* over-refusal on the held-out benign prompts (the look-unsafe ones included): refusal string
  or inserted refusal;
* the first classification's AUROC, accuracy and F1 on all held-out prompts;
* the gate's overhead: the model's own ``generate``, same prompts, same lengths (EOS disabled),
  gate off vs each schedule, compiled first, best of ``overhead.repeats`` (``eval/timing.py``);
* with ``baselines=probe,deep_alignment,safedecoding`` (``eval/competitors.py``): each
  competitor baseline, built once into ``DIR/eval/baselines/<name>/`` over a model without
  [CLS] (``baselines_source``, default the no-[CLS] baseline) on the run's SFT records
  (``baselines_data``), through the same attacks, prompts, judge and seeds, gate off
  (undefended) vs its defence on, into ``results["baselines"][name]`` and one table of every
  defence in results.md.

Gate "off" means the gate never acts: a [CLS] model still reads [CLS] in the prompt pass (its
implicit path, as trained), without re-evaluation or insertion (``api.resolve_gate``).

Resumable: each step's generations (attacks, the baseline's, the benign set, the classifier,
the timing) are kept in ``DIR/eval/cache/<name>.json`` (``eval.store.ResultStore``) under a
key hashing the settings that change them and the checkpoint; a re-run reuses what matches.
Judging is redone every run. Progress lines give elapsed time, steps done and an ETA.
"""

from __future__ import annotations

import os
import sys

from safety_align import console
from safety_align.eval import EVAL_DIR, run
from safety_align.eval import config as eval_config

__all__ = ["EVAL_DIR", "quick_config", "run"]


def quick_config():
  """``configs/eval/quick.py``'s config (``make demo``)."""
  return eval_config.load("quick")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", os.path.join(eval_config.CONFIG_DIR, "default.py"),
      "Evaluation config (configs/eval/default.py, quick.py or real.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Training workdir of the [CLS] model.")
  flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
  """Run the evaluation; a problem with its input (``ValueError``, ``OSError``: a missing
  workdir, checkpoint or held-out file) ends in its one sentence, exit status 1 (the
  traceback with ``--verbosity=1``)."""
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")
  console.configure()
  try:
    print(run(flags.FLAGS.workdir, flags.FLAGS.config))
  except (ValueError, OSError) as e:
    logging.vlog(1, "evaluate failed", exc_info=True)
    sys.exit(f"evaluate: {e}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
