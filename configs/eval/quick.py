"""The quick attack evaluation (``make demo``): 16 malicious / 16 benign prompts, a 7-setting
decoding sweep, GCG and adaptive GCG on 2 prompts for 100 steps (128 candidates, 20 suffix
tokens), 3 prompts x every built-in template. Fields: ``safety_align.evaluate.quick_config``.

  python -m safety_align.evaluate --workdir=runs/tiny --config=configs/eval/quick.py

``:smoke`` shrinks it further for the notebook tests (4 prompts, few steps, no baseline).
"""

from safety_align import evaluate


def get_config(arg=None):
  c = evaluate.quick_config()
  if arg == "smoke":
    c.update(n_malicious=4, n_benign=4, max_new_tokens=16, train_baseline=False)
    c.decoding.update(temperatures="0.7", top_ps="0.9", top_ks="5", n_prompts=4)
    c.gcg.update(steps=2, search_width=16, topk=16, n_suffix=4)
    c.templates.n_prompts = 1
    c.overhead.update(n_prompts=2, new_tokens=8, repeats=1)
  elif arg:
    raise ValueError(f"configs/eval/quick.py: unknown variant {arg!r}; expected '' or 'smoke'.")
  return c
