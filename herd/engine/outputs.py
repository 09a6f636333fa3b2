"""What the engine reports for a request after a step: cumulative and new tokens and text."""

from __future__ import annotations

from dataclasses import dataclass

from herd.engine.sampler import TokenLogprobs


@dataclass(frozen=True)
class RequestOutput:
    """One request's state after a step. token_ids/text are everything so far; delta_* what is new."""

    request_id: str
    tenant_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error" once finished
    logprobs: list[TokenLogprobs] | None
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    error: str | None = None  # "CODE: message" when finish_reason is "error" (CODE a gRPC status name)
