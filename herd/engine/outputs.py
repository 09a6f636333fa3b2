"""What the engine reports for a request after a step: cumulative and new tokens and text."""

from __future__ import annotations

from dataclasses import dataclass

from herd.engine.errors import HerdError
from herd.engine.sampler import TokenLogprobs


@dataclass(frozen=True)
class RequestTimes:
    """When a request arrived, was first scheduled, got its first token and finished (ns since the epoch;
    0 for what never happened: an abort while waiting has no first token)."""

    arrived_ns: int
    scheduled_ns: int
    first_token_ns: int
    finished_ns: int


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
    error: HerdError | None = None  # why, when finish_reason is "error"
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """When asked: one per prompt token, the first None (nothing precedes it); on every output from the first
    that carries a token (the same list each time)."""
    times: RequestTimes | None = None  # on the finished output only
    index: int = 0  # which choice of the request (n > 1); each choice has its own outputs and finishes apart
    cumulative_logprob: float | None = None  # sum of the tokens' logprobs, when logprobs or best_of asked for them
    draft_tokens: int = 0
    """Speculative decoding so far: draft tokens verified, those the model agreed with, and the steps that verified
    any (acceptance length = 1 + accepted_tokens / verify_steps: tokens made per verifying step)."""
    accepted_tokens: int = 0
    verify_steps: int = 0
