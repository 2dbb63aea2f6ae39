"""SmolLM2-135M-Instruct-CLS: the paper's second recipe (SFT with [CLS] from an aligned instruct
model, METHOD.md sec. 4) at a size a 2-core CPU trains in minutes (``make demo-real``).

``arg``: ``[VARIANT[+VARIANT...]][:IMPORT_DIR]`` or ``IMPORT_DIR``; the import directory is the
``convert import_gguf`` output (default ``runs/smollm2/import``). ``make demo-real``
(``safety_align/demo_real.py``) writes it, the SFT records (``<workdir>/data/sft.jsonl``) and
this run's workdir. The README gives the measured effect of each choice below. ``VARIANTS``
are the ablation's alternatives: the trainable set (``full``, the default: every parameter;
``top10``: layers 20-29, the recipe before the validation ablations; ``top20``: layers
10-29), λ2 (``lambda0.1``, ``lambda0.3``,
``lambda3``; default 1; λ_w stays 0.1), ``whole_windows`` (a harmful response's window
rows all 1, its compliant opening sentence included: the recipe before issue 25),
``trained_prefix`` (the refusals' opening "Sorry, I cannot fulfill your request because" an
LM target as well) and ``eot_cls`` ([CLS] starts as the end-of-turn token's embedding,
``init_cls_embed``); ``demo`` is ``make demo``'s shorter run of it.

  python -m safety_align.train --config=configs/smollm2_135m_cls.py:top20:runs/smollm2/import \\
      --workdir=runs/smollm2_top20 --config.data.data_dir=runs/smollm2/data
"""

from safety_align.config_lib import check_variant, set_paths, sibling_config

_CLS = "cls_embed|cls_head"  # the [CLS] embedding and head (each layer's gate: its layer)
VARIANTS = {  # dotted paths into the config
    "top10": {"sft.trainable": rf"^({_CLS}|layer_2[0-9])(/|$)"},
    "top20": {"sft.trainable": rf"^({_CLS}|layer_[12][0-9])(/|$)"},
    "full": {"sft.trainable": ""},
    "lambda0.1": {"sft.cls_weight": 0.1},
    "lambda0.3": {"sft.cls_weight": 0.3},
    "lambda3": {"sft.cls_weight": 3.0},
    "whole_windows": {"sft.harmful_opener": ""},
    # The refusals' prefix an LM target too: the model wrote it unprompted on safe prompts
    # (the recipe before the validation ablations).
    "trained_prefix": {"sft.untrained_refusal_prefix": ""},
    # [CLS] starts as the embedding of the template's end of turn (the token whose state
    # summarises the user's message) instead of the importer's content-free mean.
    "eot_cls": {"init_cls_embed": "<|im_end|>"},
    # make demo: the same recipe for fewer steps on its smaller data (demo_real --preset=demo).
    "demo": {"sft.steps": 28, "sft.warmup_steps": 4},
}


def parse_arg(arg):
  """``(variants, import_dir)`` of ``get_config``'s ``arg`` (see the module docstring)."""
  head, sep, tail = (arg or "").partition(":")
  if not sep and not all(v in VARIANTS for v in head.split("+")):
    head, tail = "", head  # a bare import directory
  variants = [v for v in head.split("+") if v]
  for v in variants:
    check_variant(__file__, v, tuple(VARIANTS))
  return variants, tail or "runs/smollm2/import"


def get_config(arg=None):
  """``arg``: ``[VARIANT[+VARIANT...]][:IMPORT_DIR]`` or ``IMPORT_DIR``."""
  variants, import_dir = parse_arg(arg)
  c = sibling_config(__file__, "finetune_imported", import_dir)
  c.data.seq_len = 256            # system + template + query + a 64-token answer, packed
  c.sft.update(
      steps=100,                  # about one epoch of the ~1,700 records and window segments
      batch_size=8,               # packed rows of 256 tokens: ~20 examples per step
      grad_accum=1,
      lr=5e-5,
      cls_lr_scale=40.0,          # 2e-3 for the fresh [CLS] parameters and gates
      cls_weight=1.0,             # λ2 (the window rows' λ_w stays finetune_imported's 0.1)
      warmup_steps=8,
      # Window [CLS] rows (r2 = 10 tokens) over the answers and refusals (benign text, 0) and
      # over the source's own continuation of "Sure, here is" (never an LM target): 0 over its
      # opening sentence, 1 from the first span past it (data/encoding.past_opener). Without
      # them the gate's re-evaluations of generated text are untrained and refused 82% of the
      # over-refusal prompts under annealing.
      window_augmentation=True,
      window=10,
      harmful_opener="Sure, here is",
      # The gate inserts the refusal prefix; the refusals teach the reason that follows it
      # (an LM target) but not the prefix itself (data/encoding.encode_sft). Trained on it, the
      # model wrote "Sorry, I cannot fulfill your request because I am not a human." unprompted
      # on 40% of the edgy-safe validation prompts (README, ablations).
      untrained_refusal_prefix="Sorry, I cannot fulfill your request because",
      # Every parameter: on the held-out validation source, full fine-tuning ranked [CLS]
      # at AUROC 0.982-0.990 (two seeds) against 0.963-0.969 for the top 10 layers, and the
      # calibrated gate let 10.9% of direct requests through against 19.6-30.4%, for ~1.4x
      # the training time (README, ablations).
      trainable="",
  )
  for v in variants:
    set_paths(c, VARIANTS[v])
  c.checkpoint.update(every_steps=40, keep=1)
  c.log_every_steps = 5
  return c
