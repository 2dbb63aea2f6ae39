"""Foreign checkpoint formats <-> safety_align directories.

A reader per format implements :class:`source.Source` (``hf_checkpoint.HFCheckpoint``: a
transformers directory of safetensors; ``gguf_file.GGUFFile``: a llama.cpp GGUF file, its
tokenizer built by ``gguf_tokenizer``); ``importer`` checks any Source against the
``hf_weights`` tables and writes the directory ``sa.load`` reads; ``exporter`` writes one back as
a transformers checkpoint. ``safety_align.convert`` is their command line.
"""
