"""SmolLM2-135M-Instruct-CLS: the paper's second recipe (SFT with [CLS] from an aligned instruct
model, METHOD.md sec. 4) at a size a 2-core CPU trains in minutes (``make demo-real``).

``arg``: the ``convert import_gguf`` output (default ``runs/smollm2/import``); ``make
demo-real`` (``safety_align/demo_real.py``) writes it, the SFT records
(``<workdir>/data/sft.jsonl``) and this run's workdir. The README gives the measured effect of
each choice below.

  python -m safety_align.train --config=configs/smollm2_135m_cls.py:runs/smollm2/import \\
      --workdir=runs/smollm2 --config.data.data_dir=runs/smollm2/data
"""

from safety_align.config_lib import sibling_config


def get_config(arg=None):
  """``arg``: the import directory."""
  c = sibling_config(__file__, "finetune_imported", arg or "runs/smollm2/import")
  c.data.seq_len = 256            # system + template + query + a 64-token answer, packed
  c.sft.update(
      steps=100,                  # about one epoch of the ~1,700 records and window segments
      batch_size=8,               # packed rows of 256 tokens: ~20 examples per step
      grad_accum=1,
      lr=5e-5,
      cls_lr_scale=40.0,          # 2e-3 for the fresh [CLS] head and gates
      cls_weight=1.0,             # λ2
      warmup_steps=8,
      # Window [CLS] rows (r2 = 10 tokens) over the answers and refusals (benign text, 0) and
      # over the source's own continuation of "Sure, here is" (1, never an LM target): without
      # them the gate's re-evaluations of generated text are untrained and refused 82% of the
      # over-refusal prompts under annealing.
      window_augmentation=True,
      window=10,
      # The top 10 of 30 layers and the [CLS] head: the backward pass stops at layer 20,
      # the [CLS] row reads layers 0-19 frozen; lower layers' gates stay closed.
      trainable=r"^(cls_head|layer_2[0-9])/",
  )
  c.checkpoint.update(every_steps=40, keep=1)
  c.log_every_steps = 5
  return c
