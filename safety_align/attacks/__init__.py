"""Attacks on the gated model: optimised suffixes (``gcg``, on the layout of ``gcg_layout``),
and those run by the evaluation."""
