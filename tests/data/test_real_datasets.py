"""Builders of the public datasets on fixture files in their real formats, the paper's SFT
mixture and the 7B recipe configs. Fixture texts are schematic placeholders only."""

import collections
import csv
import json

import jax
import pytest

from configs import llama2_7b, llama2_7b_cls, mistral_7b, mistral_7b_instruct_cls
from safety_align import model as model_lib
from safety_align.data import mixtures, real_datasets

REDACTED = "How do I [REDACTED]?"


def _jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _csv(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows(rows)


def _alert_row(i, category):
  return {"id": i, "category": category,
          "prompt": f"### Instruction:\nHow do I [REDACTED] {i}?\n### Response:\n"}


def _lima_rows():
  return [{"conversations": ["How do I bake bread?", "Mix flour and water.", "More?", "Yes."],
           "source": "wikihow"},
          {"conversations": ["How do I [REDACTED] a bomb?", "I'm sorry, I cannot help."],
           "source": "manual"},
          {"conversations": ["Name a prime.", "Seven."], "source": "stackexchange"}]


def _alpaca_rows(n=3):
  rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Name a colour.", "input": "", "output": "Blue."}]
  rows += [{"instruction": f"Count to {i}.", "input": "", "output": "1 2 3"}
           for i in range(n - 2)]
  return rows


@pytest.fixture
def data_dir(tmp_path):
  return str(tmp_path / "tfds")


def test_alert(tmp_path, data_dir):
  _jsonl(tmp_path / "alert.jsonl", [_alert_row(1, "crime_theft"),
                                   {"id": 2, "category": "hate_other", "prompt": REDACTED}])
  got = real_datasets.load("alert", str(tmp_path), data_dir)
  assert got == [
      dict(prompt="How do I [REDACTED] 1?", response="", label=1, target="",
           category="crime_theft"),
      dict(prompt=REDACTED, response="", label=1, target="", category="hate_other")]

  _jsonl(tmp_path / "alert_adversarial.jsonl",
         [dict(_alert_row(3, "weapon_other"), attack_type="suffix_injection")])
  (adv,) = real_datasets.load("alert", str(tmp_path), data_dir, config="adversarial")
  assert adv["prompt"] == "How do I [REDACTED] 3?" and adv["attack_type"] == "suffix_injection"
  assert adv["label"] == 1 and adv["category"] == "weapon_other"


def test_lima_safety_filter(tmp_path, data_dir):
  _jsonl(tmp_path / "train.jsonl", _lima_rows())
  got = real_datasets.load("lima", str(tmp_path), data_dir)
  assert [(r["prompt"], r["response"], r["label"], r["category"]) for r in got] == [
      ("How do I bake bread?", "Mix flour and water.", 0, "wikihow"),
      ("Name a prime.", "Seven.", 0, "stackexchange")]
  assert len(real_datasets.load("lima", str(tmp_path), data_dir, config="unfiltered")) == 3
  custom = real_datasets.load("lima", str(tmp_path), data_dir, safety_keywords=("prime",))
  assert [r["prompt"] for r in custom] == ["How do I bake bread?", "How do I [REDACTED] a bomb?"]


def test_alpaca(tmp_path, data_dir):
  (tmp_path / "alpaca_data.json").write_text(json.dumps(_alpaca_rows(), indent=4))
  got = real_datasets.load("alpaca", str(tmp_path), data_dir)
  assert [(r["prompt"], r["response"], r["label"]) for r in got] == [
      ("Add the numbers.\n\n2 and 3", "5", 0), ("Name a colour.", "Blue.", 0),
      ("Count to 0.", "1 2 3", 0)]


def test_adv_bench_keeps_target(tmp_path, data_dir):
  _csv(tmp_path / "harmful_behaviors.csv",
       [["goal", "target"], ["Explain how to [REDACTED], step by step",
                             "Sure, here is how to [REDACTED]"]])
  (row,) = real_datasets.load("adv_bench", str(tmp_path), data_dir)
  assert row == dict(prompt="Explain how to [REDACTED], step by step", response="", label=1,
                     target="Sure, here is how to [REDACTED]", category="")


def test_hex_phi(tmp_path, data_dir):
  _csv(tmp_path / "category_1.csv", [["Tell me how to [REDACTED], please"], [REDACTED]])
  _csv(tmp_path / "category_11.csv", [["Which [REDACTED] should I buy?"]])
  got = real_datasets.load("hex_phi", str(tmp_path), data_dir)
  assert [(r["prompt"], r["category"], r["label"]) for r in got] == [
      ("Tell me how to [REDACTED], please", "illegal_activity", 1),
      (REDACTED, "illegal_activity", 1),
      ("Which [REDACTED] should I buy?", "tailored_financial_advice", 1)]

  _jsonl(tmp_path / "hex_phi_with_prefix.jsonl",
         [{"category": 3, "prompt": REDACTED, "prefix": "Step 1: [REDACTED]"}])
  (row,) = real_datasets.load("hex_phi", str(tmp_path), data_dir, config="with_prefix")
  assert (row["target"], row["category"], row["label"]) == ("Step 1: [REDACTED]", "3", 1)


def test_harm_bench(tmp_path, data_dir):
  header = ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString",
            "BehaviorID"]
  _csv(tmp_path / "harmbench_behaviors_text_all.csv", [
      header,
      ["Give steps to [REDACTED]", "standard", "illegal", "", "", "b1"],
      ["Rewrite it to [REDACTED]", "contextual", "misinformation", "context",
       "Some article text.\nSecond line, with a comma.", "b2"],
      ["Reproduce [REDACTED] lyrics", "copyright", "copyright", "", "", "b3"]])
  (row,) = real_datasets.load("harm_bench", str(tmp_path), data_dir)
  assert (row["prompt"], row["category"], row["label"]) == (
      "Give steps to [REDACTED]", "illegal", 1)
  got = real_datasets.load("harm_bench", str(tmp_path), data_dir, config="all")
  assert got[1]["prompt"] == ("Some article text.\nSecond line, with a comma.\n\n---\n\n"
                              "Rewrite it to [REDACTED]")
  assert len(got) == 3


def test_malicious_instruct(tmp_path, data_dir):
  (tmp_path / "MaliciousInstruct.txt").write_text(f"{REDACTED}\n\nWhy [REDACTED]?  \n")
  got = real_datasets.load("malicious_instruct", str(tmp_path), data_dir)
  assert [(r["prompt"], r["label"]) for r in got] == [(REDACTED, 1), ("Why [REDACTED]?", 1)]


def test_wiki_labels_and_threshold(tmp_path, data_dir):
  _jsonl(tmp_path / "wiki_labeled.jsonl", [
      {"text": "Bread is baked.", "label": 0}, {"text": "A [REDACTED] text.", "label": 1},
      {"text": "Scored low.", "unsafe_score": 0.2}, {"text": "Scored high.", "unsafe_score": 0.7}])
  labels = lambda **kw: [r["label"] for r in real_datasets.load(  # noqa: E731
      "wiki_labeled", str(tmp_path), data_dir, **kw)]
  assert labels() == [0, 1, 0, 1]
  assert labels(threshold=0.1) == [0, 1, 1, 1]
  assert labels(threshold=0.9) == [0, 1, 0, 0]
  assert set(real_datasets.load("wiki_labeled", str(tmp_path), data_dir)[0]) == {"text", "label"}


@pytest.mark.parametrize("name, config, path", [
    ("alert", None, "alert.jsonl"), ("alert", "adversarial", "alert_adversarial.jsonl"),
    ("lima", None, "train.jsonl"), ("alpaca", None, "alpaca_data.json"),
    ("adv_bench", None, "harmful_behaviors.csv"), ("hex_phi", None, "category_*.csv"),
    ("hex_phi", "with_prefix", "hex_phi_with_prefix.jsonl"),
    ("harm_bench", None, "harmbench_behaviors_text_all.csv"),
    ("malicious_instruct", None, "MaliciousInstruct.txt"),
    ("wiki_labeled", None, "wiki_labeled.jsonl"),
])
def test_missing_file_names_path_and_page(tmp_path, data_dir, name, config, path):
  (tmp_path / "unrelated.txt").write_text("x")
  with pytest.raises(FileNotFoundError) as e:
    real_datasets.load(name, str(tmp_path), data_dir, config=config)
  assert str(tmp_path / path) in str(e.value)
  assert real_datasets.BUILDERS[name].HOMEPAGE in str(e.value)


def test_missing_manual_dir(tmp_path, data_dir):
  with pytest.raises(FileNotFoundError, match="does not exist.*github.com/tatsu-lab"):
    real_datasets.load("alpaca", str(tmp_path / "nowhere"), data_dir)


@pytest.mark.parametrize("name, write, where, match", [
    ("alert", lambda d: (d / "alert.jsonl").write_text(
        json.dumps(_alert_row(1, "crime_theft")) + "\n{oops\n"), "alert.jsonl:2",
     "malformed JSON"),
    ("alert", lambda d: _jsonl(d / "alert.jsonl", [_alert_row(1, "c"), {"prompt": "x"}]),
     "alert.jsonl:2", "missing key 'category'"),
    ("lima", lambda d: _jsonl(d / "train.jsonl", [{"conversations": ["only one turn"]}]),
     "train.jsonl:1", "user and an assistant turn"),
    ("alpaca", lambda d: (d / "alpaca_data.json").write_text('[\n{"instruction": "a",\n}\n]'),
     "alpaca_data.json:3", "malformed JSON"),
    ("adv_bench", lambda d: (d / "harmful_behaviors.csv").write_text(
        "goal,target\nok,Sure\nbroken row with, three, columns\n"), "harmful_behaviors.csv:3",
     "expected 2 columns"),
    ("adv_bench", lambda d: (d / "harmful_behaviors.csv").write_text("prompt,answer\na,b\n"),
     "harmful_behaviors.csv:1", "header lacks"),
    ("hex_phi", lambda d: (d / "category_4.csv").write_text("fine\nnot, fine\n"),
     "category_4.csv:2", "expected 1 columns"),
    ("wiki_labeled", lambda d: _jsonl(d / "wiki_labeled.jsonl", [{"text": "a", "label": 0},
                                                                 {"text": "b", "label": 2}]),
     "wiki_labeled.jsonl:2", "label must be 0"),
    ("wiki_labeled", lambda d: _jsonl(d / "wiki_labeled.jsonl", [{"text": "a"}]),
     "wiki_labeled.jsonl:1", "unsafe_score"),
])
def test_malformed_rows_name_file_and_line(tmp_path, data_dir, name, write, where, match):
  write(tmp_path)
  with pytest.raises(ValueError, match=match) as e:
    real_datasets.load(name, str(tmp_path), data_dir)
  assert str(e.value).startswith(f"{tmp_path / where}: ")


def test_empty_after_filter_and_unknown_options(tmp_path, data_dir):
  _jsonl(tmp_path / "train.jsonl", _lima_rows()[1:2])
  with pytest.raises(ValueError, match="no records in .*train.jsonl"):
    real_datasets.load("lima", str(tmp_path), data_dir)
  with pytest.raises(ValueError, match="unknown options \\['treshold'\\]"):
    real_datasets.load("wiki_labeled", str(tmp_path), data_dir, treshold=0.3)
  with pytest.raises(ValueError, match="unknown config 'adversrial'"):
    real_datasets.load("alert", str(tmp_path), data_dir, config="adversrial")


# ------------------------------------------------------------------------------------------
# The paper's SFT mixture.


def _pools(n_alert=40, n_lima=5, n_alpaca=30):
  cats = sorted(mixtures.ALERT_REASONS)
  alert = [dict(prompt=f"How do I [REDACTED] {i}?", category=cats[i % len(cats)])
           for i in range(n_alert)]
  lima = [dict(prompt=f"lima {i}", response=f"answer {i}") for i in range(n_lima)]
  alpaca = [dict(prompt=f"alpaca {i}", response=f"reply {i}") for i in range(n_alpaca)]
  return alert, lima, alpaca


def test_mixture_sizes_balance_and_refusals():
  alert, lima, alpaca = _pools()
  got = mixtures.mix(alert, lima, alpaca, n_malicious=32, n_benign=32, seed=1)
  assert len(got) == 64 and all(set(r) == {"prompt", "response", "label"} for r in got)
  counts = collections.Counter(r["label"] for r in got)
  assert counts == {0: 32, 1: 32}
  malicious = [r for r in got if r["label"]]
  assert all(r["response"].startswith(mixtures.REFUSAL_PREFIX + " it ") for r in malicious)
  assert len({r["prompt"] for r in malicious}) == 32  # no repeats while the pool suffices
  for r in malicious:  # the category's own reason
    i = int(r["prompt"].split()[-1].rstrip("?"))
    assert mixtures.reason(alert[i]["category"]) in r["response"]
  benign = [r["prompt"] for r in got if not r["label"]]
  assert sorted(p for p in benign if p.startswith("lima")) == [f"lima {i}" for i in range(5)]
  assert sum(p.startswith("alpaca") for p in benign) == 27
  assert mixtures.REFUSAL_PREFIX == "Sorry, I cannot fulfill your request because"


def test_mixture_determinism_and_options():
  pools = _pools()
  a = mixtures.mix(*pools, n_malicious=20, n_benign=12, seed=3)
  assert a == mixtures.mix(*pools, n_malicious=20, n_benign=12, seed=3)
  assert a != mixtures.mix(*pools, n_malicious=20, n_benign=12, seed=4)
  assert collections.Counter(r["label"] for r in a) == {1: 20, 0: 12}
  two = mixtures.mix(*pools, n_malicious=0, n_benign=10, n_lima=2, seed=0)
  assert sum(r["prompt"].startswith("lima") for r in two) == 2
  # A pool smaller than its share is used whole, then drawn again.
  big = mixtures.mix(*pools, n_malicious=100, n_benign=0, seed=0)
  assert collections.Counter(collections.Counter(r["prompt"] for r in big).values()) == {
      3: 20, 2: 20}
  with pytest.raises(ValueError, match="n_lima=9 exceeds the 5 LIMA"):
    mixtures.mix(*pools, n_lima=9)
  with pytest.raises(ValueError, match="has no refusal reason"):
    mixtures.reason("gambling_other")
  assert mixtures.reason("crime_new_kind") == mixtures.reason("crime_other")


def test_every_alert_category_has_a_reason():
  macros = ("crime", "hate", "self_harm", "sex", "substance", "weapon")
  assert len(mixtures.ALERT_REASONS) == 33  # ALERT's 32, and sex_harassment spelled right
  for category, text in mixtures.ALERT_REASONS.items():
    assert category.startswith(macros) and text.startswith("it ") and text.endswith(".")


def test_phase_records_from_config(tmp_path):
  manual = tmp_path / "manual"
  _jsonl(manual / "alert" / "alert.jsonl",
         [_alert_row(i, c) for i, c in enumerate(["crime_tax", "sex_harrasment", "weapon_x"])])
  _jsonl(manual / "lima" / "train.jsonl", _lima_rows())
  (manual / "alpaca").mkdir()
  (manual / "alpaca" / "alpaca_data.json").write_text(json.dumps(_alpaca_rows(6)))
  _jsonl(manual / "wiki_labeled" / "wiki_labeled.jsonl",
         [{"text": "ok", "unsafe_score": 0.1}, {"text": "[REDACTED]", "unsafe_score": 0.95}])
  config = llama2_7b_cls.get_config()
  config.data.manual_dir = str(manual)
  config.data.mixture.update(n_malicious=6, n_benign=8)
  tfds_dir = str(tmp_path / "tfds")
  sft = mixtures.phase_records(config, "sft", tfds_dir)
  assert collections.Counter(r["label"] for r in sft) == {0: 8, 1: 6}
  lima_prompts = {r["prompt"] for r in sft} & {"How do I bake bread?", "Name a prime.",
                                               "How do I [REDACTED] a bomb?"}
  assert lima_prompts == {"How do I bake bread?", "Name a prime."}  # safety item dropped
  assert sft == mixtures.phase_records(config, "sft", tfds_dir)
  wiki = mixtures.phase_records(config, "pretrain", tfds_dir)
  assert [r["label"] for r in wiki] == [0, 1]

  config.sft.split = "wiki_labeled"
  with pytest.raises(ValueError, match="config.sft.split='wiki_labeled'"):
    mixtures.phase_records(config, "sft", tfds_dir)
  config.data.manual_dir = ""
  with pytest.raises(ValueError, match="config.data.manual_dir"):
    mixtures.phase_records(config, "pretrain", tfds_dir)


# ------------------------------------------------------------------------------------------
# The 7B recipe configs.


def _n_params(model_block):
  cfg = model_lib.ModelConfig.from_config(model_block)
  return model_lib.count_params(jax.eval_shape(
      lambda: model_lib.init_params(cfg, jax.random.key(0))))


@pytest.mark.parametrize("module, published", [
    (llama2_7b_cls, 6_738_415_616),           # meta-llama/Llama-2-7b-hf
    (mistral_7b_instruct_cls, 7_241_732_096),  # mistralai/Mistral-7B-Instruct-v0.2
])
def test_recipe_configs(module, published):
  c = module.get_config()
  assert {"seed", "init_from", "model", "mesh", "data", "phases", "pretrain", "sft",
          "checkpoint", "log_every_steps"} <= set(c)
  assert c.init_from == "" and c.data.source == "real" and c.data.seq_len == 2048
  assert c.model.dtype == "bfloat16"
  for phase in (c.pretrain, c.sft):
    assert (phase.lr, phase.weight_decay) == (2e-5, 0.1)
    assert phase.batch_size * phase.grad_accum == 72
  assert (c.pretrain.cls_weight, c.sft.cls_weight) == (0.01, 0.1)
  assert (c.pretrain.split, c.sft.split) == ("wiki_labeled", "paper_mixture")
  assert c.data.mixture.n_malicious + c.data.mixture.n_benign == mixtures.PAPER_SIZE
  n = _n_params(c.model)
  assert abs(n - published) <= 0.01 * published, n


def test_recipe_phases_and_templates():
  llama, mistral = llama2_7b_cls.get_config(), mistral_7b_instruct_cls.get_config()
  assert (llama.phases, llama.data.chat_template) == ("pretrain,sft", "llama2")
  assert (mistral.phases, mistral.data.chat_template) == ("sft", "mistral")
  assert mistral.model.n_kv_heads == 8 and mistral.model.rope_theta == 1e6
  assert mistral_7b_instruct_cls.get_config("v0.1").model.rope_theta == 1e4
  assert llama.model.to_dict() == llama2_7b.get_config().model.to_dict()
  assert mistral.model.to_dict() == mistral_7b.get_config().model.to_dict()
  with pytest.raises(ValueError, match="takes no variant"):
    llama2_7b_cls.get_config("fast")
