"""The CPU demo: a ~2M-parameter model trained on the procedurally generated demo corpus.

Pretraining phase (labelled documents, [CLS] reads the whole document), then the SFT phase
(chat pairs, [CLS] reads the query; window [CLS] rows read spans of responses). Phase fields:
``safety_align.config_lib.phase_config``.

  python -m safety_align.train --config=configs/tiny.py --workdir=runs/tiny
"""

import ml_collections

from safety_align.config_lib import check_variant, phase_config


def get_config(arg=None):
  """``arg`` selects a variant: ``smoke`` shrinks everything for tests."""
  check_variant(__file__, arg, ("smoke",))
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Initial parameters: "" = random init; else an import_hf output (or another workdir) whose
  # latest checkpoint seeds the first phase (its model config must match c.model).
  c.init_from = ""
  c.init_phase = ""  # which of init_from's phases ("" = its most trained: sft, pretrain, import)
  # False trains the implicit-alignment baseline: no [CLS] token in the data, so L_cls = 0
  # and the model decodes as a plain LM (the lambda = 0 baseline of the evaluation).
  c.use_cls = True

  # Architecture (safety_align.model.ModelConfig; every field documented there).
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=2048, d_model=192, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=512,
      head_dim=0, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, qkv_bias=False,
      dtype="float32", param_dtype="float32", scan_layers=True, remat="none",
      init_scale=0.02))

  # Device mesh: sizes of the (data, fsdp, tensor) axes; -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # Data: the demo corpus (generated into the workdir) tokenised by a BPE trained on it.
  c.data = ml_collections.ConfigDict(dict(
      source="demo",          # "demo" | "jsonl"
      data_dir="",            # jsonl: folder with the phase's files; demo: TFDS data_dir ("" = WORKDIR/tfds)
      tokenizer="",           # path to tokenizer.json; "" = train a BPE on the demo corpus
      chat_template="demo",
      seq_len=256,
      overlong="drop",        # SFT examples > seq_len: "drop" | "truncate_response" | "error"
      seed=0,
  ))

  c.phases = "pretrain,sft"
  # Pretraining on the labelled documents; λ1 = 0.1 (METHOD.md's 0.01 is the paper's 7B value).
  c.pretrain = phase_config(split="pretrain", steps=250, batch_size=16, cls_weight=0.1,
                            lr=3e-3)
  # SFT: short next to pretraining, as for real aligned models, so that without the gate the
  # alignment stays shallow (prefill attacks work), as the paper finds.
  c.sft = phase_config(
      split="sft", steps=100, batch_size=16, lr=1e-3,
      cls_weight=0.3,             # λ2 (paper 0.1): raised so the query [CLS] trains in 100 steps
      replay=1.0,                 # pretraining documents per SFT pair (LM loss): keep continuations
      window_augmentation=True,   # window [CLS] rows over response spans (METHOD.md sec. 4)
      window=10,                  # r2: tokens per window row
      recovery=0.5)               # (ours) share of malicious pairs with a recovery example: an
                                  # inserted refusal then ends the response (data/pipeline.py)

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100, keep=2, async_save=True))
  c.log_every_steps = 10

  if arg == "smoke":
    c.model.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
    c.data.seq_len = 128
    c.data.overlong = "truncate_response"  # 128 tokens cut a third of the examples' answers
    for phase in (c.pretrain, c.sft):
      phase.update(steps=6, batch_size=4, warmup_steps=2)
    c.checkpoint.every_steps = 2
    c.log_every_steps = 2
  return c
