"""The CPU demo: a ~2M-parameter model trained on the procedurally generated demo corpus.

Pretraining phase (labelled documents, [CLS] reads the whole document), then the SFT phase
(chat pairs, [CLS] reads the query; window [CLS] rows read spans of responses).

  python -m safety_align.train --config=configs/tiny.py --workdir=runs/tiny
"""

import ml_collections


def get_config(arg=None):
  """``arg`` selects a variant: ``smoke`` shrinks everything for tests."""
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
  # About 1.8M tokens: ~8 minutes on 2 idle CPU cores. The corpus' held-out split (unseen
  # topics and phrasings) is what these were tuned on: see data/corpus.py.
  c.pretrain = phase_config(steps=250, batch_size=16, cls_weight=0.1, lr=3e-3, split="pretrain")
  # A short SFT phase next to pretraining, as for real aligned models: it teaches refusals and
  # the query [CLS] but leaves the pretrained harmful continuations in place, so without the
  # gate the alignment is shallow (prefill attacks work), as the paper finds. 200 SFT steps
  # overwrote them (gate-off prefill_5 continuation 3%); 100 steps keep them for the [CLS]
  # model (67%), whose response tokens read [CLS], but the no-[CLS] baseline still drifted to
  # benign steps after short prefills (prefill 5/10/20/40: 25/38/69/56%): SFT was ~30% of all
  # training tokens, far more than for a real model. So, as real SFT recipes do, one pretraining
  # document is replayed per SFT pair (LM loss only; data/pipeline.py): the baseline then keeps
  # them (100/100/100/100%, direct requests still 0%) and the [CLS] model's held-out accuracy
  # rose (0.960 -> 0.985). 50 steps (88/94/100/100%, accuracy 0.965) or lr 3e-4
  # (88/100/100/100%, 0.975) kept them too, but shrink the SFT updates; replay keeps them as
  # tuned. λ2 = 0.3 (paper: 0.1) so the query [CLS] reaches >= 0.95 held-out accuracy in 100
  # steps.
  c.sft = phase_config(steps=100, batch_size=16, cls_weight=0.3, lr=1e-3, split="sft")
  c.sft.replay = 1.0                  # pretraining documents mixed in per SFT pair (0: none)
  c.sft.window_augmentation = True   # window [CLS] rows over response spans (METHOD.md sec. 4)
  c.sft.window = 10                   # r2: tokens per window row
  # (ours, like the window rows) The gate inserts the refusal prefix mid-response (METHOD.md
  # sec. 5), but every malicious SFT pair is query -> refusal -> EOS: after an inserted refusal
  # the model had never seen one end, wrote its reason and went back to the harmful steps
  # (leak after prefill 5/10/20/40: 31/6/88/38%). Recovery examples show it: the first 5-40
  # tokens of a pair's harmful response (never LM targets), a newline, its refusal and EOS, for
  # this fraction of the malicious pairs. With 0.5 (SFT retrained from the same pretraining
  # checkpoint) the leak fell to 0/0/0/0%; the same recipe deepens the no-[CLS] baseline a
  # little (prefill 5/10 100/100% -> 50/62%), as Qi et al.'s augmentation does.
  c.sft.recovery = 0.5

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100, keep=2, async_save=True))
  c.log_every_steps = 10

  if arg not in (None, "", "smoke"):
    raise ValueError(f"configs/tiny.py: unknown variant {arg!r}; expected '' or 'smoke'.")
  if arg == "smoke":
    c.model.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
    c.data.seq_len = 128
    c.data.overlong = "truncate_response"  # 128 tokens cut a third of the examples' answers
    for phase in (c.pretrain, c.sft):
      phase.update(steps=6, batch_size=4, warmup_steps=2)
    c.checkpoint.every_steps = 2
    c.log_every_steps = 2
  return c


def phase_config(*, steps, batch_size, cls_weight, lr, split):
  """One training phase: its data split, length, λ (``cls_weight``) and optimiser."""
  return ml_collections.ConfigDict(dict(
      split=split,
      steps=steps,
      batch_size=batch_size,       # global batch, in packed rows of data.seq_len tokens
      cls_weight=cls_weight,       # λ of L = L_lm + λ·L_cls
      lr=lr,
      schedule="cosine",           # "cosine" (warmup + cosine) | "step" (the paper's step decay) | "constant"
      warmup_steps=20,
      end_lr_fraction=0.1,
      weight_decay=0.1,
      b1=0.9, b2=0.95,
      grad_clip=1.0,
      grad_accum=1,                # optax.MultiSteps when > 1
      recovery=0.0,                # SFT only: fraction of malicious pairs with a harmful
                                   # response that also get a recovery example (data/pipeline.py)
  ))
