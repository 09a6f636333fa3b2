"""herd.model.tool_calls: offering tools, writing Llama 4 pythonic calls, and reading calls back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from herd.model.tool_calls import (
    FunctionTool,
    ToolCall,
    ToolCallParse,
    arguments_json,
    format_tool_calls,
    offer_tools,
    parse_tool_calls,
)

NAMES = frozenset({"get_weather", "get_time"})

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    },
}
TIME = {"name": "get_time", "description": "Time in a zone.", "parameters": {"type": "object", "properties": {}}}


def _call(name: str, **arguments: Any) -> ToolCall:
    return ToolCall(name=name, arguments=arguments)


# Parsing: what counts as calls.


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        ('[get_weather(city="Oslo")]', [_call("get_weather", city="Oslo")]),
        ("[get_time()]", [_call("get_time")]),
        (
            "[get_weather(city='Oslo', days=3), get_time(tz=\"CET\", utc=False)]",
            [_call("get_weather", city="Oslo", days=3), _call("get_time", tz="CET", utc=False)],
        ),
        (
            '[get_weather(where={"city": "Oslo", "near": [1, -2.5, None, True, [], {}]}, hours=(1, 2))]',
            [_call("get_weather", where={"city": "Oslo", "near": [1, -2.5, None, True, [], {}]}, hours=[1, 2])],
        ),
        ("[get_weather(ok=true, no=false, none=null)]", [_call("get_weather", ok=True, no=False, none=None)]),
        ('<|python_start|>[get_weather(city="Oslo")]<|python_end|>', [_call("get_weather", city="Oslo")]),
        ('<|python_start|>[get_weather(city="Oslo")]', [_call("get_weather", city="Oslo")]),
        (' \n [get_weather(city="Oslo")]\n ', [_call("get_weather", city="Oslo")]),
        ('\n<|python_start|> [get_time()] <|python_end|>\n', [_call("get_time")]),
        ('```python\n[get_time(tz="UTC")]\n```', [_call("get_time", tz="UTC")]),
        ('[get_weather(pattern="\\d+ °C", quote="\\"x\\"")]', [_call("get_weather", pattern="\\d+ °C", quote='"x"')]),
        ('[get_weather(**{"from": "SFO"}, to="JFK")]', [_call("get_weather", **{"from": "SFO", "to": "JFK"})]),
    ],
)  # fmt: skip
def test_pythonic_calls_parse(text: str, calls: list[ToolCall]) -> None:
    assert parse_tool_calls(text, NAMES) == ToolCallParse(calls=calls, content=None)


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', [_call("get_weather", city="Oslo")]),
        ('{"name": "get_weather", "arguments": {"city": "Oslo"}}', [_call("get_weather", city="Oslo")]),
        ('{"type": "function", "name": "get_time", "parameters": {}}', [_call("get_time")]),
        ('{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}', [_call("get_time", tz="CET")]),
        (
            '[{"name": "get_weather", "parameters": {"city": "Oslo", "ok": true}}, '
            '{"name": "get_time", "arguments": {"tz": null}}]',
            [_call("get_weather", city="Oslo", ok=True), _call("get_time", tz=None)],
        ),
        ('```json\n{"name": "get_time", "parameters": {"tz": "CET"}}\n```', [_call("get_time", tz="CET")]),
        ('```\n[{"name": "get_time", "parameters": {}}]\n```', [_call("get_time")]),
        ('<|python_start|>{"name": "get_time", "parameters": {}}<|python_end|>', [_call("get_time")]),
    ],
)  # fmt: skip
def test_json_calls_parse(text: str, calls: list[ToolCall]) -> None:
    assert parse_tool_calls(text, NAMES) == ToolCallParse(calls=calls, content=None)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "It is sunny in Oslo.",
        "See [1] and [2], or [the docs](https://example.com).",
        "Use a list like [get_weather, get_time] to compare.",
        "[]",
        '[get_weather(city="Oslo")',  # unbalanced
        '[get_weather(city="Oslo"))]',
        '[get_weather(city="Oslo")] and then I will tell you.',  # prose after the call
        '[send_email(to="a@b.c")]',  # unknown function
        '[get_weather(city="Oslo"), send_email(to="a@b.c")]',  # one unknown spoils the list
        '[get_weather("Oslo")]',  # positional
        '[get_weather(*["Oslo"])]',
        "[get_weather(city=get_time())]",  # non-literal
        "[get_weather(city=city)]",
        '[get_weather(city="Os" + "lo")]',
        '[get_weather(city=f"{1}")]',
        "[get_weather(days={1, 2})]",
        "[get_weather(days={1: 2})]",
        "[get_weather(days=1j)]",
        "[get_weather(days=1e999)]",
        "[get_weather(blob=b'x')]",
        "[get_weather(city=...)]",
        "[get_weather(**cities)]",
        "[get_weather(**[1])]",
        '[get_weather(city="a", city="b")]',  # repeated argument
        '[get_weather(city="a", **{"city": "b"})]',
        '[__import__(name="os")]',
        '[__import__("os").system("rm -rf /")]',
        '[get_weather(city=__import__("os").getcwd())]',
        '[get_weather(city=(lambda: "x")())]',
        '[os.system(cmd="ls")]',
        '[get_weather.__class__(city="x")]',
        '[get_weather(city="Oslo")][0]',
        'get_weather(city="Oslo")',  # bare call without the list
        '{"name": "send_email", "parameters": {}}',
        '{"name": "get_time"}',  # neither parameters nor arguments
        '{"name": "get_time", "parameters": {}, "arguments": {}}',
        '{"name": "get_time", "parameters": {}, "extra": 1}',
        '{"name": "get_time", "parameters": [1]}',
        '{"name": "get_time", "parameters": {"x": NaN}}',
        '{"name": ["get_time"], "parameters": {}}',
        '{"type": "code", "name": "get_time", "parameters": {}}',
        '{"name": "get_time", "parameters": {}',
        '```json\n{"name": "get_time", "parameters": {}}\n``` and more',
        "[" * 500 + "get_time()" + "]" * 500,
        '{"a": ' * 5000 + "1" + "}" * 5000,
        "[get_time(x='\x00')]",
    ],
)
def test_anything_else_is_content(text: str) -> None:
    assert parse_tool_calls(text, NAMES) == ToolCallParse(calls=[], content=text)


def test_prose_before_a_call_is_content_and_the_call_is_extracted() -> None:
    text = 'Let me check the weather [now].\n\n[get_weather(city="Oslo")]'
    assert parse_tool_calls(text, NAMES) == ToolCallParse(
        calls=[_call("get_weather", city="Oslo")], content="Let me check the weather [now]."
    )
    tagged = 'Checking.<|python_start|>[get_time(tz="CET")]<|python_end|>'
    assert parse_tool_calls(tagged, NAMES) == ToolCallParse(calls=[_call("get_time", tz="CET")], content="Checking.")
    json_after = 'Sure: {"name": "get_time", "parameters": {}}'
    assert parse_tool_calls(json_after, NAMES) == ToolCallParse(calls=[_call("get_time")], content="Sure:")


def test_only_the_given_names_count() -> None:
    text = '[get_weather(city="Oslo")]'
    assert parse_tool_calls(text, {"get_time"}).calls == []
    assert parse_tool_calls(text, []) == ToolCallParse(calls=[], content=text)
    assert parse_tool_calls("[über(a=1)]", {"über"}).calls == [_call("über", a=1)]


def test_parsing_evaluates_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("parse_tool_calls must not evaluate model output")

    monkeypatch.setattr("builtins.eval", forbidden)
    monkeypatch.setattr("builtins.exec", forbidden)
    monkeypatch.setattr("builtins.__import__", forbidden)
    text = '[get_weather(city=__import__("os").system("echo pwned"))]'
    assert parse_tool_calls(text, NAMES) == ToolCallParse(calls=[], content=text)


# Writing calls, and reading back what we write.


def test_format_writes_llama4_pythonic_text() -> None:
    calls = [
        _call("get_weather", city="Zürich", days=3, hourly=True, unit=None, ratio=-0.5),
        _call("get_time", zones=["CET", {"name": 'a "b"\n'}], **{"from": 1, "max-hours": 2}),
        _call("get_time"),
    ]
    assert format_tool_calls(calls) == (
        '[get_weather(city="Zürich", days=3, hourly=True, unit=None, ratio=-0.5), '
        'get_time(zones=["CET", {"name": "a \\"b\\"\\n"}], **{"from": 1}, **{"max-hours": 2}), get_time()]'
    )


ROUND_TRIP_ARGUMENTS: list[dict[str, Any]] = [
    {},
    {"city": "Oslo"},
    {"text": "quotes \" ' and \\ backslashes\n\ttabs \u0000 nul, emoji 🙂, 東京, \u2028"},
    {"n": 0, "big": 2**80, "neg": -7, "f": 1e-300, "g": -1.5e300, "t": True, "fa": False, "nil": None},
    {"nested": {"list": [[], {}, [1, [2, [3]]], {"k": {"v": None}}], "": "empty key"}},
    {"from": "SFO", "to": "JFK", "class": "economy", "max-tokens": 5, "with space": 1, "1st": 2},
]


@pytest.mark.parametrize("arguments", ROUND_TRIP_ARGUMENTS)
def test_format_then_parse_round_trips(arguments: dict[str, Any]) -> None:
    calls = [_call("get_weather", **arguments), _call("get_time")]
    parsed = parse_tool_calls(format_tool_calls(calls), NAMES)
    assert parsed == ToolCallParse(calls=calls, content=None)
    assert [json.loads(arguments_json(c)) for c in parsed.calls] == [arguments, {}]


@pytest.mark.parametrize(
    ("calls", "match"),
    [
        ([], "empty"),
        ([_call("get-weather")], "identifier"),
        ([_call("class")], "identifier"),
        ([_call("f", x=float("nan"))], "finite"),
        ([_call("f", x=float("inf"))], "finite"),
        ([_call("f", x={1: 2})], "keys must be str"),
        ([_call("f", x={1, 2})], "not a JSON value"),
        ([_call("f", x=b"raw")], "not a JSON value"),
    ],
)
def test_format_rejects_what_has_no_pythonic_form(calls: list[ToolCall], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        format_tool_calls(calls)


def test_arguments_json_is_compact_openai_text() -> None:
    assert arguments_json(_call("f", city="Zürich", days=[1, 2], ok=None)) == '{"city":"Zürich","days":[1,2],"ok":null}'


def test_tool_call_from_openai() -> None:
    openai = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}
    assert ToolCall.from_openai(openai) == _call("get_time", tz="CET")
    as_dict = {"type": "function", "function": {"name": "get_time", "arguments": {"tz": "CET"}}}
    assert ToolCall.from_openai(as_dict) == _call("get_time", tz="CET")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"function": {"name": "f", "arguments": "{}"}}, "type None is not supported"),
        ({"type": "custom", "custom": {"name": "f", "input": "x"}}, "'custom' is not supported"),
        ({"type": "function", "function": {"name": "f"}}, "'name' and 'arguments'"),
        ({"type": "function", "function": {"name": "f", "arguments": "{oops"}}, "not JSON"),
        ({"type": "function", "function": {"name": "f", "arguments": '{"x": NaN}'}}, "not JSON"),
        ({"type": "function", "function": {"name": "f", "arguments": "[1]"}}, "JSON object"),
        ({"type": "function", "function": {"name": "", "arguments": "{}"}}, "non-empty"),
        ("call", "mapping"),
    ],
)
def test_tool_call_from_openai_rejects(data: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ToolCall.from_openai(data)


# Offering tools.


def test_offer_tools_per_tool_choice() -> None:
    weather, time = FunctionTool.from_dict(WEATHER), FunctionTool.from_dict(TIME)
    assert weather == FunctionTool(
        name="get_weather", description="Current weather for a city.", parameters=WEATHER["function"]["parameters"]
    )
    assert offer_tools([WEATHER, TIME]).functions == (weather, time)
    assert not offer_tools([WEATHER, TIME], "auto").call_required
    assert offer_tools([WEATHER, TIME], "none").functions == ()
    required = offer_tools([WEATHER, TIME], "required")
    assert required.functions == (weather, time) and required.call_required
    named = offer_tools([WEATHER, time], {"type": "function", "function": {"name": "get_time"}})
    assert named.functions == (time,) and named.call_required and named.names == {"get_time"}
    assert offer_tools(None).functions == offer_tools([]).functions == ()


def test_to_json_dict_defaults_parameters() -> None:
    assert FunctionTool(name="ping").to_json_dict() == {
        "name": "ping",
        "parameters": {"type": "object", "properties": {}},
    }


@pytest.mark.parametrize(
    ("tools", "tool_choice", "match"),
    [
        ("get_weather", "auto", "list of function definitions"),
        (WEATHER, "auto", "list of function definitions"),
        ([WEATHER, WEATHER], "auto", r"unique.*get_weather"),
        ([WEATHER, {"name": "get_weather"}], "auto", "unique"),
        ([{"name": "get-weather"}], "auto", "identifier"),
        ([{"name": "import"}], "auto", "identifier"),
        ([{"name": ""}], "auto", "identifier"),
        ([{"name": 3}], "auto", "identifier"),
        ([{"description": "no name"}], "auto", "needs a 'name'"),
        ([{"type": "retrieval"}], "auto", "'retrieval' is not supported"),
        ([{"type": "function"}], "auto", "'function' mapping"),
        ([{"name": "f", "description": 5}], "auto", "description must be a str"),
        ([{"name": "f", "parameters": "{}"}], "auto", "JSON schema object"),
        ([{"name": "f", "parameters": {"default": float("nan")}}], "auto", "not JSON"),
        ([{"name": "f", "parameters": {"default": object()}}], "auto", "not JSON"),
        (["f"], "auto", "mapping"),
        ([WEATHER], "always", "tool_choice must be"),
        ([WEATHER], None, "tool_choice must be"),
        ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "'get_time', which is not among"),
        ([WEATHER], {"type": "function", "name": "get_weather"}, "None, which is not among"),
        ([WEATHER], {"type": "tool", "function": {"name": "get_weather"}}, "tool_choice must be"),
        ([], "required", "at least one tool"),
        (None, {"type": "function", "function": {"name": "f"}}, "not among"),
    ],
)
def test_offer_tools_rejects(tools: Any, tool_choice: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        offer_tools(tools, tool_choice)
