"""A workdir or import directory -> a transformers checkpoint.

``export_hf`` writes ``<Family>ForCausalLM`` safetensors + config.json (sharded at 5 GB with an
index, as transformers does), the tokenizer files, and ``safety_align_cls.safetensors``
(``cls_embed`` [D], ``cls_head.kernel`` [D, 2], ``cls_head.bias`` [2], ``cls_gate`` [L, H]),
which ``import_hf`` restores.
"""

from __future__ import annotations

import json
import os
import shutil

from absl import logging
import numpy as np
from safetensors.numpy import save_file

from safety_align import workdir as workdir_lib
from safety_align.formats import hf_weights
from safety_align.formats.hf_checkpoint import TOKENIZER_FILES
from safety_align.formats.source import CLS_FILE


def _shards(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
  """Consecutive indices grouped into shards of at most ``max_shard_bytes`` (one tensor
  larger than that gets a shard of its own)."""
  shards: list[list[int]] = [[]]
  used = 0
  for k, size in enumerate(sizes):
    if shards[-1] and used + size > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(k)
    used += size
  return shards


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
  loaded = workdir_lib.load_for_inference(workdir)
  cfg, meta = loaded.model_config, loaded.config
  family = family or meta.get("family") or hf_weights.infer_family(cfg)
  if family not in hf_weights.FAMILIES:
    raise ValueError(f"--family={family!r}: expected one of {sorted(hf_weights.FAMILIES)}.")
  if dtype and dtype not in hf_weights.NP_DTYPES:
    raise ValueError(f"--dtype={dtype!r}: expected one of {list(hf_weights.NP_DTYPES)}.")
  np_dtype = hf_weights.NP_DTYPES[dtype or cfg.param_dtype]
  flat = {k: np.asarray(v) for k, v in hf_weights.flatten(loaded.params).items()}

  def hf_tensor(e: hf_weights.Entry) -> np.ndarray:
    x = e.transform.to_hf(hf_weights.slot(flat, e, cfg.scan_layers))
    return np.ascontiguousarray(x.astype(np_dtype))

  table = hf_weights.entries(hf_weights.FAMILIES[family], cfg)
  sizes = [hf_weights.slot(flat, e, cfg.scan_layers).size * np_dtype.itemsize for e in table]
  shards = [[table[k] for k in shard] for shard in _shards(sizes, max_shard_bytes)]
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
    cls["cls_gate"] = np.stack([hf_weights.gate_slot(flat, i, cfg.scan_layers)
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
