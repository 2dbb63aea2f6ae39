"""Benchmarks of safety_align against side-by-side peers (``python -m bench.run``)."""
