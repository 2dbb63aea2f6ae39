"""The attack registry: attack name -> its constructor from the evaluation config.

Every attack is imported here. The three adaptive ones (``prefill_adaptive``, ``embedding``,
``finetune``) read the config section of their name (defaults:
``config_lib.attack_sections()``); the registry hands ``finetune`` what it runs after
fine-tuning (``build_attack``) and the held-out benign prompts' reader (``eval.data``).
"""

from __future__ import annotations

from typing import Callable

from safety_align.attacks import base
from safety_align.attacks import gcg as gcg_lib
from safety_align.attacks.agent_obfuscated import AgentObfuscatedAttack
from safety_align.attacks.decoding import DecodingAttack, sweep
from safety_align.attacks.direct import DirectAttack
from safety_align.attacks.embedding import EmbeddingAttack
from safety_align.attacks.finetune import FinetuneAttack
from safety_align.attacks.gcg_attack import GCGAttack
from safety_align.attacks.prefill import PrefillAttack, TargetPrefillAttack
from safety_align.attacks.prefill_adaptive import PrefillAdaptiveAttack
from safety_align.attacks.template_attack import TemplateAttack, load_templates
from safety_align.attacks.two_turn import TwoTurnAttack
from safety_align.config_lib import floats, ints, names
from safety_align.eval import data as eval_data

ATTACK_NAMES = ("direct", "prefill_5", "prefill_10", "prefill_20", "prefill_40",
                "prefill_deep", "decoding", "gcg", "gcg_adaptive", "templates")
ADAPTIVE = ("prefill_adaptive", "embedding", "finetune")  # each reads its own config section
KNOWN = ("direct, prefill_<k> (k tokens, e.g. prefill_5), prefill_deep, prefill_target, "
         "decoding, gcg, gcg_adaptive, templates, agent_obfuscated, two_turn, "
         + ", ".join(ADAPTIVE))


def _gcg(name: str, cfg, searches: dict | None = None) -> GCGAttack:
  g = dict(cfg.gcg)
  n_prompts, target_tokens = g.pop("n_prompts"), g.pop("target_tokens")
  return GCGAttack(gcg_lib.GCGConfig(**g), adaptive=name == "gcg_adaptive",
                   n_prompts=n_prompts, target_tokens=target_tokens, searches=searches)


def _decoding(cfg) -> DecodingAttack:
  d = cfg.decoding
  return DecodingAttack(sweep(floats(d.temperatures), floats(d.top_ps), ints(d.top_ks),
                              d.base_temperature),
                        samples=d.samples, batch_size=d.batch_size, n_prompts=d.n_prompts)


def _templates(cfg) -> TemplateAttack:
  t = cfg.templates
  return TemplateAttack(load_templates(names(t.paths), t.builtin, names(t.names)),
                        n_prompts=t.n_prompts)


GCG = ("gcg", "gcg_adaptive")  # built by ``_gcg``, sharing an evaluation's searches
ATTACKS: dict[str, Callable] = {
    "direct": lambda cfg: DirectAttack(),
    "prefill_target": lambda cfg: TargetPrefillAttack(),
    "prefill_deep": lambda cfg: PrefillAttack(cfg.prefill.deep_tokens, deep=True,
                                              keep=cfg.prefill.deep_keep,
                                              min_tokens=cfg.prefill.deep_min_tokens),
    "decoding": _decoding,
    "templates": _templates,
    "two_turn": lambda cfg: TwoTurnAttack(),  # the request split across two user turns
    # HarmActions' disguised requests (a cross-source test source; its wheel is needed)
    "agent_obfuscated": lambda cfg: AgentObfuscatedAttack(cfg.agent_obfuscated.wheels),
    "prefill_adaptive": PrefillAdaptiveAttack.from_config,
    "embedding": EmbeddingAttack.from_config,
    "finetune": lambda cfg: FinetuneAttack.from_config(cfg, build_attack,
                                                       eval_data.held_out_benign),
}


def build_attack(name: str, cfg, gcg_searches: dict | None = None) -> base.Attack:
  """The attack called ``name`` (see ``KNOWN``), configured from the evaluation config; a GCG
  attack records its searches in ``gcg_searches`` (None: its own), which the attacks of one
  evaluation share (``build_attacks``)."""
  if name in ADAPTIVE and name not in cfg:
    raise ValueError(f"Attack {name!r} needs the config section {name!r} "
                     "(config_lib.attack_sections()): add it to the eval config.")
  if name in GCG:
    return _gcg(name, cfg, gcg_searches)
  if name in ATTACKS:
    return ATTACKS[name](cfg)
  if name.startswith("prefill_") and name[len("prefill_"):].isdigit():
    return PrefillAttack(int(name[len("prefill_"):]))
  raise ValueError(f"Unknown attack {name!r}: known attacks are {KNOWN}.")


def build_attacks(cfg) -> list[base.Attack]:
  listed = names(cfg.attacks)
  if len(set(listed)) != len(listed):
    raise ValueError(f"Attack listed twice in attacks={cfg.attacks!r}.")
  searches = {}  # GCG's, shared by gcg and gcg_adaptive (attacks/gcg_attack.py)
  return [build_attack(n, cfg, searches) for n in listed]
