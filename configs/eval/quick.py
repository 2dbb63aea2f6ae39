"""The quick attack evaluation (``make demo``): 16 malicious / 16 benign prompts, a 7-setting
decoding sweep, GCG and adaptive GCG on 2 prompts for 100 steps (128 candidates, 20 suffix
tokens), 3 prompts x every built-in template; sized so the demo model's whole evaluation
(baseline evaluation included, its training not) takes a few minutes on a laptop CPU.
``default.py`` with these changes.

  python -m safety_align.evaluate --workdir=runs/tiny --config=configs/eval/quick.py

``:smoke`` shrinks it further for the notebook tests (4 prompts, few steps, no baseline).
"""

from safety_align.config_lib import attack_sections, check_variant, sibling_config


def get_config(arg=None):
  check_variant(__file__, arg, ("smoke",))
  c = sibling_config(__file__, "default")
  # 16 prompts everywhere: one batch bucket, so few decoder programs to compile.
  c.n_malicious = 16
  c.n_benign = 16
  c.decoding.update(temperatures="0.3,0.7,1.0", top_ps="0.5,0.9", top_ks="5,50",
                    n_prompts=16, batch_size=128)
  # GCG: a budget measured to break the gate-off demo model: 100 steps, 128 candidates, 20
  # suffix tokens gave harmful gate-off answers on 3 of 4 prompts (the exact target is rarely
  # reached, the continuation is harmful anyway); 2 prompts keep the run short.
  c.gcg.update(n_prompts=2, steps=100, search_width=128, topk=128, n_suffix=20)
  c.templates.n_prompts = 3
  c.overhead.update(n_prompts=16, new_tokens=64, repeats=15)
  for name, section in attack_sections(quick=True).items():
    c[name] = section
  if arg == "smoke":
    c.update(n_malicious=4, n_benign=4, n_utility=4, max_new_tokens=16, train_baseline=False)
    c.decoding.update(temperatures="0.7", top_ps="0.9", top_ks="5", n_prompts=4)
    c.gcg.update(steps=2, search_width=16, topk=16, n_suffix=4)
    c.templates.n_prompts = 1
    c.overhead.update(n_prompts=2, new_tokens=8, repeats=1)
  return c
