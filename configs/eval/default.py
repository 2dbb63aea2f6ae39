"""The full attack evaluation: every held-out malicious prompt, every attack, the full
decoding sweep, GCG with nanoGCG's budget. Fields: ``safety_align.evaluate.default_config``.

  python -m safety_align.evaluate --workdir=runs/tiny --config=configs/eval/default.py
"""

from safety_align import evaluate


def get_config(arg=None):
  if arg:
    raise ValueError(f"configs/eval/default.py takes no variant, got {arg!r}; override fields "
                     "with --config.<field>=... instead.")
  return evaluate.default_config()
