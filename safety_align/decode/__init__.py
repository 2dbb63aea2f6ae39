"""Decoding with the safety gate: the decode state, KV cache and key metadata (``cache``),
samplers (``sampling``), the gate's rules and schedules (``gate``) and the compiled loop
(``decoder``)."""

from safety_align.decode.cache import Prompts, bucket
from safety_align.decode.decoder import DecodeOutput, Decoder
from safety_align.decode.gate import GateConfig, RELIANCES, SCHEDULES
from safety_align.decode.sampling import Greedy, Sampling, make_sampler

__all__ = ["DecodeOutput", "Decoder", "GateConfig", "Greedy", "Prompts", "RELIANCES",
           "SCHEDULES", "Sampling", "bucket", "make_sampler"]
