"""Command-line tools: ``check_parity`` (logits vs transformers), ``aot`` (memory estimate;
``--target=tpu:...``: the TPU compiler's per-chip report, ``tpu_aot``, ``tpu_targets``, ``roofline``)."""
