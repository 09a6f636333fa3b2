"""herd.model.chat_template against Llama 4's reference Jinja chat template from transformers."""

from __future__ import annotations

import ast
import importlib.util
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from herd.model.chat_template import ChatMessage, ImagePart, TextPart, render_chat


def _reference_template() -> str:
    """The ``chat_template`` string of transformers' Llama 4 processor, read from its source file.

    Parsed rather than imported: importing the processor pulls in torch and the image stack (~5 s).
    """
    spec = importlib.util.find_spec("transformers")
    assert spec is not None and spec.submodule_search_locations, "transformers is a dev dependency"
    source = Path(spec.submodule_search_locations[0], "models", "llama4", "processing_llama4.py")
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["chat_template"]:
            return ast.literal_eval(node.value)
    raise LookupError(f"no chat_template assignment in {source}")


REFERENCE_TEMPLATE = _reference_template()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def render_reference(messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
    """The reference template rendered the way transformers' apply_chat_template renders it."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    # transformers replaces Jinja's HTML-escaping tojson with plain json.dumps(ensure_ascii=False).
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(REFERENCE_TEMPLATE).render(
        messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=add_generation_prompt
    )


CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "single_user": [{"role": "user", "content": "What is 2 + 2?"}],
    "system_with_whitespace": [
        {"role": "system", "content": " \n\tYou are terse.  \n"},
        {"role": "user", "content": "  keep my spaces  "},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Tell me a joke\nabout goats."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Another, please."},
    ],
    "list_content_with_image": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image"},
                {"type": "text", "text": " with "},
                {"type": "image"},
            ],
        },
    ],
    "system_as_one_text_part": [
        {"role": "system", "content": [{"type": "text", "text": "  Answer in French. "}]},
        {"role": "user", "content": "Hello"},
    ],
    "tool_results": [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "tool", "content": 'sunny, 21°C, "light" wind <5 km/h> & dry'},
        {"role": "ipython", "content": "line one\nline two"},
        {"role": "tool", "content": [{"type": "text", "text": "part"}]},
    ],
    "later_system_not_trimmed": [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "  mid-conversation note  "},
    ],
    "only_system": [{"role": "system", "content": "alone"}],
    "unicode_and_specials_in_text": [
        {"role": "user", "content": "東京 🙂 naïve — and a literal <|eot|> inside"},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_matches_reference_template(name: str, add_generation_prompt: bool) -> None:
    messages = CONVERSATIONS[name]
    expected = render_reference(messages, add_generation_prompt=add_generation_prompt)
    assert render_chat(messages, add_generation_prompt=add_generation_prompt) == expected


def test_exact_layout() -> None:
    rendered = render_chat([{"role": "system", "content": " s "}, {"role": "user", "content": "u"}])
    assert rendered == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\ns<|eot|>"
        "<|header_start|>user<|header_end|>\n\nu<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )


def test_message_objects_render_like_dicts() -> None:
    objects = [
        ChatMessage(role="system", content="  sys "),
        ChatMessage(role="user", content=(ImagePart(), TextPart(text="describe"))),
        ChatMessage(role="assistant", content="ok"),
        ChatMessage(role="tool", content="42"),
    ]
    dicts = [
        {"role": "system", "content": "  sys "},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "tool", "content": "42"},
    ]
    assert render_chat(objects) == render_chat(dicts) == render_reference(dicts, add_generation_prompt=True)


def test_list_content_is_stored_as_a_tuple() -> None:
    message = ChatMessage(role="user", content=[TextPart(text="a")])  # type: ignore[arg-type]
    assert message.content == (TextPart(text="a"),)


def test_extra_openai_keys_are_ignored() -> None:
    plain = [{"role": "tool", "content": "x"}]
    extra = [{"role": "tool", "content": "x", "tool_call_id": "call_1", "name": "weather", "tool_calls": []}]
    assert render_chat(extra) == render_chat(plain)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "empty"),
        ([{"role": "narrator", "content": "x"}], "narrator"),
        ([{"role": "user", "content": None}], "NoneType"),
        ([{"role": "user", "content": 5}], "int"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "user", "content": [{"type": "text", "text": 7}]}], "int"),
        ([{"role": "user", "content": [{"type": "text"}]}], "without 'text'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "image_url"),
        ([{"role": "user", "content": ["bare string part"]}], "str"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}], "not supported"),
        ([{"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
         "exactly one text part"),
        ([{"role": "system", "content": [{"type": "image"}]}], "exactly one text part"),
        (["user: hi"], "mapping"),
    ],
)  # fmt: skip
def test_bad_messages_raise_naming_the_value(messages: list[Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_chat(messages)


@pytest.mark.parametrize("messages", ["hello", {"role": "user", "content": "hi"}, None])
def test_messages_must_be_a_list(messages: Any) -> None:
    with pytest.raises(ValueError, match="list of messages"):
        render_chat(messages)


def test_message_model_validates_directly() -> None:
    with pytest.raises(ValueError, match="robot"):
        ChatMessage(role="robot", content="x")
    with pytest.raises(ValueError, match="TextPart or ImagePart"):
        ChatMessage(role="user", content=("raw",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bytes"):
        TextPart(text=b"x")  # type: ignore[arg-type]
