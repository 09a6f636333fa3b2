"""herd.platform.gateway.sampling_limits: the sampling limits both doors apply, before any work is done."""

from __future__ import annotations

import pytest

from herd.engine.errors import Code, HerdError
from herd.engine.sampling_params import (
    MAX_LOGPROBS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
)
from herd.platform.gateway.sampling_limits import DOOR_ONLY, check_sampling
from herd.protos.herd.v1 import inference_pb2 as pb


def refusal(options: pb.SamplingOptions) -> HerdError:
    with pytest.raises(HerdError) as info:
        check_sampling(options)
    assert info.value.code is Code.INVALID_ARGUMENT
    return info.value


def test_ten_thousand_stop_strings_from_the_grpc_door_are_refused() -> None:
    """The message as a gRPC client can send it: within the message size, far over the limit."""
    wire = pb.SamplingOptions(stop=[f"s{i}" for i in range(10_000)], max_tokens=8).SerializeToString()
    err = refusal(pb.SamplingOptions.FromString(wire))
    assert err.param == "stop"
    assert f"at most {MAX_STOP_STRINGS} stop strings, got 10000" in err.message


@pytest.mark.parametrize(
    ("options", "param", "message"),
    [
        (pb.SamplingOptions(stop=["a"] * (MAX_STOP_STRINGS + 1)), "stop", "at most 4 stop strings, got 5"),
        (pb.SamplingOptions(stop=["x" * (MAX_STOP_STRING_CHARS + 1)]), "stop",
         f"at most {MAX_STOP_STRING_CHARS} characters"),
        (pb.SamplingOptions(stop=["ok", ""]), "stop", "must not be empty"),
        (pb.SamplingOptions(stop_token_ids=range(MAX_STOP_TOKEN_IDS + 1)), "stop_token_ids",
         f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids"),
        (pb.SamplingOptions(stop_token_ids=[5, -1]), "stop_token_ids", "-1"),
        (pb.SamplingOptions(logprobs=MAX_LOGPROBS + 1), "logprobs", f"0..{MAX_LOGPROBS}"),
        (pb.SamplingOptions(logprobs=-1), "logprobs", "-1"),
        (pb.SamplingOptions(max_tokens=0), "max_tokens", "got 0"),
        (pb.SamplingOptions(max_tokens=-3), "max_tokens", "got -3"),
        (pb.SamplingOptions(temperature=-1.0), "temperature", "-1"),
        (pb.SamplingOptions(temperature=float("nan")), "temperature", "nan"),
        (pb.SamplingOptions(top_p=0.0), "top_p", "0.0"),
        (pb.SamplingOptions(top_k=-2), "top_k", "-2"),
        (pb.SamplingOptions(min_p=1.5), "min_p", "1.5"),
        (pb.SamplingOptions(presence_penalty=2.5), "presence_penalty", "2.5"),
        (pb.SamplingOptions(frequency_penalty=-3.0), "frequency_penalty", "-3"),
        (pb.SamplingOptions(repetition_penalty=0.0), "repetition_penalty", "0.0"),
        (pb.SamplingOptions(logit_bias={3: 150.0}), "logit_bias", "150"),
        (pb.SamplingOptions(logit_bias={-1: 1.0}), "logit_bias", "-1"),
        (pb.SamplingOptions(logit_bias={i: 1.0 for i in range(301)}), "logit_bias", "at most 300"),
        (pb.SamplingOptions(max_tokens=4, min_tokens=5), "min_tokens", "0..4"),
    ],
)
def test_each_limit_is_refused_naming_its_field(options: pb.SamplingOptions, param: str, message: str) -> None:
    err = refusal(options)
    assert err.param == param
    assert message in err.message


@pytest.mark.parametrize("options", [
    pb.SamplingOptions(),
    pb.SamplingOptions(stop=["a"] * MAX_STOP_STRINGS, stop_token_ids=range(MAX_STOP_TOKEN_IDS),
                       logprobs=MAX_LOGPROBS, max_tokens=2**31 - 1, seed=2**64 - 1, top_k=2**31 - 1,
                       temperature=0.0, top_p=1.0, min_p=1.0, ignore_eos=True),
    pb.SamplingOptions(stop=["x" * MAX_STOP_STRING_CHARS], temperature=0.7, top_p=0.9, logprobs=0),
])
def test_options_within_the_limits_pass(options: pb.SamplingOptions) -> None:
    check_sampling(options)


def test_every_wire_field_is_a_sampling_params_field() -> None:
    """The check builds the engine's own SamplingParams from the wire's fields, by name (but for the few the
    replica applies to the stream itself, such as echo)."""
    wire = {field.name for field in pb.SamplingOptions.DESCRIPTOR.fields}
    assert wire - DOOR_ONLY <= set(SamplingParams.__dataclass_fields__)
    assert wire >= DOOR_ONLY
    check_sampling(pb.SamplingOptions(echo=True, prompt_logprobs=3))
