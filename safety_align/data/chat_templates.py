"""Chat templates as role-tagged pieces: a model's own Jinja template, or a built-in one.

A chat-template spec (``config.data.chat_template``, an import directory's ``chat_template``) is
a built-in name or the text of a Jinja template (anything with ``{%`` or ``{{``).
:func:`get_template` returns an object with ``prompt_pieces``, ``example_pieces``, ``pieces``
and ``special_tokens``: a :class:`~chat_jinja.JinjaTemplate` for Jinja text and for the
built-ins ``llama2``, ``llama3``, ``mistral`` and ``chatml`` (the real templates of those
families, for a source that ships none), and the :class:`ChatTemplate` ``demo`` of the toy
model.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from safety_align.data.chat_jinja import JinjaTemplate, Pieces
from safety_align.data.tokenizer import Tokenizer
from safety_align.masks import Role


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """``<s> opening query closing response </s>``, each piece tokenised on its own (no token
  mixes template and query characters); ``special_tokens`` are the markers a tokenizer
  trained for this template must keep whole. It has no system message."""

  name: str
  opening: str
  closing: str
  special_tokens: tuple[str, ...] = ()

  def prompt_pieces(self, tok: Tokenizer, prompt: str, system: str | None = None) -> Pieces:
    """BOS (if the tokenizer has one), TEMPLATE opening, QUERY, TEMPLATE closing (up to where
    the response starts)."""
    self._check_system(system)
    return self.pieces(tok, tok.encode(prompt))

  def chat_pieces(self, tok: Tokenizer, messages: Sequence[dict]) -> Pieces:
    """A conversation's prompt (user, assistant, ..., user; dicts with ``role`` and
    ``content``): each earlier turn ``opening query closing answer </s>``, every query QUERY,
    the earlier answers TEMPLATE (METHOD.md 3's multi-turn rule), then the last query's turn
    up to where the answer starts."""
    roles = [m["role"] for m in messages]
    if "system" in roles:
      self._check_system("")
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(
        roles[1::2]) or roles[-1] != "user":
      raise ValueError(f"The {self.name!r} chat template takes alternating user and assistant "
                       f"messages ending with a user message; got roles {roles}.")
    out = [([tok.bos_id], Role.BOS)] if tok.bos_id is not None else []
    for m in messages:
      if m["role"] == "user":
        out += self.pieces(tok, tok.encode(m["content"]))[1 if tok.bos_id is not None else 0:]
      else:
        out.append((tok.encode(m["content"]) + [tok.eos_id], Role.TEMPLATE))
    return out

  def example_pieces(self, tok: Tokenizer, prompt: str, response: str,
                     system: str | None = None) -> Pieces:
    """``prompt_pieces`` + RESPONSE (the response ids and EOS)."""
    self._check_system(system)
    return self.pieces(tok, tok.encode(prompt), tok.encode(response))

  def pieces(self, tok: Tokenizer, query_ids: Sequence[int],
             response_ids: Sequence[int] | None = None) -> Pieces:
    """The pieces from already tokenised query (and response) ids."""
    out = [([tok.bos_id], Role.BOS)] if tok.bos_id is not None else []
    out += [(tok.encode(self.opening, parse_special=True), Role.TEMPLATE),
            (list(query_ids), Role.QUERY),
            (tok.encode(self.closing, parse_special=True), Role.TEMPLATE)]
    if response_ids is not None:
      out.append((list(response_ids) + [tok.eos_id], Role.RESPONSE))
    return out

  def _check_system(self, system: str | None) -> None:
    if system is not None:
      raise ValueError(f"The {self.name!r} chat template has no system message: pass "
                       "system=None, or use a model whose chat template has one.")


# The families' own templates, as their chat models ship them (Mistral: v0.3's, without tools).
LLAMA2 = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    r"{% set system_message = messages[0]['content'] %}{% else %}"
    r"{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    r"{% for message in loop_messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    r"{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    r"{% else %}{% set content = message['content'] %}{% endif %}"
    r"{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    r"{% endif %}{% endfor %}")
LLAMA3 = (
    r"{% set loop_messages = messages %}{% for message in loop_messages %}"
    r"{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    r"+ message['content'] | trim + '<|eot_id|>' %}"
    r"{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    r"{{ content }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    r"{% endif %}")
MISTRAL = (
    r'{%- if messages[0]["role"] == "system" %}'
    r'{%- set system_message = messages[0]["content"] %}{%- set loop_messages = messages[1:] %}'
    r'{%- else %}{%- set loop_messages = messages %}{%- endif %}'
    r'{%- for message in loop_messages %}'
    r'{%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}'
    r'{{- raise_exception("After the optional system message, conversation roles must '
    r'alternate user/assistant/user/assistant/...") }}{%- endif %}{%- endfor %}'
    r'{{- bos_token }}{%- for message in loop_messages %}{%- if message["role"] == "user" %}'
    r'{%- if loop.last and system_message is defined %}'
    r'{{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}'
    r'{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}'
    r'{%- elif message["role"] == "assistant" %}{{- " " + message["content"]|trim + eos_token}}'
    r'{%- else %}{{- raise_exception("Only user and assistant roles are supported, with the '
    r'exception of an initial optional system message!") }}{%- endif %}{%- endfor %}')
CHATML = (
    r"{% for message in messages %}"
    r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

TEMPLATES = {
    "demo": ChatTemplate("demo", "<|user|>\n", "\n<|assistant|>\n",
                         ("<|user|>", "<|assistant|>")),
    "llama2": JinjaTemplate(LLAMA2, "llama2"),
    "llama3": JinjaTemplate(LLAMA3, "llama3", ("<|begin_of_text|>", "<|start_header_id|>",
                                               "<|end_header_id|>", "<|eot_id|>")),
    "mistral": JinjaTemplate(MISTRAL, "mistral"),
    "chatml": JinjaTemplate(CHATML, "chatml", ("<|im_start|>", "<|im_end|>")),
}

Template = ChatTemplate | JinjaTemplate


def is_jinja(spec: str) -> bool:
  """Whether a chat-template spec is Jinja text (else a built-in name)."""
  return "{%" in spec or "{{" in spec


def get_template(spec: str) -> Template:
  """The template of a spec: a built-in name, or a Jinja chat template's text."""
  if is_jinja(spec):
    return JinjaTemplate(spec)
  if spec not in TEMPLATES:
    raise ValueError(f"Unknown chat template {spec!r}: expected one of {sorted(TEMPLATES)} or "
                     "the text of a Jinja chat template (config.data.chat_template).")
  return TEMPLATES[spec]

