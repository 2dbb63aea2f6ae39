"""The two readers implement one Source: the same tiny Llama saved by transformers and written
as GGUF (q/k permuted, names renamed, dims reversed) reads back identically through
``HFCheckpoint`` and ``GGUFFile``."""

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")
pytest.importorskip("gguf")
from test_gguf import new_gguf  # noqa: E402

from safety_align.formats.gguf_file import GGUFFile  # noqa: E402
from safety_align.formats.hf_checkpoint import HFCheckpoint  # noqa: E402

ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "tie_word_embeddings")


def test_hf_and_gguf_readers_agree(tmp_path):
  path, model = new_gguf(tmp_path, tie=False)
  model.save_pretrained(str(tmp_path / "hf"))
  hf, gg = HFCheckpoint(str(tmp_path / "hf")), GGUFFile(path)
  assert gg.shapes == hf.shapes
  for key in ARCHITECTURE:
    assert gg.hf_config[key] == pytest.approx(hf.hf_config[key]), key
  assert gg.special_ids == hf.special_ids == dict(bos_id=1, eos_ids=[2], pad_id=0)
  names = sorted(hf.shapes)
  read = {name: x for name, x in hf.tensors(names)}
  for name, x in gg.tensors(names):  # unpermuted q/k, HF layout
    np.testing.assert_array_equal(x, read[name].astype(np.float32), err_msg=name)
  assert gg.cls is None and hf.cls is None and gg.files == ()
