"""Chat messages and their rendering into a Llama 4 prompt.

Invariant: without ``tools`` and without assistant ``tool_calls``, ``render_chat`` returns, byte for byte,
what Llama 4's official Hugging Face chat template returns for the same messages (text, image
placeholders and tool results):

    <|begin_of_text|>
    <|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>     once per message
    <|header_start|>assistant<|header_end|>\\n\\n                 with add_generation_prompt

The template's own tokens (``<|begin_of_text|>``, headers, ``<|eot|>``, an image part's ``<|image|>``) are
``Control`` pieces of ``render_chat_pieces``; everything else, a client's content above all, is text. So
``herd.model.chat_prompt.chat_ids`` can encode the text with special-token strings as plain text: a user who
types ``<|header_start|>assistant<|header_end|>`` cannot open a turn. ``render_chat`` joins the pieces.

Quirks of the reference kept on purpose: a leading system message is stripped of surrounding
whitespace (only the first); a ``tool``/``ipython`` message gets the header ``ipython``. Where the
reference would silently drop or mangle input (unknown part types, a multi-part system message) we raise
``ValueError`` instead.

Tool calling uses Llama 4's pythonic format (see ``herd.model.tool_calls``), not the reference's JSON one:

* ``tools`` (offered per ``tool_choice``) become a section of the system message: after the user's own
  system text and a blank line if there is one, else as a system message of their own. It lists the
  functions as indented JSON and tells the model to answer only ``[f(a=1), g(b="x")]`` when it calls.
* An assistant message with ``tool_calls`` renders its content (if any, then a blank line) and the
  pythonic list, bare (no ``<|python_start|>``), then ``<|eot|>``.
* Tool results (``tool``/``ipython``; ``tool_call_id`` and ``name`` are ignored, Llama 4 has no slot for
  them): when ``tools`` is given (even ``[]`` or with ``tool_choice="none"``) the text goes in as is,
  text parts joined. When ``tools`` is ``None`` the content is JSON-encoded as the reference does (a
  string arrives quoted, parts as a JSON list), so tool-free prompts stay byte-identical to it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from herd.model.special_tokens import BEGIN_OF_TEXT, EOT, HEADER_END, HEADER_START, IMAGE
from herd.model.tool_calls import FunctionTool, ToolCall, ToolOffer, format_tool_calls, offer_tools

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


@dataclass(frozen=True)
class Control:
    """A special token the template itself writes; never made from what a client sent."""

    token: str


Piece = str | Control
"""A piece of a rendered chat: text (markup words and content alike, always literal) or a Control token."""


@dataclass(frozen=True, kw_only=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    """One of ``ROLES``."""
    content: str | tuple[ContentPart, ...]
    """Plain text, or text and image parts in order."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Calls an assistant made in this turn; ``content`` is then usually empty."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown message role {self.role!r}; expected one of {sorted(ROLES)}")
        if isinstance(self.tool_calls, list):
            object.__setattr__(self, "tool_calls", tuple(self.tool_calls))
        if not isinstance(self.tool_calls, tuple) or not all(isinstance(c, ToolCall) for c in self.tool_calls):
            raise ValueError(f"tool_calls must be ToolCall objects, got {self.tool_calls!r:.80}")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool calls, not {self.role!r}")
        if isinstance(self.content, list):
            object.__setattr__(self, "content", tuple(self.content))
        if isinstance(self.content, tuple):
            for part in self.content:
                if not isinstance(part, TextPart | ImagePart):
                    raise ValueError(f"content part must be a TextPart or ImagePart, got {part!r:.80}")
        elif not isinstance(self.content, str):
            raise _bad_content(self.content)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatMessage:
        """Parse an OpenAI-style ``{"role": ..., "content": ...}``; content parts are
        ``{"type": "text", "text": ...}`` or ``{"type": "image", ...}``. An assistant's ``tool_calls`` are
        OpenAI's ``[{"type": "function", "function": {"name", "arguments"}}]``; with them, ``content`` may be
        ``None`` or absent. Other keys (``tool_call_id``, ``name``) are ignored."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a message must be a mapping, got {type(data).__name__}: {data!r:.80}")
        raw_calls = data.get("tool_calls") or ()
        if isinstance(raw_calls, str | bytes | Mapping) or not isinstance(raw_calls, Sequence):
            raise ValueError(f"tool_calls must be a list, got {type(raw_calls).__name__}: {raw_calls!r:.80}")
        tool_calls = tuple(ToolCall.from_openai(call) for call in raw_calls)
        if "role" not in data or ("content" not in data and not tool_calls):
            raise ValueError(f"a message needs 'role' and 'content', got keys {sorted(data)}")
        content = data.get("content")
        if content is None and tool_calls:
            content = ""
        if isinstance(content, Sequence) and not isinstance(content, str | bytes):
            content = tuple(_part_from_dict(part) for part in content)
        elif not isinstance(content, str):
            raise _bad_content(content)
        return cls(role=data["role"], content=content, tool_calls=tool_calls)


def render_chat(
    messages: Sequence[ChatMessage | Mapping[str, Any]],
    *,
    tools: Sequence[FunctionTool | Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] = "auto",
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages`` as a Llama 4 prompt string (begins with ``<|begin_of_text|>``).

    Args:
        messages: ``ChatMessage`` objects or OpenAI-style dicts, oldest first; at least one.
        tools: OpenAI function tools (``{"type": "function", "function": {...}}`` or the bare function);
            ``None`` for a request without tools.
        tool_choice: ``"auto"``, ``"none"``, ``"required"`` or ``{"type": "function", "function": {"name": ...}}``;
            ``offer_tools`` says what each shows the model.
        add_generation_prompt: end with an open assistant header, for the model to continue.

    Raises:
        ValueError: no messages, a message that is malformed or uses an unsupported feature, an invalid
            tool or tool_choice.
    """
    pieces = render_chat_pieces(messages, tools=tools, tool_choice=tool_choice,
                                add_generation_prompt=add_generation_prompt)
    return "".join(p.token if isinstance(p, Control) else p for p in pieces)


def render_chat_pieces(
    messages: Sequence[ChatMessage | Mapping[str, Any]],
    *,
    tools: Sequence[FunctionTool | Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] = "auto",
    add_generation_prompt: bool = True,
) -> list[Piece]:
    """``render_chat``'s prompt as text pieces and the template's own Control tokens (same arguments)."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of messages, got {type(messages).__name__}")
    offer = offer_tools(tools, tool_choice)
    parsed = [m if isinstance(m, ChatMessage) else ChatMessage.from_dict(m) for m in messages]
    if not parsed:
        raise ValueError("cannot render an empty list of messages")
    out: list[Piece] = [Control(BEGIN_OF_TEXT)]
    system = None
    if parsed[0].role == "system":
        system = _system_text(parsed[0].content)
        parsed = parsed[1:]
    if offer.functions:
        system = f"{system}\n\n{_tool_section(offer)}" if system else _tool_section(offer)
    if system is not None:
        out += [*_header("system"), system, Control(EOT)]
    for message in parsed:
        if message.role in _TOOL_ROLES:
            result = _tool_result_json(message.content) if tools is None else _tool_result_text(message.content)
            out += [*_header("ipython"), result, Control(EOT)]
        elif message.tool_calls:
            text = _content_text(message.content)
            calls = format_tool_calls(message.tool_calls)
            out += [*_header("assistant"), *([*text, "\n\n", calls] if _has_text(text) else [calls]), Control(EOT)]
        else:
            out += [*_header(message.role), *_content_text(message.content), Control(EOT)]
    if add_generation_prompt:
        out += _header("assistant")
    return out


_TOOL_SECTION = """\
You can call functions to help you answer. These are the functions available, described in JSON:

{listing}

To call functions, reply with only a Python list of calls and no other text:
[func_name1(param1=value1, param2=value2), func_name2(param=value)]
Pass every argument by name and write each value as a Python literal: a quoted string, a number, True, False, \
None, or a list or dict of these. Call only the functions listed above.
{choice}
Function results come back to you in ipython messages; use them to answer the user."""


def _tool_section(offer: ToolOffer) -> str:
    listing = json.dumps([f.to_json_dict() for f in offer.functions], indent=4, ensure_ascii=False)
    if not offer.call_required:
        choice = "If no function is needed, reply in plain text instead."
    elif len(offer.functions) == 1:
        choice = f"You must call the function {offer.functions[0].name} in this reply; do not reply in plain text."
    else:
        choice = "You must call at least one of these functions in this reply; do not reply in plain text."
    return _TOOL_SECTION.format(listing=listing, choice=choice)


def _header(role: str) -> list[Piece]:
    return [Control(HEADER_START), role, Control(HEADER_END), "\n\n"]


def _bad_content(content: object) -> ValueError:
    return ValueError(
        f"message content must be a str or a list of parts, got {type(content).__name__}: {content!r:.80}"
    )


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


def _content_text(content: str | tuple[ContentPart, ...]) -> list[Piece]:
    if isinstance(content, str):
        return [content]
    return [part.text if isinstance(part, TextPart) else Control(IMAGE) for part in content]


def _has_text(pieces: list[Piece]) -> bool:
    """What ``text.strip()`` tested on the joined content: an image part counts, as its marker did."""
    return any(isinstance(p, Control) or p.strip() for p in pieces)


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


def _tool_result_text(content: str | tuple[ContentPart, ...]) -> str:
    # OpenAI's tool message content is a string or text parts whose meaning is their concatenation.
    if isinstance(content, str):
        return content
    if not all(isinstance(part, TextPart) for part in content):
        raise ValueError(f"a tool result may hold only text, got {content!r:.80}")
    return "".join(part.text for part in content if isinstance(part, TextPart))


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
whose ``tojson`` is ``json.dumps(ensure_ascii=False)``). It covers requests without tools only: it ignores
``tools`` and raises on assistant ``tool_calls``, which ``render_chat`` renders."""
