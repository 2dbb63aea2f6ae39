"""Logits and greedy tokens of a converted model against transformers' on the same tokens.

  python -m safety_align.tools.check_parity --hf_dir=SRC [--converted=DIR] [--prompt="..."]
  python -m safety_align.tools.check_parity --gguf=FILE [--converted=DIR] [--max_new_tokens=64]

The reference is transformers' model of SRC (an HF checkpoint) or of FILE (its own GGUF loader,
``from_pretrained(dir, gguf_file=name)``, dequantized the same way). Without ``--converted``
the source is imported (float32) into a temporary directory first.

Logits: on ``--prompt`` (BOS prepended when the tokenizer omits it) and on each chat prompt,
the max |ours - hf| over positions and vocabulary, that divided by max |hf| (relative), and
KL(hf || ours) of the next-token distributions (mean and max); exits 1 when the relative diff
or the max KL is over its tolerance, or when our rendering of a chat prompt has other ids than
the reference's. Our side runs with float32 matmul precision (no TF32 on GPUs). The defaults
suit float32 conversions; a bfloat16 one needs roughly --max_rel_diff=3e-2 --max_kl=1e-2.

Greedy tokens (when the reference tokenizer has a chat template): each ``--chat_prompt`` as a
user turn rendered by that template, then ``--max_new_tokens`` greedy tokens from
``SafetyModel.generate(gate="off")`` and from HF ``generate(do_sample=False)``, compared token
by token. Our model runs as a plain LM (``uses_cls=False``): an imported model's [CLS] is
untrained, and a [CLS]-trained gate="off" lets response tokens attend to it. Ours renders the
prompt with the import's chat template and tokenizer, HF with its own (the rendered ids are
checked to be the same). Needs torch and transformers.
"""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

from absl import app
from absl import flags
import jax
import numpy as np
import tokenizers

import safety_align as sa
from safety_align import convert, workdir

FLAGS = flags.FLAGS
CHAT_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
                "Explain what a neural network is in two sentences.",
                "Give me three tips for staying focused while studying.")


def _define_flags() -> None:
  """The command line's flags (defined on demand: importing this module defines none)."""
  flags.DEFINE_string("hf_dir", None, "HF checkpoint directory (the reference).")
  flags.DEFINE_string("gguf", None, "llama.cpp .gguf file (the reference: transformers' loader).")
  flags.DEFINE_string("converted", "", "Import output of the source ('' = import now).")
  flags.DEFINE_string("prompt", "The capital of France is Paris. The capital of Italy is",
                      "Text to compare logits on (BOS prepended when the tokenizer omits it).")
  flags.DEFINE_multi_string("chat_prompt", list(CHAT_PROMPTS),
                            "User turns for the logits and greedy-token comparison.")
  flags.DEFINE_integer("max_new_tokens", 64, "Greedy tokens per chat prompt (0 = skip).")
  flags.DEFINE_float("max_rel_diff", 1e-3, "Tolerance on max|diff| / max|hf logits|.")
  flags.DEFINE_float("max_kl", 1e-5, "Tolerance on the max next-token KL(hf || ours).")


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(hf: np.ndarray, ours: np.ndarray) -> dict[str, float]:
  """Parity metrics of logits [..., V]: max_abs_diff, rel_diff, kl_mean, kl_max."""
  diff = float(np.abs(hf.astype(np.float64) - ours).max())
  log_p, log_q = _log_softmax(hf), _log_softmax(ours)
  kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  return dict(max_abs_diff=diff, rel_diff=diff / float(np.abs(hf).max()),
              kl_mean=float(kl.mean()), kl_max=float(kl.max()))


def reference(source: str):
  """transformers' (model, tokenizer) of an HF directory or a .gguf file."""
  import torch  # Test-only peers: imported here so the module loads without them.
  import transformers

  if os.path.isfile(source):
    where = dict(pretrained_model_name_or_path=os.path.dirname(os.path.abspath(source)),
                 gguf_file=os.path.basename(source))
  else:
    where = dict(pretrained_model_name_or_path=source)
  model = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
  return model.eval(), transformers.AutoTokenizer.from_pretrained(**where)


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def logits_metrics(hf_model, converted: str, prompt: str) -> dict[str, float]:
  """Logits metrics of ``converted`` against ``hf_model`` on ``prompt``."""
  meta = workdir.read_config(converted)
  ids = tokenizers.Tokenizer.from_file(os.path.join(converted, "tokenizer.json")).encode(prompt).ids
  bos = meta["special_tokens"]["bos_id"]
  if bos is not None and ids[:1] != [bos]:
    ids = [bos] + ids
  tokens = np.asarray([ids])
  with jax.default_matmul_precision("float32"):
    ours = sa.load(converted, uses_cls=False).lm_logits(tokens)
  return dict(tokens=len(ids), **compare(_hf_logits(hf_model, tokens), ours))


def run(source: str, converted: str, prompt: str) -> dict[str, float]:
  """Logits metrics of ``converted`` (an import of ``source``: an HF dir or a .gguf file)."""
  return logits_metrics(reference(source)[0], converted, prompt)


def greedy(hf_model, hf_tok, converted: str, prompts: Sequence[str],
           max_new_tokens: int) -> dict:
  """Greedy decoding of ``prompts`` (user turns) by ours -- ``sa.load(converted,
  uses_cls=False)``, gate="off", rendered by its chat template -- and by ``hf_model`` on
  ``hf_tok``'s rendering: per prompt both token lists and whether the two renderings have the
  same ids, and the worst logits metrics over the renderings."""
  import torch

  ours = sa.load(converted, uses_cls=False)
  with jax.default_matmul_precision("float32"):
    generations = ours.generate(list(prompts), max_new_tokens=max_new_tokens, gate="off")
  eos_ids = list(ours.eos_ids)
  rows, logits = [], []
  for prompt, gen in zip(prompts, generations):
    our_ids = [t for ids, _ in ours.template.prompt_pieces(ours.tokenizer, prompt) for t in ids]
    text = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                      add_generation_prompt=True)
    hf_ids = hf_tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
      out = hf_model.generate(torch.tensor([hf_ids]), do_sample=False,
                              max_new_tokens=max_new_tokens, pad_token_id=ours.tokenizer.pad_id)
    hf_new = [int(t) for t in out[0, len(hf_ids):]]
    hf_new = hf_new[:next((i for i, t in enumerate(hf_new) if t in eos_ids), len(hf_new))]
    rows.append(dict(same_prompt_ids=our_ids == hf_ids, ours=gen.tokens, hf=hf_new,
                     text=gen.text))
    if our_ids == hf_ids:
      with jax.default_matmul_precision("float32"):
        lm = ours.lm_logits(np.asarray([our_ids]))
      logits.append(compare(_hf_logits(hf_model, np.asarray([hf_ids])), lm))
  return dict(rows=rows, logits=max(logits, key=lambda m: m["rel_diff"], default=None))


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
  n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  return None if n == len(a) == len(b) else n


def main(argv):
  del argv
  if bool(FLAGS.hf_dir) == bool(FLAGS.gguf):
    raise app.UsageError("Pass exactly one of --hf_dir and --gguf.")
  source = FLAGS.hf_dir or FLAGS.gguf
  failed = False
  with tempfile.TemporaryDirectory() as tmp:
    converted = FLAGS.converted
    if not converted:
      converted = os.path.join(tmp, "converted")
      if FLAGS.gguf:
        convert.import_gguf(FLAGS.gguf, converted)
      else:
        convert.import_hf(FLAGS.hf_dir, converted)
    hf_model, hf_tok = reference(source)
    m = logits_metrics(hf_model, converted, FLAGS.prompt)
    print(f"logits, --prompt ({m['tokens']} tokens): max|diff| {m['max_abs_diff']:.3e}  "
          f"relative {m['rel_diff']:.3e}  KL(hf||ours) mean {m['kl_mean']:.3e} "
          f"max {m['kl_max']:.3e}")
    checks = [m]
    if FLAGS.max_new_tokens and FLAGS.chat_prompt and hf_tok.chat_template:
      g = greedy(hf_model, hf_tok, converted, FLAGS.chat_prompt, FLAGS.max_new_tokens)
      if g["logits"]:
        c = g["logits"]
        checks.append(c)
        print(f"logits, chat prompts (worst of {len(g['rows'])}): max|diff| "
              f"{c['max_abs_diff']:.3e}  relative {c['rel_diff']:.3e}  KL max {c['kl_max']:.3e}")
      print(f"greedy, {FLAGS.max_new_tokens} new tokens per prompt; ours = "
            "SafetyModel.generate(gate='off') loaded with uses_cls=False (a plain LM, no "
            "[CLS]); hf = generate(do_sample=False):")
      same = 0
      for prompt, row in zip(FLAGS.chat_prompt, g["rows"]):
        diverge = _first_difference(row["ours"], row["hf"])
        same += diverge is None
        state = ("identical" if diverge is None
                 else f"DIFFER from token {diverge} (ours {len(row['ours'])}, hf {len(row['hf'])})")
        if not row["same_prompt_ids"]:
          state += "; our prompt ids DIFFER from HF's rendering"
          failed = True
        print(f"  {prompt!r}: {len(row['ours'])} tokens, {state}\n    -> {row['text']!r}")
      print(f"greedy: {same}/{len(g['rows'])} prompts token-identical")
    else:
      print("greedy: skipped (--max_new_tokens=0, no --chat_prompt, or no chat template)")
  if any(c["rel_diff"] > FLAGS.max_rel_diff or c["kl_max"] > FLAGS.max_kl for c in checks):
    print(f"FAIL: tolerance max_rel_diff={FLAGS.max_rel_diff:g}, max_kl={FLAGS.max_kl:g}")
    failed = True
  if failed:
    raise SystemExit(1)
  print("OK")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
