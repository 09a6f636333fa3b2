"""Responses requests into chats and replies into output items, without a model."""

from __future__ import annotations

import json

import pytest

from herd.engine.errors import HerdError
from herd.platform.gateway.responses_models import ResponseRequest
from herd.platform.gateway.responses_translate import chat, input_messages, reply, sampling, tool_names

WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


def _request(**fields):
    return ResponseRequest.model_validate({"model": "scout", "input": "hi", **fields})


def test_items_become_the_chat_the_tool_template_renders():
    request = _request(instructions="Be brief.", input=[
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "?"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Bergen"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "rain"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "sun"}]},
    ])
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "yes"}]
    messages = chat(request, history, input_messages(request))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "system", "user", "assistant", "tool",
                                             "tool"]
    assert messages[0]["content"] == "Be brief." and messages[3]["content"] == "Use tools."
    assert messages[4]["content"] == [{"type": "text", "text": "Weather "}, {"type": "text", "text": "?"}]
    calls = messages[5]["tool_calls"]
    assert messages[5]["content"] == "Let me look." and [c["id"] for c in calls] == ["c1", "c2"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Bergen"}
    assert [m["content"] for m in messages[6:]] == ["rain", "sun"]


def test_an_assistant_image_and_empty_input_are_refused_naming_input():
    for bad in ([{"role": "assistant", "content": [{"type": "input_image", "image_url": "data:,"}]}], []):
        with pytest.raises(HerdError) as refused:
            input_messages(_request(input=bad))
        assert refused.value.param == "input"


def test_tool_choice_decides_the_callable_names_and_the_constraint():
    time_tool = {**WEATHER, "name": "get_time"}
    assert tool_names(_request(tools=[WEATHER, time_tool])) == ["get_time", "get_weather"]
    assert tool_names(_request(tools=[WEATHER], tool_choice="none")) == []
    named = _request(tools=[WEATHER, time_tool], tool_choice={"type": "function", "name": "get_time"})
    assert tool_names(named) == ["get_time"]
    assert sampling(named).structured.json_schema and not sampling(_request(tools=[WEATHER])).HasField("structured")
    fmt = {"format": {"type": "json_object"}}
    assert sampling(_request(text=fmt, max_output_tokens=5)).structured.json_object
    with pytest.raises(HerdError) as refused:
        sampling(_request(text=fmt, tools=[WEATHER], tool_choice="required"))
    assert refused.value.param == "tool_choice"


def test_a_reply_is_calls_or_a_message_and_length_is_incomplete():
    called = reply('Sure.[get_weather(city="Oslo")]', "stop", ["get_weather"])
    assert [item.type for item in called.output] == ["message", "function_call"] and not called.incomplete
    assert called.message["tool_calls"][0]["id"] == called.output[1].call_id
    plain = reply("[get_weather(city='Oslo')]", "length", [])
    assert [item.type for item in plain.output] == ["message"] and plain.incomplete
    assert plain.output[0].status == "incomplete" and plain.message == {"role": "assistant",
                                                                        "content": "[get_weather(city='Oslo')]"}
