"""Competitor baselines, each a model-like object the evaluation's attacks run unchanged
(``common.Defended``; gate "off": the undefended source model, any other gate: the defence on):

* ``probe``: ADA-style linear probes on the source's hidden states, re-read every k tokens;
* ``deep_alignment``: Qi et al.'s harmful-prefix -> refusal SFT augmentation;
* ``safedecoding``: Xu et al.'s reweighting of the first tokens toward a safety expert.

Each module has ``build(source, section, train_data, log, folder)`` (``section``: its section of
the evaluation config, defaults in ``config_lib.defence_sections()``), which trains what it
needs into ``folder`` (or loads it from there) and returns the model-like object.
"""

from safety_align.defences import deep_alignment, probe, safedecoding

BUILDERS = {"probe": probe.build, "deep_alignment": deep_alignment.build,
            "safedecoding": safedecoding.build}

__all__ = ["BUILDERS", "deep_alignment", "probe", "safedecoding"]
