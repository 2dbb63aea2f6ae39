"""The prefill attack: the response is forced to start with the first ``k`` tokens of the
item's (redacted) harmful answer, and the model goes on from there (METHOD.md section 6; the
paper's HEx-PHI prefill with k in {5, 10, 20, 40}). ``deep``: hundreds of tokens (METHOD.md
section 7), as many as the answer allows while leaving ``keep`` tokens of it unforced; items
whose answer gives fewer than ``min_tokens`` forced tokens are left out.

The forced text is the decoded token prefix, so with a word-piece tokenizer it may end inside
a word, as in the paper's token-level prefilling. Only the text the model writes after it is
judged.
"""

from __future__ import annotations

from safety_align.attacks.base import Attack, fits


class PrefillAttack(Attack):
  """``k`` forced tokens (``deep=False``), or up to ``k`` (``deep=True``, see module doc)."""

  def __init__(self, k: int, *, deep: bool = False, keep: int = 16, min_tokens: int = 64):
    if k < 1:
      raise ValueError(f"Prefill length must be >= 1 token, got {k}.")
    self.k, self.deep, self.keep, self.min_tokens = k, deep, keep, min_tokens
    self.name = "prefill_deep" if deep else f"prefill_{k}"

  def config(self):
    return dict(k=self.k, deep=self.deep, keep=self.keep, min_tokens=self.min_tokens)

  def n_forced(self, n_answer: int) -> int:
    """Tokens forced from an answer of ``n_answer`` tokens (0: the item is left out)."""
    if not self.deep:
      return self.k if n_answer > self.k else 0
    n = min(self.k, n_answer - self.keep)
    return n if n >= self.min_tokens else 0

  def queries(self, model, items, settings):
    tok = model.tokenizer
    out = []
    for i, item in enumerate(items):
      ids = tok.encode(item.harmful_response)
      n = self.n_forced(len(ids))
      if n and fits(model, item.prompt, n, settings.max_new_tokens):
        out.append((i, "", item.prompt, tok.decode(ids[:n])))
    return out


class TargetPrefillAttack(Attack):
  """AdvBench-style prefill: the response is forced to start with the item's compliant
  opening (``target``, e.g. "Sure, here is a script that ..."); items without one are left
  out."""

  name = "prefill_target"

  def config(self):
    return {}

  def queries(self, model, items, settings):
    tok = model.tokenizer
    return [(i, "", item.prompt, item.target) for i, item in enumerate(items)
            if item.target and fits(model, item.prompt, len(tok.encode(item.target)),
                                    settings.max_new_tokens)]
