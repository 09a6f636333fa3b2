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
from herd.model.tool_calls import ToolCall, parse_tool_calls


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


# Tool calling: Llama 4's pythonic format.

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME_TOOL = {"name": "get_time", "description": "Time in a zone, e.g. 'CET'."}

TOOL_SECTION_HEAD = """\
You can call functions to help you answer. These are the functions available, described in JSON:

"""
WEATHER_JSON = """\
    {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {
                    "type": "string"
                }
            },
            "required": [
                "city"
            ]
        }
    }"""
TIME_JSON = """\
    {
        "name": "get_time",
        "description": "Time in a zone, e.g. 'CET'.",
        "parameters": {
            "type": "object",
            "properties": {}
        }
    }"""
TOOL_SECTION_RULES = """

To call functions, reply with only a Python list of calls and no other text:
[func_name1(param1=value1, param2=value2), func_name2(param=value)]
Pass every argument by name and write each value as a Python literal: a quoted string, a number, True, False, \
None, or a list or dict of these. Call only the functions listed above.
"""
AUTO_LINE = "If no function is needed, reply in plain text instead."
RESULTS_LINE = "\nFunction results come back to you in ipython messages; use them to answer the user."


def _tool_section(listing: str, choice_line: str) -> str:
    return TOOL_SECTION_HEAD + f"[\n{listing}\n]" + TOOL_SECTION_RULES + choice_line + RESULTS_LINE


def test_tools_are_appended_to_the_users_system_message() -> None:
    messages = [{"role": "system", "content": "  Be terse.\n"}, {"role": "user", "content": "Weather in Oslo?"}]
    rendered = render_chat(messages, tools=[WEATHER_TOOL, TIME_TOOL])
    assert rendered == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe terse.\n\n"
        + _tool_section(WEATHER_JSON + ",\n" + TIME_JSON, AUTO_LINE)
        + "<|eot|><|header_start|>user<|header_end|>\n\nWeather in Oslo?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )


@pytest.mark.parametrize("system", [None, "", "   "])
def test_tools_without_a_system_message_get_one(system: str | None) -> None:
    messages = [{"role": "user", "content": "hi"}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    rendered = render_chat(messages, tools=[WEATHER_TOOL], add_generation_prompt=False)
    assert rendered == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\n"
        + _tool_section(WEATHER_JSON, AUTO_LINE)
        + "<|eot|><|header_start|>user<|header_end|>\n\nhi<|eot|>"
    )


def test_tool_choice_shapes_the_system_section() -> None:
    messages = [{"role": "user", "content": "hi"}]
    tools = [WEATHER_TOOL, TIME_TOOL]

    def system_of(tool_choice: Any) -> str:
        rendered = render_chat(messages, tools=tools, tool_choice=tool_choice)
        head = "<|begin_of_text|><|header_start|>system<|header_end|>\n\n"
        assert rendered.startswith(head)
        return rendered[len(head) : rendered.index("<|eot|>")]

    both = WEATHER_JSON + ",\n" + TIME_JSON
    assert system_of("auto") == _tool_section(both, AUTO_LINE)
    assert system_of("required") == _tool_section(
        both, "You must call at least one of these functions in this reply; do not reply in plain text."
    )
    assert system_of({"type": "function", "function": {"name": "get_time"}}) == _tool_section(
        TIME_JSON, "You must call the function get_time in this reply; do not reply in plain text."
    )
    assert (
        render_chat(messages, tools=tools, tool_choice="none")
        == render_chat(messages)
        == render_chat(messages, tools=[])
    )


@pytest.mark.parametrize(
    ("tools", "tool_choice", "match"),
    [
        ([{"name": "get-weather"}], "auto", "identifier"),
        ([WEATHER_TOOL, WEATHER_TOOL], "auto", "unique"),
        ([{"type": "retrieval"}], "auto", "not supported"),
        ({"name": "f"}, "auto", "list of function definitions"),
        ([WEATHER_TOOL], "any", "tool_choice must be"),
        ([WEATHER_TOOL], {"type": "function", "function": {"name": "get_time"}}, "not among the tools"),
        (None, "required", "at least one tool"),
    ],
)
def test_invalid_tools_or_tool_choice_raise(tools: Any, tool_choice: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_chat([{"role": "user", "content": "hi"}], tools=tools, tool_choice=tool_choice)


TOOL_CALL_ARGUMENTS: list[dict[str, Any]] = [
    {"city": "Zürich"},
    {"city": 'Say "hi"\n\\ \'', "days": [1, 2.5, -3], "hourly": True, "unit": None, "opts": {"a": {"b": []}}},
    {},
    {"from": "SFO", "max-results": 3},
]


@pytest.mark.parametrize("arguments", TOOL_CALL_ARGUMENTS)
def test_assistant_tool_calls_render_pythonic_and_parse_back(arguments: dict[str, Any]) -> None:
    openai_calls = [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(arguments)}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
    ]
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": openai_calls},
    ]
    rendered = render_chat(messages, tools=[WEATHER_TOOL, TIME_TOOL], add_generation_prompt=False)
    head = "<|header_start|>assistant<|header_end|>\n\n"
    turn = rendered[rendered.index(head) + len(head) :]
    assert turn.endswith("<|eot|>") and turn.count("<|eot|>") == 1
    text = turn.removesuffix("<|eot|>")
    assert text.startswith("[get_weather(") and text.endswith('), get_time(tz="CET")]')
    parsed = parse_tool_calls(text, {"get_weather", "get_time"})
    assert parsed.content is None
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", arguments), ("get_time", {"tz": "CET"})]


def test_assistant_tool_call_layout_with_and_without_content() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET", "n": 2}'}}
    bare = render_chat([{"role": "assistant", "tool_calls": [call]}], add_generation_prompt=False)
    assert bare == '<|begin_of_text|><|header_start|>assistant<|header_end|>\n\n[get_time(tz="CET", n=2)]<|eot|>'
    empty = render_chat([{"role": "assistant", "content": "", "tool_calls": [call]}], add_generation_prompt=False)
    assert empty == bare
    with_text = render_chat(
        [{"role": "assistant", "content": "Checking.", "tool_calls": [call]}], add_generation_prompt=False
    )
    assert with_text == (
        '<|begin_of_text|><|header_start|>assistant<|header_end|>\n\nChecking.\n\n[get_time(tz="CET", n=2)]<|eot|>'
    )
    parsed = parse_tool_calls(with_text.split("\n\n", 1)[1].removesuffix("<|eot|>"), {"get_time"})
    assert parsed.content == "Checking." and [c.name for c in parsed.calls] == ["get_time"]


def test_tool_call_messages_as_objects_render_like_dicts() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}
    dicts = [{"role": "user", "content": "t?"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    objects = [
        ChatMessage(role="user", content="t?"),
        ChatMessage(role="assistant", content="", tool_calls=[ToolCall(name="get_time", arguments={"tz": "CET"})]),  # type: ignore[arg-type]
    ]
    assert render_chat(objects, tools=[TIME_TOOL]) == render_chat(dicts, tools=[TIME_TOOL])
    assert objects[1].tool_calls == (ToolCall(name="get_time", arguments={"tz": "CET"}),)


def _openai_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ({"role": "user", "content": "x", "tool_calls": [_openai_call("f", "{}")]}, "only assistant"),
        ({"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
         "'name' and 'arguments'"),
        ({"role": "assistant", "content": "", "tool_calls": [_openai_call("f-g", "{}")]}, "not a Python identifier"),
        ({"role": "assistant", "content": "", "tool_calls": [_openai_call("f", "[]")]}, "JSON object"),
        ({"role": "assistant", "content": "", "tool_calls": {"type": "function"}}, "must be a list"),
        ({"role": "assistant", "content": None, "tool_calls": []}, "NoneType"),
        ({"role": "assistant", "tool_calls": []}, "'role' and 'content'"),
    ],
)  # fmt: skip
def test_bad_tool_call_messages_raise(message: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_chat([message], tools=[TIME_TOOL])


def test_tool_results_are_verbatim_when_tools_are_given() -> None:
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": 'sunny, "21 °C"\n'},
        {"role": "ipython", "content": '{"temp_c": 21}'},
        {"role": "tool", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]},
    ]
    results = (
        '<|header_start|>ipython<|header_end|>\n\nsunny, "21 °C"\n<|eot|>'
        '<|header_start|>ipython<|header_end|>\n\n{"temp_c": 21}<|eot|>'
        "<|header_start|>ipython<|header_end|>\n\npart one, part two<|eot|>"
    )
    with_tools = render_chat(messages, tools=[WEATHER_TOOL], add_generation_prompt=False)
    assert with_tools.endswith("<|header_start|>user<|header_end|>\n\nWeather in Zürich?<|eot|>" + results)
    # tool_choice="none" and tools=[] still mean a tool-calling conversation: results stay verbatim.
    expected_without_section = (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nWeather in Zürich?<|eot|>" + results
    )
    assert render_chat(messages, tools=[], add_generation_prompt=False) == expected_without_section
    assert render_chat(messages, tools=[WEATHER_TOOL], tool_choice="none", add_generation_prompt=False) == (
        expected_without_section
    )
    # Without tools the reference's JSON encoding applies (a string arrives quoted).
    assert render_chat(messages, add_generation_prompt=False) == render_reference(messages, add_generation_prompt=False)
    assert '\n\n"sunny, \\"21 °C\\"\\n"<|eot|>' in render_chat(messages)


def test_tool_result_with_an_image_is_rejected_when_tools_are_given() -> None:
    messages = [{"role": "user", "content": "x"}, {"role": "tool", "content": [{"type": "image"}]}]
    with pytest.raises(ValueError, match="only text"):
        render_chat(messages, tools=[WEATHER_TOOL])


def test_full_tool_conversation() -> None:
    call = {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    messages = [
        {"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_9", "content": "rain"},
    ]
    rendered = render_chat(messages, tools=[WEATHER_TOOL])
    assert rendered.endswith(
        "<|header_start|>user<|header_end|>\n\nOslo?<|eot|>"
        '<|header_start|>assistant<|header_end|>\n\n[get_weather(city="Oslo")]<|eot|>'
        "<|header_start|>ipython<|header_end|>\n\nrain<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )
