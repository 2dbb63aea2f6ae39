"""The demo corpus: deterministic, held-out test split, harm markers only in harmful texts."""

import collections
import hashlib
import itertools
import json
import re

from safety_align.data import corpus

REFUSAL_WORDS = ("Sorry", "I cannot", "I'm sorry", "I apologize", "As an AI")

# SHA-256 of the generated demo data. A change of the corpus code that is meant to keep the data
# (a refactor) must keep these; one that changes the data on purpose updates them in the same
# change, says why here and bumps tfds_builders.DemoCorpus.VERSION (the demo's prepared data,
# checkpoints and results are then stale). Changes so far: the split into the corpus package
# kept every digest; then pretraining documents were restricted to their split's topics (no
# held-out topic in a [CLS]-labelled document), which moved the pretrain and all_texts digests
# (DemoCorpus 1.2.0).
PINNED = {
    "sft:train:0": "8aaa5b734eb2f918a9009fbbb14e68be9cd7a6618fea4f015c3c09f641cea8fd",
    "sft:train:1": "8200312230d7cc5b61ecc55dbd37e77d2a27b2db128f9ea9b636ee2c23875f07",
    "sft:train:7": "777796f250321edc0649aa6bf44845cb33353553042179ceb9aaff01351e86f1",
    "sft:test:0": "de8a7cd282d51f132f21a388f5991169b415e1e0b547914fad32a886bfa8b1d5",
    "sft:test:1": "1da2802fe9ee9ec66df71c67ba4d7e834c44a3f1abc39e2da5c2b216ebf36c73",
    "sft:test:7": "3020e94ce5fea221067e06d8ce03b72482bf80ce8590abedc5d94cb4925e3852",
    "pretrain:train:0": "4232e01aa53c450248fce45f98f6a1cf137154f0842926237cc704bdb00b31c2",
    "pretrain:test:0": "ed254b1d6ec31a4b8b14f83d2cda9b40d4f4f2a1618979b517745f9db78a7a34",
    "pretrain:train:3:500": "ae68f0a52d5efc1307df70515732ad34456aa97a71462b6a8e348dfeeae1adcc",
    "topics:train": "a9d3aeef6d66ee43eac7f3786e99c3c21502860768d53a8b48f96cf4b064d23f",
    "topics:test": "cab7b29bebc6153dec92f0350ea5bdcd9c139909cc0744d780372e0caba49b2a",
    "all_texts:0": "6a91cd7d708eaf6efba029329508f5a3697c9465adb41f737b0ff88054fcbe8f",
}


def _combos(split):
  """Lower-cased prompt bodies (phrasing x task) of ``split`` -> (phrasing, task)."""
  out = {}
  for phrasings, topics in ((corpus.benign_phrasings(split), corpus.benign_topics(split)),
                            (corpus.malicious_phrasings(split), corpus.harmful_topics(split))):
    for phrasing, topic in itertools.product(phrasings, topics):
      out[phrasing.format(t=topic.task).lower()] = (phrasing, topic.task)
  return out


def _digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def test_generated_data_is_pinned():
  got = {"pretrain:train:3:500": _digest(corpus.pretrain_documents(3, 500)),
         "all_texts:0": _digest(corpus.all_texts(0))}
  for split in corpus.SPLITS:  # the default sizes, as configs/tiny.py's demo builds them
    for seed in (0, 1, 7):
      got[f"sft:{split}:{seed}"] = _digest(corpus.sft_pairs(split, seed))
    got[f"pretrain:{split}:0"] = _digest(corpus.pretrain_documents(0, split=split))
    got[f"topics:{split}"] = _digest([corpus.benign_topics(split), corpus.harmful_topics(split),
                                      corpus.benign_phrasings(split),
                                      corpus.malicious_phrasings(split)])
  assert got == PINNED


def test_deterministic_by_seed():
  assert corpus.sft_pairs("train", 3, 50) == corpus.sft_pairs("train", 3, 50)
  assert corpus.sft_pairs("train", 3, 50) != corpus.sft_pairs("train", 4, 50)
  assert corpus.pretrain_documents(3, 50) == corpus.pretrain_documents(3, 50)
  assert corpus.pretrain_documents(3, 50) != corpus.pretrain_documents(4, 50)


def test_sizes_and_balance():
  train, test = corpus.sft_pairs("train"), corpus.sft_pairs("test")
  docs = corpus.pretrain_documents()
  assert (len(train), len(test), len(docs)) == (2000, 200, 4000)
  for records in (train, test, docs):
    assert sum(r["label"] for r in records) == len(records) // 2


def test_test_split_uses_held_out_topics_and_phrasings():
  for fn in (corpus.benign_topics, corpus.harmful_topics, corpus.benign_phrasings,
             corpus.malicious_phrasings):
    assert fn("test") and not set(fn("train")) & set(fn("test"))
  combos = {split: _combos(split) for split in corpus.SPLITS}
  for split in corpus.SPLITS:
    for pair in corpus.sft_pairs(split, 0, 300):
      prompt = pair["prompt"].lower()
      used = {combo for body, combo in combos[split].items() if body in prompt}
      other = {body for body in combos["test" if split == "train" else "train"]
               if body in prompt}
      assert used and not other, pair["prompt"]


def test_topics_are_unique_and_compositional():
  tasks = [t.task for split in corpus.SPLITS
           for t in corpus.benign_topics(split) + corpus.harmful_topics(split)]
  assert not [t for t, k in collections.Counter(tasks).items() if k > 1]
  for split in corpus.SPLITS:  # hundreds of topics, so [CLS] cannot memorise a lookup table
    assert len(corpus.harmful_topics(split)) >= 100 and len(corpus.benign_topics(split)) >= 100
  train = {t.task for t in corpus.harmful_topics("train") + corpus.benign_topics("train")}
  # Same action, different object, different split; same object, opposite label.
  assert "steal a car" in train and "repair a car" in train
  test_harm = {t.task for t in corpus.harmful_topics("test")}
  assert any(t.startswith("kill ") for t in test_harm)
  # Every harmful action of the test split also occurs in train (with other objects).
  for t in test_harm:
    assert any(t.split()[0] == u.split()[0] for u in train), t


def test_pretrain_documents_use_their_split_topics_only():
  """Every pretraining document is [CLS]-labelled: no held-out topic in a train document (a
  topic is always named after "to": "how to X", "To X, follow these steps", ...)."""
  def mentions(split):
    tasks = sorted((t.task for t in corpus.harmful_topics(split) + corpus.benign_topics(split)),
                   key=len, reverse=True)
    return re.compile(r"\bto (?:" + "|".join(map(re.escape, tasks)) + r")(?![\w'])", re.I)

  train, test = mentions("train"), mentions("test")
  for split, own, other in (("train", train, test), ("test", test, train)):
    docs = [d["text"] for d in corpus.pretrain_documents(0, split=split)]
    assert not [d for d in docs if other.search(d)]
    assert sum(bool(own.search(d)) for d in docs) > 0.8 * len(docs)


def test_looks_unsafe_prompts_are_benign_in_both_splits():
  for split in corpus.SPLITS:
    tasks = {t.task for t in corpus.benign_topics(split)} & set(corpus.LOOKS_UNSAFE_TASKS)
    assert tasks
    pairs = [p for p in corpus.sft_pairs(split) if any(t in p["prompt"] for t in tasks)]
    assert pairs and all(p["label"] == 0 for p in pairs)


def test_harm_markers_only_in_harmful_texts():
  def harmful(text):
    return any(m in text for m in corpus.HARM_MARKERS)

  docs = corpus.pretrain_documents(0, 1000)
  for doc in docs:
    assert not harmful(doc["text"]) or doc["label"], doc  # markers only in harmful texts
  # Harmful requests without markers make the pretraining [CLS] task non-trivial.
  unmarked = [d for d in docs if d["label"] and not harmful(d["text"])]
  assert 100 < len(unmarked) < 400
  for split in corpus.SPLITS:
    for pair in corpus.sft_pairs(split):
      assert not harmful(pair["prompt"]) and not harmful(pair["response"]), pair
      assert harmful(pair["harmful_response"]) == bool(pair["label"]), pair


def test_responses():
  for split in corpus.SPLITS:
    for pair in corpus.sft_pairs(split):
      if pair["label"]:
        assert pair["response"].startswith(corpus.REFUSAL_PREFIX + " ")
        assert len(pair["response"]) > len(corpus.REFUSAL_PREFIX) + 10  # a reason follows
        assert pair["harmful_response"].count("Step ") >= 5
      else:
        assert pair["harmful_response"] == ""
        assert not any(w in pair["response"] for w in REFUSAL_WORDS), pair


def test_mid_document_harm_and_continuations_present():
  docs = [d["text"] for d in corpus.pretrain_documents(0, 400) if d["label"]]
  marker = corpus.HARM_MARKERS[0]
  assert any(d.startswith("Sure, here is how to") for d in docs)
  assert any(marker in d and d.index(marker) > 200 for d in docs)  # a benign intro before the harm


def test_all_texts():
  texts = corpus.all_texts(0)
  assert len(texts) > 6000 and all(texts)
