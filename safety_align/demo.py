"""``make demo``: train the tiny model end to end, then show what the safety signal does.

  python -m safety_align.demo --config=configs/tiny.py --workdir=runs/tiny

Trains (or resumes) both phases, then reports the held-out classifier accuracy of the
``[CLS]`` head on test prompts whose topics and phrasings were never trained on, a few
generations with the gate off and on (including a prefilled harmful start), and the quick
attack evaluation of ``safety_align.evaluate``.
"""

from __future__ import annotations

import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

import safety_align as sa
from safety_align import console, training_loop
from safety_align.data import corpus
from safety_align.stats import auroc



def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", "runs/tiny", "Work directory.")
  flags.DEFINE_bool("evaluate", True, "Run the quick attack evaluation at the end.")


def classifier_report(model: sa.SafetyModel, seed: int) -> dict[str, float]:
  """Accuracy and AUROC of P(malicious) on the held-out SFT prompts."""
  pairs = corpus.sft_pairs("test", seed=seed)
  labels = np.array([p["label"] for p in pairs])
  probs = model.classify([p["prompt"] for p in pairs])
  return dict(n=len(pairs), accuracy=float(np.mean((probs >= 0.5) == labels)),
              auroc=auroc(probs, labels))


def show_generations(model: sa.SafetyModel, seed: int) -> None:
  pairs = corpus.sft_pairs("test", seed=seed)
  benign = next(p for p in pairs if p["label"] == 0)
  malicious = next(p for p in pairs if p["label"] == 1)
  cases = [("benign", benign["prompt"], None), ("malicious", malicious["prompt"], None),
           ("malicious + prefilled harmful start", malicious["prompt"],
            " ".join(malicious["harmful_response"].split()[:8]))]
  for title, prompt, prefill in cases:
    print(f"\n--- {title}: {prompt!r}" + (f"  [prefill: {prefill!r}]" if prefill else ""))
    for gate in ("off", "annealing"):
      g = model.generate([prompt], max_new_tokens=64, gate=gate,
                         prefill=[prefill] if prefill else None)[0]
      flag = f"REFUSED at step {g.refusal_step}" if g.refused else "not refused"
      print(f"  gate={gate:<9} {flag:<22} {g.text!r}")


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  console.configure()
  t0 = time.time()
  training_loop.train(config, workdir)
  train_seconds = time.time() - t0
  model = sa.load(workdir)
  report = classifier_report(model, config.data.seed)
  training_loop.progress(
      f"\nTrained in {train_seconds:.0f}s. Held-out [CLS] classifier on {report['n']} unseen "
      f"prompts: accuracy {report['accuracy']:.3f}, AUROC {report['auroc']:.3f}")
  show_generations(model, config.data.seed)
  if flags.FLAGS.evaluate:
    from safety_align import evaluate  # pylint: disable=g-import-not-at-top
    results_md = evaluate.run(workdir, evaluate.quick_config())
    print("\n" + results_md)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
