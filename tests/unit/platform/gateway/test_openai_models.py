"""herd.platform.gateway.openai_models: the HTTP door's sampling limits are the engine's, and say the same."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from herd.engine.sampling_params import (
    MAX_LOGPROBS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKENS_LIMIT,
    SamplingError,
    SamplingParams,
)
from herd.platform.gateway.openai_models import ChatCompletionRequest, CompletionRequest

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION: dict[str, Any] = {"model": "m", "prompt": "hi"}

OVER_THE_LIMITS: list[tuple[dict[str, Any], str, dict[str, Any]]] = [
    ({"stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop", {"stop": ["s"] * (MAX_STOP_STRINGS + 1)}),
    ({"stop": "x" * (MAX_STOP_STRING_CHARS + 1)}, "stop", {"stop": "x" * (MAX_STOP_STRING_CHARS + 1)}),
    ({"stop": ["ok", "x" * (MAX_STOP_STRING_CHARS + 1)]}, "stop",
     {"stop": ["ok", "x" * (MAX_STOP_STRING_CHARS + 1)]}),
    ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids",
     {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}),
]


def engine_message(kwargs: dict[str, Any]) -> str:
    with pytest.raises(SamplingError) as info:
        SamplingParams(**kwargs)
    return str(info.value)


@pytest.mark.parametrize("body", [CHAT, COMPLETION])
@pytest.mark.parametrize(("fields", "where", "engine_kwargs"), OVER_THE_LIMITS)
def test_over_the_engines_limits_is_refused_as_the_engine_says(
    body: dict[str, Any], fields: dict[str, Any], where: str, engine_kwargs: dict[str, Any]
) -> None:
    model = ChatCompletionRequest if body is CHAT else CompletionRequest
    with pytest.raises(ValidationError) as info:
        model.model_validate({**body, **fields})
    error = info.value.errors()[0]
    assert error["loc"][0] == where
    assert engine_message(engine_kwargs) in error["msg"]


@pytest.mark.parametrize("body", [CHAT, COMPLETION])
def test_max_tokens_over_the_engines_limit_is_refused(body: dict[str, Any]) -> None:
    model = ChatCompletionRequest if body is CHAT else CompletionRequest
    with pytest.raises(ValidationError) as info:
        model.model_validate({**body, "max_tokens": MAX_TOKENS_LIMIT + 1})
    assert info.value.errors()[0]["loc"] == ("max_tokens",)


def test_top_logprobs_over_the_engines_limit_is_refused() -> None:
    ChatCompletionRequest.model_validate({**CHAT, "logprobs": True, "top_logprobs": MAX_LOGPROBS})
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({**CHAT, "logprobs": True, "top_logprobs": MAX_LOGPROBS + 1})
    assert info.value.errors()[0]["loc"] == ("top_logprobs",)


@pytest.mark.parametrize("body", [CHAT, COMPLETION])
def test_the_limits_themselves_are_accepted(body: dict[str, Any]) -> None:
    model = ChatCompletionRequest if body is CHAT else CompletionRequest
    request = model.model_validate({
        **body, "stop": ["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS,
        "stop_token_ids": list(range(MAX_STOP_TOKEN_IDS)), "max_tokens": MAX_TOKENS_LIMIT,
    })
    assert request.stop == ["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS
