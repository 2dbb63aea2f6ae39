"""The command line of ``safety_align.formats``: Hugging Face checkpoints and llama.cpp GGUF
files <-> safety_align directories.

  python -m safety_align.convert import_hf --hf_dir=SRC --out=DIR [--dtype=bfloat16]
  python -m safety_align.convert import_gguf --gguf=FILE --out=DIR [--dtype=float32]
  python -m safety_align.convert export_hf --workdir=DIR --out=DST

``import_hf`` reads SRC's ``config.json``, ``tokenizer.json`` and ``*.safetensors`` (tensor by
tensor, ``formats.hf_checkpoint``); ``import_gguf`` reads FILE through ``formats.gguf_file``
(dequantized to float32 first); both are written by ``formats.importer`` (its docstring: the
directory's layout, the chat template, the new ``[CLS]`` parameters), which DIR must be new or
empty and never the source or inside it. ``export_hf`` writes DST through
``formats.exporter``. ``--chat_template`` overrides the source's own template.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from safety_align import console
from safety_align.formats.exporter import export_hf
from safety_align.formats.importer import import_gguf, import_hf

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
