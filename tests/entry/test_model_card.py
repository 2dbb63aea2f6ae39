"""MODEL_CARD.md states each source's licence as its wheel does, the recipe and the figures."""

import json
import zipfile

from safety_align import model_card


def _wheel(path, metadata: str) -> str:
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("pkg-1.0.dist-info/METADATA", metadata)
  return str(path)


def test_wheel_licence_reads_the_metadata(tmp_path):
  expr = _wheel(tmp_path / "a.whl", "Name: a\nLicense-Expression: GPL-3.0-only\n")
  classifier = _wheel(tmp_path / "b.whl",
                      "Name: b\nClassifier: License :: OSI Approved :: BSD License\n")
  silent = _wheel(tmp_path / "c.whl", "Name: c\nVersion: 1.0\n")
  assert model_card.wheel_licence(expr) == "GPL-3.0-only"
  assert model_card.wheel_licence(classifier) == "BSD License"
  assert model_card.wheel_licence(silent) == "not stated in its metadata"


def test_card_has_sources_recipe_figures_and_limits(tmp_path):
  (tmp_path / "eval").mkdir()
  (tmp_path / "config.json").write_text(json.dumps(dict(
      phases="sft", model=dict(n_layers=30, d_model=576, vocab_size=49152),
      sft=dict(steps=100, learning_rate=5e-5, cls_weight=1.0, trainable="^(cls_head)/"),
      data=dict(seq_len=256))))
  (tmp_path / "report.json").write_text(json.dumps(dict(classifier=dict(
      test_cross_source=dict(auroc=0.845, accuracy=0.8, accuracy_ci=[0.75, 0.85], n=300)))))
  (tmp_path / "eval" / "results.json").write_text(json.dumps(dict(
      attacks=dict(direct=dict(n=64, asr_gate_off=0.7, asr_gate_off_ci=[0.58, 0.8],
                               asr_gate_on=0.172, asr_gate_on_ci=[0.1, 0.28],
                               refused_gate_on=0.83)),
      benign=dict(n=210, over_refusal_gate_on=0.252, over_refusal_gate_off=0.057))))
  source = dict(name="Src", package="llm-x", version="1", licence="Apache-2.0", member="m.gguf")
  sources = [dict(name="easy", package="easyjailbreak", version="0.1.3", licence="GPL-3.0",
                  role="train")]
  text = open(model_card.write(str(tmp_path), source=source, sources=sources)).read()
  assert "`easyjailbreak==0.1.3` | GPL-3.0 | train" in text
  assert "licence Apache-2.0" in text and "30 layers, width 576" in text
  assert "sft: steps 100, learning_rate 5e-05, cls_weight 1.0, trainable ^(cls_head)/" in text
  assert "AUROC 0.845, accuracy 80.0% [75.0, 85.0] (n = 300)" in text
  assert "| direct | 64 | 70.0% [58.0, 80.0] | 17.2% [10.0, 28.0] | 83.0% |" in text
  assert "gate on 25.2%, gate off 5.7%" in text
  assert "## Limits" in text and "English only" in text


def test_card_takes_the_cross_source_auroc_from_the_evaluation_when_the_report_lacks_it(
    tmp_path):
  (tmp_path / "eval").mkdir()
  (tmp_path / "config.json").write_text(json.dumps(dict(phases="sft", model=dict(n_layers=2))))
  (tmp_path / "report.json").write_text(json.dumps(dict(classifier=dict(
      test_in_distribution=dict(auroc=0.97, accuracy=0.9, n=53)))))
  (tmp_path / "eval" / "results.json").write_text(json.dumps(dict(
      classifier=dict(auroc=0.82, accuracy=0.75, accuracy_ci=[0.7, 0.8], n=320))))
  source = dict(name="Src", package="llm-x", version="1", licence="MIT", member="m.gguf")
  text = open(model_card.write(str(tmp_path), source=source, sources=[])).read()
  assert "test in distribution: AUROC 0.970" in text
  assert "held-out sources (the evaluation): AUROC 0.820, accuracy 75.0% [70.0, 80.0] (n = 320)" \
      in text
