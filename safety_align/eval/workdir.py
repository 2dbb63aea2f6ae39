"""``run``: the evaluation of a training workdir (what ``python -m safety_align.evaluate``
does): its checkpoint and data seed, the held-out prompts, the no-[CLS] baseline it names or
trains (``eval.no_cls``) and the competitor baselines (``eval.competitors``), all through
``runner.evaluate_model``, with the outputs written under ``workdir/eval`` (``EVAL_DIR``).
"""

from __future__ import annotations

import os
import time

from safety_align import gate_calibration
from safety_align import workdir as workdir_lib
from safety_align.eval import no_cls
from safety_align.eval import competitors
from safety_align.eval import config as config_lib
from safety_align.eval import data, report, utility
from safety_align.eval.judging import make_judge
from safety_align.eval.runner import evaluate_model, logger
from safety_align.eval.store import require_checkpoint

EVAL_DIR = "eval"


def run(workdir: str, eval_config) -> str:
  """Evaluate the model in ``workdir``; writes ``workdir/eval/*`` (results.md: every table)
  and returns the main tables (``report.results_markdown(brief=True)``) for the terminal."""
  import safety_align as sa  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  log = logger(t0)
  cfg = eval_config
  config_lib.validate(cfg)
  model_id = require_checkpoint(workdir)
  no_cls.check_baseline_trainable(workdir, cfg)
  judge = make_judge(cfg)
  seed = cfg.data_seed
  if seed < 0:
    seed = workdir_lib.read_config(workdir).get("data", {}).get("seed", 0)
  items, benign, pairs = (data.held_out_files(cfg.held_out_dir) if cfg.held_out_dir
                          else data.held_out(seed))
  model = sa.load(workdir, batch_size=cfg.batch_size,
                  calibrated=None if cfg.gate_calibration == "on" else False)
  cfg = gate_calibration.eval_config(cfg, model.calibration)
  gate = model.gate_defaults = config_lib.gate_config(cfg, cfg.gate_on)
  if not model.has_cls_head:
    raise ValueError(f"{workdir} holds a model without [CLS] (use_cls=False): evaluate the "
                     "[CLS] model, and give this one as baseline_workdir.")
  log(f"model {model_id}; {min(len(items), cfg.n_malicious or len(items))} malicious, "
      f"{min(len(benign), cfg.n_benign or len(benign))} benign prompts")
  baseline_dir = no_cls.resolve_baseline(workdir, cfg, log)
  baseline, baseline_id = None, ""
  if baseline_dir:
    baseline_id = require_checkpoint(baseline_dir, "baseline")
    baseline = sa.load(baseline_dir, gate_defaults=gate, batch_size=cfg.batch_size)
    # An import's [CLS] is untrained and closed off (it generates as its source); a trained
    # one in the baseline is worth a warning.
    if baseline.has_cls_head and (baseline.loaded_from or {}).get("phase") != "import":
      log(f"warning: baseline {baseline_dir} has a trained [CLS] head; it is run with gate "
          "off.")
  out_dir = os.path.join(workdir, EVAL_DIR)
  defences = {}
  which = competitors.chosen(cfg)
  if which:
    source = competitors.source_dir(cfg, baseline_dir)
    records = competitors.training_records(workdir, cfg)
    log(f"baselines {', '.join(which)} over {source} ({len(records)} training records)")
    defences = competitors.build(which, cfg, source, records,
                                 os.path.join(out_dir, competitors.DIR), gate=gate, log=log)
  results, records = evaluate_model(model, cfg, out_dir, model_id=model_id, items=items,
                                    benign=benign, all_pairs=pairs, baseline=baseline,
                                    baseline_id=baseline_id, defences=defences, log=log,
                                    judge=judge, answers=utility.reference_answers(
                                        cfg.held_out_dir, seed, cfg.n_utility),
                                    groups=(data.held_out_groups(cfg.held_out_dir)
                                            if cfg.held_out_dir else None))
  results["model"] = os.path.abspath(workdir)
  results["gate"] = dict(schedule=cfg.gate_on, **dict(cfg.gate))
  results["calibration"] = gate_calibration.summary(workdir, model.calibration)
  if which:
    results["baselines_source"] = os.path.abspath(source)
  results["seconds"] = time.time() - t0
  report.write_outputs(results, records, out_dir, cfg)
  log(f"wrote {out_dir}/results.json, results.md"
      + (", asr_by_attack.png, cls_trace.png" if cfg.plots else ""))
  return report.results_markdown(results, records, cfg, brief=True)
