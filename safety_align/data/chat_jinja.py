"""A model's own Jinja chat template, rendered as transformers renders it, with token roles.

``apply_chat_template`` renders the conversation with Jinja (sandboxed, ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a ``tojson`` that leaves non-ASCII and
``<>&`` unescaped, the tokenizer's ``bos_token`` / ``eos_token`` as variables) and tokenises the
whole text once, without adding special tokens. :class:`JinjaTemplate` does the same, so its ids
are HF's, token boundaries included (a Llama-2 ``▁How`` joins the template's space to the
user's word; tokenising the parts separately would not).

The roles come from a second rendering in which every message's content is wrapped in
private-use marker characters: it tells which characters of the text are the user's, the
assistant's, or the template's (the system message and any default system prompt included), and
each token takes the role of the characters it covers (offsets of the one tokenisation). A token
that mixes template and user characters is QUERY (RESPONSE for the assistant's), so ``[CLS]``
reads all of the query and the model learns to write all of the answer. A template that
transforms the content (``| trim``) is matched by its text around the contents instead.

Special tokens come only from the template: a ``<|im_start|>`` or ``</s>`` inside a message's
content is tokenised as text (where HF would read it as the special token); without one, the
ids are exactly HF's.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import re
from typing import Sequence

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox
import numpy as np
import tokenizers

from safety_align.data.tokenizer import Tokenizer
from safety_align.masks import Role

Pieces = list[tuple[list[int], Role]]

# Message i's content renders as chr(_OPEN + i) + content + _CLOSE in the marked rendering.
_CLOSE = "\U000f0000"
_OPEN = 0xF0001
_STAND_IN, _N_STAND_INS = 0xF0100, 0xF00  # template special tokens while contents are text
_ANY_MARKER = re.compile("[\U000f0000-\U000f0fff]")
_MARKED = re.compile("([\U000f0001-\U000f00ff])(.*?)\U000f0000", re.DOTALL)
_CONTENT_ROLES = {"user": Role.QUERY, "assistant": Role.RESPONSE}  # the rest is TEMPLATE


class _Generation(jinja2.ext.Extension):
  """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask blocks): the body."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
  """The compiled template, in the environment transformers renders chat templates in."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise ValueError(f"The chat template is not valid Jinja (line {e.lineno}: {e.message}); "
                     "config.data.chat_template is a built-in name or a Jinja template.") from e


@functools.lru_cache(maxsize=32)
def _adds_bos(source: str) -> bool:
  ast = compile_template(source).environment.parse(source)
  return "bos_token" in jinja2.meta.find_undeclared_variables(ast)


@functools.lru_cache(maxsize=16)
def _special_ids(hf) -> frozenset[int]:
  return frozenset(i for i, t in hf.get_added_tokens_decoder().items() if t.special)


@functools.lru_cache(maxsize=16)
def _stand_in_tokenizer(hf):
  """(copy of ``hf`` that reads special-token strings as text, {special id: stand-in},
  {stand-in id: special id}). A stand-in is a private-use character repeated as long as the
  token's text, added as a plain token matched as the special one is (same strip flags), so
  the template's special tokens split the text where HF splits it, with the same offsets."""
  specials = sorted((i, t) for i, t in hf.get_added_tokens_decoder().items() if t.special)
  if len(specials) > _N_STAND_INS:
    raise ValueError(f"The tokenizer has {len(specials)} special tokens; at most "
                     f"{_N_STAND_INS} are supported.")
  copy = tokenizers.Tokenizer.from_str(hf.to_str())
  copy.encode_special_tokens = True
  stand_in = {i: chr(_STAND_IN + k) * len(t.content) for k, (i, t) in enumerate(specials)}
  copy.add_tokens([tokenizers.AddedToken(stand_in[i], single_word=t.single_word, lstrip=t.lstrip,
                                         rstrip=t.rstrip, normalized=t.normalized,
                                         special=False) for i, t in specials])
  return copy, stand_in, {copy.token_to_id(x): i for i, x in stand_in.items()}


def _tokenize(hf, text: str, spans: list[tuple[int, int, int]]) -> tuple[list[int], list]:
  """(ids, character offsets) of ``text``, HF's one tokenisation, except that special-token
  strings inside message contents (``spans``) are read as text: users and data never insert
  special tokens, only the template does."""
  enc = hf.encode(text, add_special_tokens=False)
  specials = _special_ids(hf)
  found = [(i, s, e) for i, (s, e) in zip(enc.ids, enc.offsets)
           if i in specials and hf.id_to_token(i) in text[s:e]]  # not an <unk> of a character
  if not any(a < e and s < b for _, s, e in found for _, a, b in spans):
    return list(enc.ids), enc.offsets
  copy, stand_in, back = _stand_in_tokenizer(hf)
  chars = list(text)
  for i, s, e in found:
    if not any(a < e and s < b for _, a, b in spans):  # the template's: keep it special
      start = text.index(hf.id_to_token(i), s, e)
      chars[start:start + len(stand_in[i])] = stand_in[i]
  enc = copy.encode("".join(chars), add_special_tokens=False)
  return [back.get(i, i) for i in enc.ids], enc.offsets


def _messages(prompt: str, system: str | None, response: str | None = None) -> list[dict]:
  out = [] if system is None else [dict(role="system", content=system)]
  out.append(dict(role="user", content=prompt))
  if response is not None:
    out.append(dict(role="assistant", content=response))
  return out


def _group(ids: Sequence[int], roles: np.ndarray) -> Pieces:
  """Runs of equal role as (ids, role) pieces."""
  bounds = [0, *(np.flatnonzero(np.diff(roles)) + 1).tolist(), len(ids)]
  return [(list(ids[a:b]), Role(int(roles[a]))) for a, b in zip(bounds[:-1], bounds[1:])
          if b > a]


def _content_spans(text: str, marked: str) -> list[tuple[int, int, int]]:
  """``[(message index, start, end)]``: where each rendered message content lies in ``text``,
  read from ``marked`` (the same rendering with every content wrapped in markers)."""
  parts = _MARKED.split(marked)  # [text, mark, content, text, mark, content, ..., text]
  between, marks, contents = parts[0::3], parts[1::3], parts[2::3]
  if any(_ANY_MARKER.search(p) for p in between + contents):
    raise ValueError("The chat template cuts or reorders a message's content, so token roles "
                     "cannot be recovered from it.")
  spans, start = [], len(between[0])
  for content, after in zip(contents, between[1:]):
    spans.append((start, start + len(content)))
    start += len(content) + len(after)
  if "".join(p for pair in zip(between, contents + [""]) for p in pair) != text:
    # The template transformed a content (e.g. ``| trim``): find the same text around it.
    match = re.fullmatch("(.*?)".join(map(re.escape, between)), text, re.DOTALL)
    if match is None:
      raise ValueError("The chat template renders its own text differently depending on the "
                       "message contents, so token roles cannot be recovered from it.")
    spans = [match.span(g + 1) for g in range(len(contents))]
  return [(ord(m) - _OPEN, s, e) for m, (s, e) in zip(marks, spans)]


@dataclasses.dataclass(frozen=True)
class JinjaTemplate:
  """A Jinja chat template (``source``); ``special_tokens`` as in ``templates.ChatTemplate``.

  The ids of ``prompt_pieces`` are ``apply_chat_template(messages, add_generation_prompt=True)``'s;
  those of ``example_pieces`` are HF's rendering of the conversation with the answer, up to and
  including the first special token after the answer (the end of its turn), or with EOS appended
  if the template writes none.
  """

  source: str
  name: str = "jinja"
  special_tokens: tuple[str, ...] = ()

  def __post_init__(self):
    compile_template(self.source)  # a syntax error shows at load time

  def prompt_pieces(self, tok: Tokenizer, prompt: str, system: str | None = None) -> Pieces:
    """BOS (if the template writes it), TEMPLATE (the system message too), QUERY, TEMPLATE (up
    to where the response starts)."""
    messages = _messages(prompt, system)
    ids, roles, _, _ = self._encode(tok, messages, add_generation_prompt=True)
    if prompt and not (roles == Role.QUERY).any():
      raise ValueError(f"The chat template {self.name!r} does not render the user's message.")
    return _group(ids, roles)

  def chat_pieces(self, tok: Tokenizer, messages: Sequence[dict]) -> Pieces:
    """A conversation's prompt (``[system], user, assistant, ..., user``, each a dict with
    ``role`` and ``content``) up to where the answer starts, by METHOD.md 3's multi-turn rule:
    every user turn is QUERY, system text and earlier assistant turns are TEMPLATE (context
    [CLS] does not read at the first classification). One user message: ``prompt_pieces``."""
    ids, roles, _, _ = self._encode(tok, [dict(m) for m in messages], add_generation_prompt=True)
    if not (roles == Role.QUERY).any():
      raise ValueError(f"The chat template {self.name!r} does not render the user's messages.")
    return _group(ids, np.where(roles == Role.RESPONSE, int(Role.TEMPLATE), roles))

  def example_pieces(self, tok: Tokenizer, prompt: str, response: str,
                     system: str | None = None) -> Pieces:
    """The prompt's pieces, then RESPONSE: the answer through the end of its turn."""
    ids, roles, _ = self._example(tok, _messages(prompt, system, response))
    return _group(ids, roles)

  def pieces(self, tok: Tokenizer, query_ids: Sequence[int],
             response_ids: Sequence[int] | None = None) -> Pieces:
    """The pieces of the decoded query, with ``response_ids`` kept as given (e.g. a spliced
    response) followed by the template's end of turn."""
    query = tok.decode(query_ids, skip_special_tokens=False)
    if response_ids is None:
      return self.prompt_pieces(tok, query)
    response = tok.decode(response_ids, skip_special_tokens=False)
    ids, roles, tail = self._example(tok, _messages(query, None, response))
    start = int(np.argmax(roles == Role.RESPONSE))
    return _group(ids[:start], roles[:start]) + [(list(response_ids) + ids[tail:],
                                                  Role.RESPONSE)]

  def _render(self, tok: Tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    special = {name: tok.hf.id_to_token(i) for name, i in
               (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)) if i is not None}
    try:
      return compile_template(self.source).render(
          messages=messages, tools=None, documents=None,
          add_generation_prompt=add_generation_prompt, **special)
    except jinja2.TemplateError as e:
      roles = [m["role"] for m in messages]
      raise ValueError(f"The chat template {self.name!r} rejects the conversation {roles}: "
                       f"{e}") from e

  def _encode(self, tok: Tokenizer, messages: list[dict], add_generation_prompt: bool):
    """(ids, roles [n] int, token spans [n, 2], content spans) of the rendered conversation;
    a token's span is its character offsets, at least one character long."""
    for m in messages:
      if _ANY_MARKER.search(m["content"]):
        raise ValueError(f"The {m['role']} message contains characters U+F0000..U+F0FFF, which "
                         "mark contents while the chat template renders: remove them.")
    text = self._render(tok, messages, add_generation_prompt)
    marked = self._render(tok, [dict(m, content=chr(_OPEN + i) + m["content"] + _CLOSE)
                                for i, m in enumerate(messages)], add_generation_prompt)
    spans = _content_spans(text, marked)
    char_roles = np.full(len(text), int(Role.TEMPLATE))
    for i, s, e in spans:
      char_roles[s:e] = _CONTENT_ROLES.get(messages[i]["role"], Role.TEMPLATE)
    ids, offsets = _tokenize(tok.hf, text, spans)
    offsets = np.array(offsets, np.int64).reshape(-1, 2)
    offsets[:, 1] = np.maximum(offsets[:, 1], np.minimum(offsets[:, 0] + 1, len(text)))
    roles = np.full(len(ids), int(Role.TEMPLATE))
    for role in (Role.RESPONSE, Role.QUERY):  # QUERY wins a token that covers both
      covered = np.concatenate([[0], np.cumsum(char_roles == role)])
      roles[covered[offsets[:, 1]] > covered[offsets[:, 0]]] = role
    if ids and ids[0] == tok.bos_id and _adds_bos(self.source):
      roles[0] = Role.BOS
    return ids, roles, offsets, spans

  def _example(self, tok: Tokenizer, messages: list[dict]):
    """(ids, roles, index where the answer's end of turn starts) of a conversation ending with
    the answer, cut after the first special token that follows it."""
    ids, roles, offsets, spans = self._encode(tok, messages, add_generation_prompt=False)
    answer = [(s, e) for i, s, e in spans if i == len(messages) - 1]
    if not answer:
      raise ValueError(f"The chat template {self.name!r} does not render the assistant's "
                       "message.")
    s, e = answer[-1]
    starts, ends = offsets[:, 0], offsets[:, 1]
    first = int(np.argmax(ends > s)) if (ends > s).any() else len(ids)
    tail = next((k for k in range(first, len(ids)) if starts[k] >= e), len(ids))
    special = _special_ids(tok.hf) | {tok.eos_id}
    stop = next((k for k in range(tail, len(ids)) if ids[k] in special), None)
    if stop is None:  # the template ends a turn with no special token: EOS ends it
      ids, stop = ids + [tok.eos_id], len(ids)
    roles = np.concatenate([roles[:first], np.full(stop + 1 - first, int(Role.RESPONSE))])
    return ids[:stop + 1], roles, tail
