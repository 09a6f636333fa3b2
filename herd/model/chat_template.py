"""Chat messages and their rendering into a Llama 4 prompt.

Invariant: ``render_chat`` returns, byte for byte, what Llama 4's official Hugging Face chat template
returns for the same messages (text, image placeholders and tool results; no tool definitions):

    <|begin_of_text|>
    <|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>     once per message
    <|header_start|>assistant<|header_end|>\\n\\n                 with add_generation_prompt

Quirks of the reference kept on purpose: a leading system message is stripped of surrounding
whitespace (only the first); a ``tool``/``ipython`` message gets the header ``ipython`` and its content
JSON-encoded (a string arrives quoted). Where the reference would silently drop or mangle input (tool
calls, unknown part types, a multi-part system message) we raise ``ValueError`` instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from herd.model.special_tokens import BEGIN_OF_TEXT, EOT, HEADER_END, HEADER_START, IMAGE

ROLES = frozenset({"system", "user", "assistant", "tool", "ipython"})
"""Roles a message may have; ``tool`` and ``ipython`` are the same (a tool's result)."""

_TOOL_ROLES = frozenset({"tool", "ipython"})


@dataclass(frozen=True, kw_only=True)
class TextPart:
    """A piece of text inside a message's content list."""

    text: str
    """The text, rendered verbatim."""

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValueError(f"text part must hold a str, got {type(self.text).__name__}: {self.text!r:.80}")


@dataclass(frozen=True, kw_only=True)
class ImagePart:
    """An image's place in a message; renders as ``<|image|>`` (the pixels travel separately)."""


ContentPart = TextPart | ImagePart


@dataclass(frozen=True, kw_only=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    """One of ``ROLES``."""
    content: str | tuple[ContentPart, ...]
    """Plain text, or text and image parts in order."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown message role {self.role!r}; expected one of {sorted(ROLES)}")
        if isinstance(self.content, list):
            object.__setattr__(self, "content", tuple(self.content))
        if isinstance(self.content, tuple):
            for part in self.content:
                if not isinstance(part, TextPart | ImagePart):
                    raise ValueError(f"content part must be a TextPart or ImagePart, got {part!r:.80}")
        elif not isinstance(self.content, str):
            raise ValueError(
                f"message content must be a str or a list of parts, got {type(self.content).__name__}: "
                f"{self.content!r:.80}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatMessage:
        """Parse an OpenAI-style ``{"role": ..., "content": ...}``; content parts are
        ``{"type": "text", "text": ...}`` or ``{"type": "image", ...}``. Other keys are ignored,
        except a non-empty ``tool_calls``, which is rejected."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a message must be a mapping, got {type(data).__name__}: {data!r:.80}")
        if data.get("tool_calls"):
            raise ValueError(f"tool calls are not supported yet (message with tool_calls {data['tool_calls']!r:.80})")
        if "role" not in data or "content" not in data:
            raise ValueError(f"a message needs 'role' and 'content', got keys {sorted(data)}")
        content = data["content"]
        if isinstance(content, Sequence) and not isinstance(content, str | bytes):
            content = tuple(_part_from_dict(part) for part in content)
        return cls(role=data["role"], content=content)


def render_chat(messages: Sequence[ChatMessage | Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
    """Render ``messages`` as a Llama 4 prompt string (begins with ``<|begin_of_text|>``).

    Args:
        messages: ``ChatMessage`` objects or OpenAI-style dicts, oldest first; at least one.
        add_generation_prompt: end with an open assistant header, for the model to continue.

    Raises:
        ValueError: no messages, or a message that is malformed or uses an unsupported feature.
    """
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of messages, got {type(messages).__name__}")
    parsed = [m if isinstance(m, ChatMessage) else ChatMessage.from_dict(m) for m in messages]
    if not parsed:
        raise ValueError("cannot render an empty list of messages")
    out = [BEGIN_OF_TEXT]
    if parsed[0].role == "system":
        out.append(_header("system") + _system_text(parsed[0].content) + EOT)
        parsed = parsed[1:]
    for message in parsed:
        if message.role in _TOOL_ROLES:
            out.append(_header("ipython") + _tool_result_json(message.content) + EOT)
        else:
            out.append(_header(message.role) + _content_text(message.content) + EOT)
    if add_generation_prompt:
        out.append(_header("assistant"))
    return "".join(out)


def _header(role: str) -> str:
    return f"{HEADER_START}{role}{HEADER_END}\n\n"


def _part_from_dict(part: Any) -> ContentPart:
    if not isinstance(part, Mapping):
        raise ValueError(f"a content part must be a mapping, got {type(part).__name__}: {part!r:.80}")
    kind = part.get("type")
    if kind == "text":
        if "text" not in part:
            raise ValueError(f"text part without 'text': {part!r:.80}")
        return TextPart(text=part["text"])
    if kind == "image":
        return ImagePart()
    raise ValueError(f"unknown content part type {kind!r}; expected 'text' or 'image'")


def _content_text(content: str | tuple[ContentPart, ...]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.text if isinstance(part, TextPart) else IMAGE for part in content)


def _system_text(content: str | tuple[ContentPart, ...]) -> str:
    # The reference reads only the first part of a list, so anything else would be silently lost.
    if isinstance(content, tuple):
        if len(content) != 1 or not isinstance(content[0], TextPart):
            raise ValueError(f"a leading system message must be a str or exactly one text part, got {content!r:.80}")
        content = content[0].text
    return content.strip()  # Jinja's |trim is str.strip()


def _tool_result_json(content: str | tuple[ContentPart, ...]) -> str:
    # The reference pipes tool results through tojson, which transformers defines as
    # json.dumps(ensure_ascii=False); a string therefore arrives quoted and escaped.
    if isinstance(content, str):
        return json.dumps(content, ensure_ascii=False)
    parts = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in content]
    return json.dumps(parts, ensure_ascii=False)


JINJA_CHAT_TEMPLATE = r"""
{#- Llama 4 chat format for text and image placeholders; the Jinja twin of herd's render_chat. -#}
{{- bos_token -}}
{%- if messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] -%}
    {%- if system is not string -%}
        {%- if system | length != 1 or system[0]['type'] != 'text' -%}
            {{- raise_exception('a leading system message must be a string or exactly one text part') -}}
        {%- endif -%}
        {%- set system = system[0]['text'] -%}
    {%- endif -%}
    {{- '<|header_start|>system<|header_end|>\n\n' + system | trim + '<|eot|>' -}}
    {%- set messages = messages[1:] -%}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['tool_calls'] is defined and message['tool_calls'] -%}
        {{- raise_exception('tool calls are not supported yet') -}}
    {%- elif message['role'] == 'tool' or message['role'] == 'ipython' -%}
        {{- '<|header_start|>ipython<|header_end|>\n\n' + message['content'] | tojson + '<|eot|>' -}}
    {%- else -%}
        {{- '<|header_start|>' + message['role'] + '<|header_end|>\n\n' -}}
        {%- if message['content'] is string -%}
            {{- message['content'] -}}
        {%- else -%}
            {%- for part in message['content'] -%}
                {%- if part['type'] == 'image' -%}
                    {{- '<|image|>' -}}
                {%- elif part['type'] == 'text' -%}
                    {{- part['text'] -}}
                {%- else -%}
                    {{- raise_exception('unknown content part type: ' + part['type'] | string) -}}
                {%- endif -%}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|eot|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|header_start|>assistant<|header_end|>\n\n' -}}
{%- endif -%}
""".strip()
"""Jinja form of ``render_chat`` for ``tokenizer_config.json`` (rendered by transformers' environment,
whose ``tojson`` is ``json.dumps(ensure_ascii=False)``)."""
