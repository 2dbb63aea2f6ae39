"""Hugging Face checkpoints and llama.cpp GGUF files <-> safety_align directories.

  python -m safety_align.convert import_hf --hf_dir=SRC --out=DIR [--dtype=bfloat16]
  python -m safety_align.convert import_gguf --gguf=FILE --out=DIR [--dtype=float32]
  python -m safety_align.convert export_hf --workdir=DIR --out=DST

Both imports turn their input into a :class:`Source` (HF-named tensors, an HF ``config.json``
dict, a tokenizer, the chat template, the special-token ids) and one writer checks it against
``hf_weights``' tables (every name and shape before any tensor is read), streams the tensors
in and writes DIR, which must be new or empty and never the source or inside it:

  config.json     {"format", "family", "model" (ModelConfig), "chat_template",
                   "special_tokens", "hf_config" (the source's, for export)}
  tokenizer.json  (+ tokenizer_config.json, which holds the BOS/EOS/PAD strings; from an HF
                  checkpoint also special_tokens_map.json, generation_config.json, and
                  chat_template.jinja, copied)
  checkpoints/import/0/   the (unboxed) parameters, through ``checkpoint.py`` -- the same
                  layout as a training workdir, so ``sa.load`` and ``train`` read both

``import_hf`` reads SRC's ``config.json``, ``tokenizer.json`` and ``*.safetensors`` (tensor by
tensor); ``import_gguf`` reads FILE through ``gguf_import`` (dequantized to float32 first).
``"chat_template"`` is the source's own Jinja template text (``chat_template.jinja`` or
``tokenizer_config.json``'s; GGUF ``tokenizer.chat_template``), else -- with a warning -- the
family's built-in template name (llama2/llama3/mistral/chatml); ``--chat_template`` overrides.

The new ``[CLS]`` parameters: ``cls_embed`` is the mean of the text embedding rows rescaled to
their mean L2 norm -- a content-free input of typical magnitude, unlike BOS, whose embedding
is an attention sink in Llama-family models and would pull text attention onto ``[CLS]``;
``cls_head`` has a zero bias and an N(0, (0.1/sqrt(D))^2) kernel, so initial logits are
~0.1 x the hidden RMS and P(malicious) starts near 0.5. Imports use the text -> [CLS] attention
gate (``model.cls_attention_gate``), zero-initialised, so the imported model generates exactly
as its source until training opens it. If SRC holds a ``safety_align_cls.safetensors``
(written by ``export_hf``), those values are restored instead.

``export_hf`` writes DST as ``<Family>ForCausalLM`` safetensors + config.json (sharded at 5 GB
with an index, as transformers does), the tokenizer files, and ``safety_align_cls.safetensors``
(``cls_embed`` [D], ``cls_head.kernel`` [D, 2], ``cls_head.bias`` [2], ``cls_gate`` [L, H]).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import shutil
import sys
from typing import Any, Callable, Iterator, Sequence

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
import tokenizers

from safety_align import checkpoint
from safety_align import console
from safety_align import gguf_import
from safety_align import hf_weights
from safety_align import model as model_lib
from safety_align import workdir
from safety_align.model import ModelConfig

FORMAT = "safety_align.convert/1"
CLS_FILE = "safety_align_cls.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16),
             "float16": np.dtype(np.float16)}


# --- parameters on disk (orbax) -----------------------------------------------------------------

def abstract_params(cfg: ModelConfig) -> Any:
  """Unboxed ShapeDtypeStruct tree of ``cfg``'s parameters (nothing allocated)."""
  return nn.meta.unbox(jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0))))


def load_converted(path: str) -> tuple[ModelConfig, Any, dict]:
  """(ModelConfig, params, config.json) of an ``import_hf`` output or a training workdir."""
  loaded = workdir.load_for_inference(path)
  return loaded.model_config, loaded.params, loaded.config


# --- plain LM logits (parity with the source model) ---------------------------------------------

def plain_lm_logits(cfg: ModelConfig, params: Any, token_ids: np.ndarray) -> np.ndarray:
  """Causal LM logits without [CLS]: token_ids [B, T] int -> [B, T, V] float32."""
  token_ids = np.asarray(token_ids)
  if token_ids.ndim != 2:
    raise ValueError(f"token_ids must be [B, T], got shape {token_ids.shape}.")
  if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= cfg.vocab_size):
    raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}) (no [CLS]); got "
                     f"[{token_ids.min()}, {token_ids.max()}].")
  return np.asarray(model_lib.plain_forward(cfg, params, jnp.asarray(token_ids, jnp.int32))[0],
                    np.float32)


# --- import --------------------------------------------------------------------------------------

def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _slot(flat: dict[str, np.ndarray], e: hf_weights.Entry, scan_layers: bool) -> np.ndarray:
  """Our array for ``e``: the parameter, or (scanned layout) its layer's slice, as a view."""
  if not scan_layers:
    return flat[e.path]
  return flat[e.scan_path()] if e.layer is None else flat[e.scan_path()][e.layer]


def _check_out(out: str, source: str) -> None:
  """Refuse an ``out`` that is ``source`` or inside it, or that holds anything already."""
  real_out, real_src = os.path.realpath(out), os.path.realpath(source)
  if real_out == real_src or real_out.startswith(real_src.rstrip(os.sep) + os.sep):
    raise ValueError(f"--out={out} is the source {source} or inside it; imports never write "
                     "into their input: pass a new directory.")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"--out={out} exists and is not an empty directory; pass a new "
                          "directory.")


@dataclasses.dataclass(frozen=True)
class Source:
  """A checkpoint to import: HF-named tensors and what describes them. Nothing is read until
  ``tokenizer`` / ``read`` are called."""

  path: str                                 # file or directory it comes from
  hf_config: dict                           # transformers config.json keys
  shapes: dict[str, tuple[int, ...]]        # HF tensor name -> HF shape
  read: Callable[[Sequence[str]], Iterator[tuple[str, np.ndarray]]]  # names -> (name, array)
  tokenizer: Callable[[int], tokenizers.Tokenizer]  # checked against the model's vocab_size
  special_ids: dict                         # bos_id, eos_ids (list), pad_id
  chat_template: str | None = None          # the source's own Jinja template
  files: tuple[str, ...] = ()               # files copied into the output beside tokenizer.json
  tokenizer_config: dict = dataclasses.field(default_factory=dict)  # when none is copied
  cls: dict[str, np.ndarray] | None = None  # CLS_FILE's tensors, restored instead of the init


def _read_tokenizer(hf_dir: str, vocab_size: int) -> tokenizers.Tokenizer:
  path = os.path.join(hf_dir, "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found. Write one with transformers: "
        "`AutoTokenizer.from_pretrained(SRC).save_pretrained(SRC)` (a fast tokenizer).")
  tok = tokenizers.Tokenizer.from_file(path)
  n = max(tok.get_vocab(with_added_tokens=True).values()) + 1
  if n > vocab_size:
    raise ValueError(
        f"{path} has token ids up to {n - 1} but config.json vocab_size={vocab_size}: the "
        "embedding has no rows for them. Use the tokenizer that belongs to this checkpoint.")
  return tok


def _hf_chat_template(hf_dir: str) -> str | None:
  """The checkpoint's Jinja chat template: ``chat_template.jinja``, else tokenizer_config.json's
  "chat_template" (a string, or a list of {name, template}: the "default" one)."""
  jinja = os.path.join(hf_dir, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja) as f:
      return f.read()
  config = os.path.join(hf_dir, "tokenizer_config.json")
  if not os.path.exists(config):
    return None
  with open(config) as f:
    template = json.load(f).get("chat_template")
  if isinstance(template, list):
    template = {t.get("name"): t.get("template") for t in template}.get("default")
  return template or None


def _hf_source(hf_dir: str) -> Source:
  """SRC's config.json, tokenizer files, chat template and safetensors (headers only)."""
  config = os.path.join(hf_dir, "config.json")
  if not os.path.exists(config):
    raise FileNotFoundError(f"{config} not found: --hf_dir must be a transformers checkpoint "
                            "directory (config.json + *.safetensors + tokenizer.json).")
  with open(config) as f:
    hf_cfg = json.load(f)
  files = sorted(f for f in glob.glob(os.path.join(hf_dir, "*.safetensors"))
                 if os.path.basename(f) != CLS_FILE)
  if not files:
    raise FileNotFoundError(
        f"No *.safetensors in {hf_dir}. Convert a .bin checkpoint first: "
        "`AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(DST)` writes safetensors.")
  index = {}  # HF tensor name -> (file, shape)
  for file in files:
    with safe_open(file, framework="numpy") as f:
      for name in f.keys():
        index[name] = (file, tuple(f.get_slice(name).get_shape()))

  def read(names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    by_file: dict[str, list[str]] = {}
    for name in names:
      by_file.setdefault(index[name][0], []).append(name)
    for file, group in by_file.items():
      logging.info("Reading %d tensors from %s", len(group), file)
      with safe_open(file, framework="numpy") as f:
        for name in group:
          yield name, f.get_tensor(name)

  gen = {}
  gen_file = os.path.join(hf_dir, "generation_config.json")
  if os.path.exists(gen_file):
    with open(gen_file) as f:
      gen = json.load(f)
  ids = {}
  for k in ("bos", "eos", "pad"):
    key = f"{k}_token_id"
    ids[k] = hf_cfg[key] if hf_cfg.get(key) is not None else gen.get(key)
  eos = [] if ids["eos"] is None else ids["eos"] if isinstance(ids["eos"], list) else [ids["eos"]]
  cls = None
  if os.path.exists(os.path.join(hf_dir, CLS_FILE)):
    with safe_open(os.path.join(hf_dir, CLS_FILE), framework="numpy") as f:
      cls = {name: f.get_tensor(name) for name in f.keys()}
  return Source(
      path=hf_dir, hf_config=hf_cfg, shapes={n: s for n, (_, s) in index.items()}, read=read,
      tokenizer=functools.partial(_read_tokenizer, hf_dir),
      special_ids=dict(bos_id=ids["bos"], eos_ids=eos, pad_id=ids["pad"]),
      chat_template=_hf_chat_template(hf_dir),
      files=tuple(n for n in TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, n))),
      cls=cls)


def _gguf_source(path: str) -> Source:
  """A llama.cpp GGUF file (metadata and tensor headers only) as a Source."""
  g = gguf_import.GGUFFile(path)
  return Source(path=path, hf_config=g.hf_config, shapes=g.shapes, read=g.tensors,
                tokenizer=g.tokenizer, special_ids=g.special_ids, chat_template=g.chat_template,
                tokenizer_config=g.tokenizer_config)


def _chat_template_name(family: str, tok: tokenizers.Tokenizer) -> str:
  if family == "qwen2":
    return "chatml"
  if family == "mistral":
    return "mistral"
  return "llama3" if tok.token_to_id("<|start_header_id|>") is not None else "llama2"


def _special_tokens(ids: dict, tok: tokenizers.Tokenizer, cls_id: int) -> dict:
  """{bos_id, eos_ids, pad_id, bos_token, eos_tokens, pad_token, cls_id}."""
  def name(i):
    return None if i is None else tok.id_to_token(i)

  return dict(bos_id=ids["bos_id"], eos_ids=list(ids["eos_ids"]), pad_id=ids["pad_id"],
              bos_token=name(ids["bos_id"]), eos_tokens=[name(i) for i in ids["eos_ids"]],
              pad_token=name(ids["pad_id"]), cls_id=cls_id)


def _gate_slot(flat: dict[str, np.ndarray], layer: int, scan_layers: bool) -> np.ndarray:
  """Layer ``layer``'s text -> [CLS] attention gate [H] (a view)."""
  return (flat["layers/attn/cls_gate"][layer] if scan_layers
          else flat[f"layer_{layer}/attn/cls_gate"])


def _init_cls(embed: np.ndarray, n_text: int, dtype: np.dtype, seed: int,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(cls_embed [D], cls_head kernel [D, 2], bias [2]) by the rule in the module docstring."""
  rows = embed[:n_text].astype(np.float32)
  mean = rows.mean(axis=0)
  scale = np.linalg.norm(rows, axis=-1).mean() / max(np.linalg.norm(mean), 1e-12)
  d_model = embed.shape[1]
  kernel = np.random.default_rng(seed).normal(0.0, 0.1 / math.sqrt(d_model), (d_model, 2))
  return (mean * scale).astype(dtype), kernel.astype(dtype), np.zeros(2, dtype)


def _write(source: Source, out: str, *, scan_layers: bool, dtype: str, compute_dtype: str,
           chat_template: str, seed: int) -> ModelConfig:
  """Check ``source`` against the model it describes, then write the directory ``out``."""
  if dtype not in NP_DTYPES:
    raise ValueError(f"--dtype={dtype!r}: expected one of {list(NP_DTYPES)}.")
  family, cfg = hf_weights.model_config_from_hf(
      source.hf_config, dtype=compute_dtype or dtype, param_dtype=dtype, scan_layers=scan_layers)
  cfg = dataclasses.replace(cfg, cls_attention_gate=True)
  tok = source.tokenizer(cfg.vocab_size)

  # Check every name and shape before reading any tensor (np.empty touches no memory).
  np_dtype = NP_DTYPES[dtype]
  flat = {path: np.empty(s.shape, np_dtype) for path, s in _flatten(abstract_params(cfg)).items()}
  table = hf_weights.entries(hf_weights.FAMILIES[family], cfg)
  missing = [e.hf for e in table if e.hf not in source.shapes]
  if missing:
    raise ValueError(
        f"{len(missing)} tensor(s) missing from {source.path}, e.g. {missing[:5]}: is every "
        "shard of the checkpoint present, and does its config match it?")
  known = {e.hf for e in table} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
  unexpected = [n for n in source.shapes if n not in known
                and not n.endswith(hf_weights.IGNORED_SUFFIXES)]
  if unexpected:
    raise ValueError(
        f"{len(unexpected)} tensor(s) in {source.path} that a {family} model with this config "
        f"has no place for, e.g. {unexpected[:5]}: unsupported architecture variant.")
  for e in table:
    our = _slot(flat, e, scan_layers).shape
    want, got = e.transform.hf_shape(our), source.shapes[e.hf]
    if tuple(got) != tuple(want):
      raise ValueError(f"Tensor {e.hf} has shape {tuple(got)}, but config.json implies "
                       f"{tuple(want)} (our {e.path} is {tuple(our)}).")

  # Stream tensors into the preallocated output.
  by_name = {e.hf: e for e in table}
  for name, x in source.read([e.hf for e in table]):
    e = by_name[name]
    target = _slot(flat, e, scan_layers)
    target[...] = e.transform.to_ours(x, target.shape).astype(np_dtype)
  if source.cls is not None:
    flat["cls_embed"][...] = source.cls["cls_embed"]
    flat["cls_head/kernel"][...] = source.cls["cls_head.kernel"]
    flat["cls_head/bias"][...] = source.cls["cls_head.bias"]
  else:
    n_text = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    flat["cls_embed"], flat["cls_head/kernel"], flat["cls_head/bias"] = _init_cls(
        flat["embed"], n_text, np_dtype, seed)
  gates = (source.cls or {}).get("cls_gate")  # [L, H]; older exports have none: closed
  for i in range(cfg.n_layers):
    _gate_slot(flat, i, scan_layers)[...] = 0.0 if gates is None else gates[i]

  template = chat_template or source.chat_template
  if not template:
    template = _chat_template_name(family, tok)
    logging.warning("%s has no chat template of its own; using the built-in %r (pass "
                    "--chat_template to choose another).", source.path, template)
  special = _special_tokens(source.special_ids, tok, cfg.cls_id)
  os.makedirs(out, exist_ok=True)
  for name in source.files:
    shutil.copy(os.path.join(source.path, name), os.path.join(out, name))
  if "tokenizer.json" not in source.files:
    tok.save(os.path.join(out, "tokenizer.json"))
  if "tokenizer_config.json" not in source.files:
    # Tokenizer.load reads the special-token strings from here, as from an HF checkpoint.
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
      json.dump(dict(source.tokenizer_config, bos_token=special["bos_token"],
                     eos_token=(special["eos_tokens"] or [None])[0],
                     pad_token=special["pad_token"]), f, indent=2)
  meta = dict(format=FORMAT, family=family, model=dataclasses.asdict(cfg),
              chat_template=template, special_tokens=special,
              hf_config=source.hf_config, source=os.path.abspath(source.path))
  checkpoint.save_params(out, "import", _unflatten(flat), dict(step=0, phase="import",
                                                               model=meta["model"]))
  with open(os.path.join(out, workdir.CONFIG_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  logging.info("Wrote %s (%s, %d layers, %s params)", out, family, cfg.n_layers, dtype)
  return cfg


def import_hf(hf_dir: str, out: str, *, scan_layers: bool = True, dtype: str = "float32",
              compute_dtype: str = "", chat_template: str = "", seed: int = 0) -> ModelConfig:
  """Convert the HF checkpoint in ``hf_dir`` into a safety_align directory ``out``.

  ``dtype`` is the stored parameter dtype, ``compute_dtype`` the model's compute dtype
  ("" = ``dtype``); ``chat_template`` "" keeps the checkpoint's own Jinja template, or picks
  the family's built-in one (llama2/llama3/mistral/chatml) when it has none.
  """
  _check_out(out, hf_dir)
  return _write(_hf_source(hf_dir), out, scan_layers=scan_layers, dtype=dtype,
                compute_dtype=compute_dtype, chat_template=chat_template, seed=seed)


def import_gguf(gguf_file: str, out: str, *, scan_layers: bool = True, dtype: str = "float32",
                compute_dtype: str = "", chat_template: str = "", seed: int = 0) -> ModelConfig:
  """Convert the llama.cpp GGUF file ``gguf_file`` (dequantized) into a directory ``out`` like
  ``import_hf``'s; the arguments are ``import_hf``'s."""
  _check_out(out, gguf_file)
  return _write(_gguf_source(gguf_file), out, scan_layers=scan_layers, dtype=dtype,
                compute_dtype=compute_dtype, chat_template=chat_template, seed=seed)


# --- export --------------------------------------------------------------------------------------

def export_hf(workdir: str, out: str, *, dtype: str = "", family: str = "",
              max_shard_bytes: int = 5 * 10**9) -> None:
  """Write ``workdir`` (an ``import_hf`` output or a training workdir) as an HF checkpoint.

  ``dtype`` "" keeps the stored parameter dtype; ``family`` "" uses the recorded one. ``out``
  may not be ``workdir`` or inside it (its config.json and tokenizer files would be replaced).
  """
  real_out, real_src = os.path.realpath(out), os.path.realpath(workdir)
  if os.path.commonpath([real_out, real_src]) == real_src:
    raise ValueError(f"--out={out} is the workdir {workdir} or inside it; export never writes "
                     "into its input (its config.json would be replaced): pass a new "
                     "directory.")
  cfg, params, meta = load_converted(workdir)
  family = family or meta.get("family") or hf_weights.infer_family(cfg)
  if family not in hf_weights.FAMILIES:
    raise ValueError(f"--family={family!r}: expected one of {sorted(hf_weights.FAMILIES)}.")
  if dtype and dtype not in NP_DTYPES:
    raise ValueError(f"--dtype={dtype!r}: expected one of {list(NP_DTYPES)}.")
  np_dtype = NP_DTYPES[dtype or cfg.param_dtype]
  flat = {k: np.asarray(v) for k, v in _flatten(params).items()}

  def hf_tensor(e: hf_weights.Entry) -> np.ndarray:
    x = e.transform.to_hf(_slot(flat, e, cfg.scan_layers))
    return np.ascontiguousarray(x.astype(np_dtype))

  table = hf_weights.entries(hf_weights.FAMILIES[family], cfg)
  sizes = [_slot(flat, e, cfg.scan_layers).size * np_dtype.itemsize for e in table]
  shards: list[list[hf_weights.Entry]] = [[]]
  used = 0
  for e, size in zip(table, sizes):
    if shards[-1] and used + size > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(e)
    used += size
  os.makedirs(out, exist_ok=True)
  weight_map = {}
  for k, shard in enumerate(shards):
    name = ("model.safetensors" if len(shards) == 1
            else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
    save_file({e.hf: hf_tensor(e) for e in shard}, os.path.join(out, name),
              metadata={"format": "pt"})
    weight_map.update({e.hf: name for e in shard})
  if len(shards) > 1:
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
  cls = {"cls_embed": flat["cls_embed"], "cls_head.kernel": flat["cls_head/kernel"],
         "cls_head.bias": flat["cls_head/bias"]}
  if cfg.cls_attention_gate:
    cls["cls_gate"] = np.stack([_gate_slot(flat, i, cfg.scan_layers)
                                for i in range(cfg.n_layers)])
  save_file({k: np.ascontiguousarray(v) for k, v in cls.items()},
            os.path.join(out, CLS_FILE), metadata={"format": "pt"})
  hf_cfg = hf_weights.hf_config_from_model(cfg, family, meta.get("hf_config"))
  hf_cfg["dtype"] = np_dtype.name
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(workdir, name)):
      shutil.copy(os.path.join(workdir, name), os.path.join(out, name))
  logging.info("Wrote %s (%s, %d shard(s))", out, hf_cfg["architectures"][0], len(shards))


# --- command line --------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined on demand: importing this module defines none)."""
  flags.DEFINE_string("hf_dir", None, "import_hf: HF checkpoint directory.")
  flags.DEFINE_string("gguf", None, "import_gguf: llama.cpp .gguf model file.")
  flags.DEFINE_string("workdir", None, "export_hf: an import output directory.")
  flags.DEFINE_string("out", None, "Output directory (imports: new or empty, not the source).")
  flags.DEFINE_bool("scan_layers", True, "Imports: store layers stacked for nn.scan.")
  flags.DEFINE_string("dtype", "", "Parameter dtype: float32 | bfloat16 | float16 "
                      "(import default float32; export default: the stored dtype).")
  flags.DEFINE_string("compute_dtype", "", "Imports: model compute dtype ('' = --dtype).")
  flags.DEFINE_string("chat_template", "", "Imports: chat template name or Jinja text ('' = "
                      "the source's own, else the family's built-in one).")
  flags.DEFINE_string("family", "", "export_hf: llama | mistral | qwen2 ('' = recorded).")
  flags.DEFINE_integer("seed", 0, "Imports: seed of the cls_head kernel.")


COMMANDS = ("import_hf", "import_gguf", "export_hf")


def main(argv: Sequence[str]) -> None:
  """Run the command; a problem with its input (``ValueError``, ``OSError``) ends in its one
  sentence, exit status 1 (the traceback with ``--verbosity=1``)."""
  console.configure()
  try:
    _run(argv)
  except (ValueError, OSError) as e:
    logging.vlog(1, "convert failed", exc_info=True)
    sys.exit(f"convert: {e}")


def _run(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"Usage: python -m safety_align.convert {{{'|'.join(COMMANDS)}}} ...")
  if not FLAGS.out:
    raise app.UsageError("--out is required.")
  if argv[1] == "export_hf":
    if not FLAGS.workdir:
      raise app.UsageError("export_hf needs --workdir.")
    export_hf(FLAGS.workdir, FLAGS.out, dtype=FLAGS.dtype, family=FLAGS.family)
    return
  kwargs = dict(scan_layers=FLAGS.scan_layers, dtype=FLAGS.dtype or "float32",
                compute_dtype=FLAGS.compute_dtype, chat_template=FLAGS.chat_template,
                seed=FLAGS.seed)
  if argv[1] == "import_hf":
    if not FLAGS.hf_dir:
      raise app.UsageError("import_hf needs --hf_dir.")
    import_hf(FLAGS.hf_dir, FLAGS.out, **kwargs)
  else:
    if not FLAGS.gguf:
      raise app.UsageError("import_gguf needs --gguf.")
    import_gguf(FLAGS.gguf, FLAGS.out, **kwargs)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
