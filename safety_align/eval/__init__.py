"""The attack evaluation (METHOD.md sections 6-7), run by ``python -m safety_align.evaluate``.

Modules: ``registry`` (attack name -> constructor), ``config`` (loading ``configs/eval/*.py``,
checks, gates), ``data`` (held-out prompts), ``judging`` (harm and refusal of a generation),
``metrics`` (ASR with Wilson intervals, over-refusal, classifier), ``store`` (``ResultStore``:
resumable results), ``no_cls`` (the no-[CLS] baseline), ``competitors`` (the competitor
baselines of ``safety_align.defences``: ``baselines=...``), ``timing`` (a defence's overhead),
``progress`` (ETA), ``runner`` (the suite per model), ``workdir`` (``run`` on a training
workdir) and ``report`` (markdown and plots).
"""

from safety_align.eval.no_cls import baseline_config
from safety_align.eval.config import gate_config, gates_for, load, validate
from safety_align.eval.data import held_out, held_out_files
from safety_align.eval.judging import Judge, make_judge
from safety_align.eval.registry import ATTACK_NAMES, KNOWN, build_attack, build_attacks
from safety_align.eval.report import write_outputs
from safety_align.eval.runner import evaluate_defence, evaluate_model
from safety_align.eval.store import ResultStore
from safety_align.eval.workdir import EVAL_DIR, run

__all__ = ["ATTACK_NAMES", "EVAL_DIR", "KNOWN", "Judge", "ResultStore", "baseline_config",
           "build_attack", "build_attacks", "evaluate_defence",
           "evaluate_model", "gate_config", "gates_for", "held_out", "held_out_files", "load",
           "make_judge", "run", "validate", "write_outputs"]
