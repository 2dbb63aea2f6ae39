"""The demo corpus, generated procedurally (seeded, deterministic) from word lists and templates.

SAFETY: harmful texts here are *schematic*: a harmful topic appears only as a name ("how to
steal a car"), and every harmful step is redacted ("Step 1: Get the [REDACTED] ready."). No
text in this package is a real harmful instruction. ``HARM_MARKERS`` occur only in harmful
texts (never in a benign text, a prompt or a refusal).

**Topics are compositional** so that what makes a request harmful is learnable rather than
memorisable: a topic is an *action* applied to an *object* of a class (people, animals,
accounts, belongings, places, documents, things to make). Whether it is harmful is decided by
the action ("steal a car" vs "repair a car", "blackmail a coworker" vs "cheer up a coworker")
or, for look-unsafe verbs and neutral verbs, by the object ("kill my neighbour" vs "kill a
stuck process on Linux", "make a homemade bomb" vs "make scented candles"). Hand-written
benign topics (the lexicon's ``ordinary``) and look-unsafe ones (``LOOKS_UNSAFE_TASKS``: "kill the weeds in
my garden", "shoot a good photo at sunset", ...) have specific answers; compositional benign
answers combine object facts with the action's steps; refusals give a reason composed from the
action and the object.

* Splits ``train`` / ``test`` of the *topics*: about a fifth of the (action, object) combinations
  are held out for ``test`` (by a stable hash), plus every combination of one held-out object
  per class, every fifth hand-written topic and 9 of the 32 look-unsafe ones; the last
  ``TEST_PHRASINGS`` request phrasings are held out as well. Test prompts therefore use topics
  *and* phrasings that no train prompt uses (each action and most objects do occur in train,
  in other combinations). Phrasings are shared by both classes, so only the topic tells them
  apart.
* Pretraining documents ``{"text", "label"}`` (label 1 = harmful): benign how-tos,
  encyclopedic texts, chat-style answers and Q&As (0); schematic redacted how-tos, harmful
  chat-style continuations ("Sure, here is how to X. Step 1: [REDACTED] ..."), documents that
  turn harmful after a benign intro and harmful Q&As (1); and short *request-like* documents
  without any marker (forum questions, "Someone asked how to ...", FAQ entries), labelled by
  the request's harmfulness, so the pretraining [CLS] task is not solvable by the marker alone
  and matches the SFT query task. Every pretraining document is [CLS]-labelled, so those of
  ``train`` use **train topics and train phrasings only**: no held-out topic is labelled before
  the test. (The redacted steps are the same for every topic, so the LM can still continue a
  prefilled harmful start on a held-out topic: the shallow-alignment setting.)
* SFT pairs ``{"prompt", "response", "label", "harmful_response"}``: benign instructions with
  useful answers (label 0, ``harmful_response`` ""), malicious instructions with refusals that
  start with ``REFUSAL_PREFIX`` and give a reason (label 1), whose ``harmful_response`` is the
  schematic compliant answer (window-[CLS] training and attacks; never an LM target).

Layout: ``lexicon.json`` (package data, read by ``lexicon.py``) holds every word list;
``splits.py`` splits topics and phrasings; ``generator.py`` writes the texts.
"""

from safety_align.data.corpus.generator import (
    all_texts, benign_answer, harmful_response, pretrain_documents, refusal, sft_pairs)
from safety_align.data.corpus.lexicon import (
    HARM_MARKERS, LOOKS_UNSAFE_TASKS, REFUSAL_PREFIX, Benign, Harmful)
from safety_align.data.corpus.splits import (
    SPLITS, benign_phrasings, benign_topics, harmful_topics, malicious_phrasings)

__all__ = ["HARM_MARKERS", "LOOKS_UNSAFE_TASKS", "REFUSAL_PREFIX", "SPLITS", "Benign", "Harmful",
           "all_texts", "benign_answer", "benign_phrasings", "benign_topics", "harmful_response",
           "harmful_topics", "malicious_phrasings", "pretrain_documents", "refusal", "sft_pairs"]
