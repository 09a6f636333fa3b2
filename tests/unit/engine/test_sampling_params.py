"""herd.engine.sampling_params: defaults, every validation path, normalisation of stop lists, greedy."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import pytest

from herd.engine.sampling_params import (
    MAX_LOGPROBS,
    MAX_SEED,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKENS_LIMIT,
    SamplingError,
    SamplingParams,
)


def test_defaults() -> None:
    params = SamplingParams()
    assert params.max_tokens == 16
    assert params.temperature == 1.0
    assert params.top_p == 1.0
    assert params.top_k == 0
    assert params.min_p == 0.0
    assert params.seed is None
    assert params.stop == ()
    assert params.stop_token_ids == ()
    assert params.ignore_eos is False
    assert params.logprobs is None
    assert params.include_stop_str_in_output is False
    assert params.greedy is False


def test_is_frozen_and_keyword_only() -> None:
    params = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.max_tokens = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        SamplingParams(3)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field", "shown"),
    [
        ({"max_tokens": 0}, "max_tokens", "0"),
        ({"max_tokens": -5}, "max_tokens", "-5"),
        ({"max_tokens": 1.5}, "max_tokens", "1.5"),
        ({"max_tokens": "8"}, "max_tokens", "'8'"),
        ({"max_tokens": True}, "max_tokens", "True"),
        ({"temperature": -0.1}, "temperature", "-0.1"),
        ({"temperature": math.nan}, "temperature", "nan"),
        ({"temperature": "1"}, "temperature", "'1'"),
        ({"temperature": True}, "temperature", "True"),
        ({"top_p": 0}, "top_p", "0"),
        ({"top_p": 0.0}, "top_p", "0.0"),
        ({"top_p": 1.5}, "top_p", "1.5"),
        ({"top_p": -0.2}, "top_p", "-0.2"),
        ({"top_p": math.nan}, "top_p", "nan"),
        ({"top_k": -1}, "top_k", "-1"),
        ({"top_k": 2.0}, "top_k", "2.0"),
        ({"min_p": -0.01}, "min_p", "-0.01"),
        ({"min_p": 1.01}, "min_p", "1.01"),
        ({"min_p": math.nan}, "min_p", "nan"),
        ({"logprobs": -1}, "logprobs", "-1"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs", str(MAX_LOGPROBS + 1)),
        ({"logprobs": 2.0}, "logprobs", "2.0"),
        ({"seed": -1}, "seed", "-1"),
        ({"seed": 1.0}, "seed", "1.0"),
        ({"stop": 5}, "stop", "5"),
        ({"stop": {"a"}}, "stop", "{'a'}"),
        ({"stop": [1]}, "stop", "1"),
        ({"stop": ["ok", None]}, "stop", "None"),
        ({"stop": b"x"}, "stop", "b'x'"),
        ({"stop_token_ids": "12"}, "stop_token_ids", "'12'"),
        ({"stop_token_ids": 7}, "stop_token_ids", "7"),
        ({"stop_token_ids": [-1]}, "stop_token_ids", "-1"),
        ({"stop_token_ids": [3, "4"]}, "stop_token_ids", "'4'"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids", "1.0"),
        ({"stop_token_ids": [True]}, "stop_token_ids", "True"),
    ],
)
def test_invalid_value_raises_naming_field_and_value(kwargs: dict[str, object], field: str, shown: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert field in message
    assert shown in message


@pytest.mark.parametrize("stop", ["", ["ok", ""]])
def test_empty_stop_string_raises(stop: object) -> None:
    with pytest.raises(ValueError, match=r"stop.*empty"):
        SamplingParams(stop=stop)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 1},
        {"temperature": 0},
        {"temperature": 0.0},
        {"temperature": 5},
        {"top_p": 1.0},
        {"top_p": 1},
        {"top_p": 1e-6},
        {"top_k": 0},
        {"top_k": 50},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"logprobs": 0},
        {"logprobs": MAX_LOGPROBS},
        {"seed": 0},
        {"seed": 2**40},
        {"stop_token_ids": [0, 200007]},
        {"max_tokens": MAX_TOKENS_LIMIT},
        {"seed": MAX_SEED},
        {"stop": ("s",) * MAX_STOP_STRINGS},
        {"stop": ("s" * MAX_STOP_STRING_CHARS,)},
        {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS))},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict[str, object]) -> None:
    params = SamplingParams(**kwargs)  # type: ignore[arg-type]
    for name, value in kwargs.items():
        got = getattr(params, name)
        assert got == (tuple(value) if isinstance(value, list) else value)


def test_single_stop_string_becomes_one_tuple() -> None:
    assert SamplingParams(stop="###").stop == ("###",)


def test_stop_list_becomes_tuple_in_order() -> None:
    assert SamplingParams(stop=["b", "a"]).stop == ("b", "a")  # type: ignore[arg-type]
    assert SamplingParams(stop=("x",)).stop == ("x",)


def test_stop_none_means_no_stop_strings() -> None:
    assert SamplingParams(stop=None).stop == ()  # type: ignore[arg-type]


def test_stop_token_ids_become_tuple() -> None:
    params = SamplingParams(stop_token_ids=[5, 9])  # type: ignore[arg-type]
    assert params.stop_token_ids == (5, 9)
    assert isinstance(params.stop_token_ids, tuple)


@pytest.mark.parametrize(
    ("temperature", "greedy"), [(0, True), (0.0, True), (1e-6, True), (1e-5, False), (0.7, False), (2, False)]
)
def test_greedy_below_a_temperature_of_1e5(temperature: float, greedy: bool) -> None:
    assert SamplingParams(temperature=temperature).greedy is greedy


def test_greedy_ignores_other_settings() -> None:
    assert SamplingParams(temperature=0.0, top_k=5, top_p=0.5, seed=3).greedy is True
    assert SamplingParams(temperature=1.0, top_k=1).greedy is False


# -- limits: what one request may ask of an engine it shares with everyone -------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop", f"at most {MAX_STOP_STRINGS} stop strings, got 5"),
        ({"stop": [str(i) for i in range(10_000)]}, "stop", "got 10000"),
        ({"stop": ["ok", "x" * (MAX_STOP_STRING_CHARS + 1)]}, "stop",
         f"at most {MAX_STOP_STRING_CHARS} characters, got one of {MAX_STOP_STRING_CHARS + 1}"),
        ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids",
         f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {MAX_STOP_TOKEN_IDS + 1}"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs", f"logprobs must be in 0..{MAX_LOGPROBS}, got 21"),
        ({"max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens", f"max_tokens must be in 1..{MAX_TOKENS_LIMIT}"),
        ({"seed": MAX_SEED + 1}, "seed", f"seed must be in 0..{MAX_SEED}"),
        ({"top_k": -1}, "top_k", "top_k must be >= 0"),
        ({"stop_token_ids": [3, -4]}, "stop_token_ids", "-4"),
    ],
)
def test_limits_are_refused_naming_the_field(kwargs: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(SamplingError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    assert message in str(info.value)


def test_a_count_over_the_limit_is_refused_before_the_items_are_looked_at() -> None:
    """Millions of stop strings cost one len(), not a pass over each (the gRPC door hands them over as they are)."""

    class Huge(tuple[str, ...]):
        def __iter__(self):  # type: ignore[no-untyped-def]
            raise AssertionError("items were read")

    with pytest.raises(SamplingError, match="got 4000000"):
        SamplingParams(stop=Huge(("a",) * 4_000_000))


class Repeated(Sequence[str]):
    """Like a protobuf repeated field: a sequence, but neither a list nor a tuple."""

    def __init__(self, items: list[str]) -> None:
        self._items = items

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)


def test_any_sequence_of_strings_is_taken_as_stop_strings() -> None:
    assert SamplingParams(stop=Repeated(["a", "b"])).stop == ("a", "b")  # type: ignore[arg-type]
