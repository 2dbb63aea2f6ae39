"""The attack registry: attack name -> its constructor from the evaluation config.

Built-in attacks are imported here; the three adaptive ones (``prefill_adaptive``,
``embedding``, ``finetune``) live in their own modules and are imported when first asked for,
so the registry (and every config) works whether or not those modules are installed: their
``from_config(cfg)`` reads the config section of the same name, which their module-level
``default_config()`` provides (``sections``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

from safety_align.attacks import base
from safety_align.attacks import gcg as gcg_lib
from safety_align.attacks.agent_obfuscated import AgentObfuscatedAttack
from safety_align.attacks.decoding import DecodingAttack, sweep
from safety_align.attacks.direct import DirectAttack
from safety_align.attacks.gcg_attack import GCGAttack
from safety_align.attacks.prefill import PrefillAttack, TargetPrefillAttack
from safety_align.attacks.templates import TemplateAttack, load_templates
from safety_align.config_lib import floats, ints, names

ATTACK_NAMES = ("direct", "prefill_5", "prefill_10", "prefill_20", "prefill_40",
                "prefill_deep", "decoding", "gcg", "gcg_adaptive", "templates")
# name -> (module, class): each class has ``from_config(cfg)``, its module ``default_config()``.
LAZY = {"prefill_adaptive": ("safety_align.attacks.prefill_adaptive", "PrefillAdaptiveAttack"),
        "embedding": ("safety_align.attacks.embedding", "EmbeddingAttack"),
        "finetune": ("safety_align.attacks.finetune", "FinetuneAttack")}
KNOWN = ("direct, prefill_<k> (k tokens, e.g. prefill_5), prefill_deep, prefill_target, "
         "decoding, gcg, gcg_adaptive, templates, agent_obfuscated, " + ", ".join(LAZY))


def _gcg(name: str, cfg) -> GCGAttack:
  g = dict(cfg.gcg)
  n_prompts, target_tokens = g.pop("n_prompts"), g.pop("target_tokens")
  return GCGAttack(gcg_lib.GCGConfig(**g), adaptive=name == "gcg_adaptive",
                   n_prompts=n_prompts, target_tokens=target_tokens)


def _decoding(cfg) -> DecodingAttack:
  d = cfg.decoding
  return DecodingAttack(sweep(floats(d.temperatures), floats(d.top_ps), ints(d.top_ks),
                              d.base_temperature),
                        samples=d.samples, batch_size=d.batch_size, n_prompts=d.n_prompts)


def _templates(cfg) -> TemplateAttack:
  t = cfg.templates
  return TemplateAttack(load_templates(names(t.paths), t.builtin, names(t.names)),
                        n_prompts=t.n_prompts)


BUILTIN: dict[str, Callable] = {
    "direct": lambda cfg: DirectAttack(),
    "prefill_target": lambda cfg: TargetPrefillAttack(),
    "prefill_deep": lambda cfg: PrefillAttack(cfg.prefill.deep_tokens, deep=True,
                                              keep=cfg.prefill.deep_keep,
                                              min_tokens=cfg.prefill.deep_min_tokens),
    "decoding": _decoding,
    "gcg": lambda cfg: _gcg("gcg", cfg),
    "gcg_adaptive": lambda cfg: _gcg("gcg_adaptive", cfg),
    "templates": _templates,
    # HarmActions' disguised requests (a cross-source test source; its wheel is needed)
    "agent_obfuscated": lambda cfg: AgentObfuscatedAttack(cfg.agent_obfuscated.wheels),
}


def lazy_module(name: str):
  """The module of lazy attack ``name``, or None if it is not installed."""
  try:
    return importlib.import_module(LAZY[name][0])
  except ModuleNotFoundError as e:
    if e.name != LAZY[name][0]:
      raise  # the module exists but one of its imports is missing: say so
    return None


def available() -> list[str]:
  """The lazy attacks whose modules are installed."""
  return [n for n in LAZY if lazy_module(n) is not None]


def sections(quick: bool = False) -> dict:
  """{name: default config section} of the installed lazy attacks (``quick``: their quick
  variant, where their ``default_config`` has one)."""
  out = {}
  for name in available():
    make = lazy_module(name).default_config
    out[name] = make(quick=quick) if "quick" in inspect.signature(make).parameters else make()
  return out


def build_attack(name: str, cfg) -> base.Attack:
  """The attack called ``name`` (see ``KNOWN``), configured from the evaluation config."""
  if name in BUILTIN:
    return BUILTIN[name](cfg)
  if name.startswith("prefill_") and name[len("prefill_"):].isdigit():
    return PrefillAttack(int(name[len("prefill_"):]))
  if name in LAZY:
    module = lazy_module(name)
    if module is None:
      raise ValueError(f"Attack {name!r} needs {LAZY[name][0]} ({LAZY[name][1]}), which is not "
                       "installed: drop it from attacks=... or add that module.")
    if name not in cfg:
      raise ValueError(f"Attack {name!r} needs the config section {name!r} "
                       f"({LAZY[name][0]}.default_config()): add it to the eval config.")
    return getattr(module, LAZY[name][1]).from_config(cfg)
  raise ValueError(f"Unknown attack {name!r}: known attacks are {KNOWN}.")


def build_attacks(cfg) -> list[base.Attack]:
  listed = names(cfg.attacks)
  if len(set(listed)) != len(listed):
    raise ValueError(f"Attack listed twice in attacks={cfg.attacks!r}.")
  return [build_attack(n, cfg) for n in listed]
