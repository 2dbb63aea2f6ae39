"""Command-line tools: ``check_parity`` (logits vs transformers), ``aot`` (per-device memory of
training, by ``memory_estimate``'s formula and XLA's analysis; ``--target=tpu:...``: the TPU
compiler's per-chip report, ``tpu_aot``, ``tpu_targets``, ``roofline``)."""
