"""``defence.Defence``: the [CLS] model and every competitor wrapper provide what the attacks
and the evaluation call on a defence."""

import numpy as np

from safety_align import api, defence
from safety_align.defences import common, deep_alignment, probe, safedecoding


def test_the_model_and_each_competitor_wrapper_are_defences(model):
  d = model.config.d_model
  wrappers = [
      probe.ProbeModel(model, probe.Probe(0, np.zeros(d), np.ones(d), np.zeros(d), 0.0, (0.5,))),
      deep_alignment.DeepAlignedModel(model, model),
      safedecoding.SafeDecodingModel(model, model),
  ]
  assert {type(w).__name__ for w in wrappers} == {
      cls.__name__ for cls in common.Defended.__subclasses__()}  # a new wrapper is listed here
  for m in [model] + wrappers:
    assert isinstance(m, defence.Defence), type(m).__name__
    assert m.max_length == 96 and m.eos_ids == (model.tokenizer.eos_id,)
  assert model.has_classifier and not wrappers[1].has_classifier
  # Missing a part is not a defence: the source wrapper alone has no generate.
  assert not isinstance(common.Defended(model), defence.Defence)
  assert isinstance(model, api.SafetyModel)
