"""The text side of a step: detokenising, stop strings and RequestOutputs, apart from the engine core.

The core (LLMEngine.core_step) samples tokens and decides every finish the next batch depends on (stop
token ids, max_tokens, the context limit, aborts, errors); it hands each step's news as one CoreOutput per
request. The processor turns them into what callers read: text released a whole character at a time,
stop strings found in it, and RequestOutputs. It reads nothing of the core's Sequences, so it may run on
another thread while the core computes the next step (herd.engine.step_pipeline).

A stop string ends a request here, not in the core: the processor reports it finished at once, with its
tokens and text cut at the stop, and lists it in `stopped` for the core to free. When the core has run
on in the meantime, the tokens it made after the stop are never reported (one step of wasted compute,
never a wrong output).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from herd.engine.detokenizer import IncrementalDetokenizer
from herd.engine.errors import HerdError
from herd.engine.outputs import RequestOutput, RequestTimes
from herd.engine.request_group import Candidates
from herd.engine.sampler import TokenLogprobs
from herd.engine.stop_strings import StopStrings


@dataclass(slots=True)
class CoreOutput:
    """What one core step did to one request: its new tokens, and how it ended if it did. Not changed once made
    (not frozen only because a frozen dataclass costs 4x to build, and the core makes one per row per step)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None  # "stop" (a stop token), "length", "abort", "error"; None: running
    error: HerdError | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """The prompt's scores (herd.engine.prompt_logprobs), on the request's first output with a token."""
    num_cached_tokens: int = 0
    cumulative_logprob: float | None = None
    scheduled_ns: int = 0
    first_token_ns: int = 0
    finished_ns: int = 0
    draft_tokens: int = 0  # speculative decoding, so far (RequestOutput's)
    accepted_tokens: int = 0
    verify_steps: int = 0


@dataclass(eq=False)
class RequestState:
    """The processor's side of a request: its tokens and text so far and what has been reported."""

    request_id: str
    tenant_id: str
    prompt_token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    stops: StopStrings
    include_stop_str: bool
    arrived_ns: int
    logprobs: list[TokenLogprobs] | None
    token_ids: list[int] = field(default_factory=list)
    reported_tokens: int = 0
    reported_chars: int = 0
    text_end: int | None = None  # where a stop string cut the text
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # once the core delivered them
    public_id: str = ""
    """The request's id as its caller knows it, when request_id is one of its candidates' (n > 1)."""
    index: int = 0
    """Which choice (candidate) of the request this is."""
    candidates: Candidates | None = None
    """best_of's pick, shared by the request's candidates: their outputs are held for it (None: reported as made)."""


@dataclass
class ProcessedStep:
    outputs: list[RequestOutput]
    stopped: list[str]
    """Requests a stop string finished: the core must finish them too (reason "stop") and free their blocks."""


class OutputProcessor:
    """Request states by id. `add` may be called from any thread; `process` from one thread at a time."""

    def __init__(self) -> None:
        self._states: dict[str, RequestState] = {}
        self._lock = threading.Lock()

    def add(self, state: RequestState) -> None:
        with self._lock:
            if state.request_id in self._states:
                raise ValueError(f"request id {state.request_id!r} is already in use")
            self._states[state.request_id] = state

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def process(self, step: list[CoreOutput]) -> ProcessedStep:
        """One core step's outputs -> a RequestOutput for every request still reported, in order."""
        done = ProcessedStep([], [])
        with self._lock:  # once per step, not per row
            states = [self._states.get(core.request_id) for core in step]
        for core, state in zip(step, states, strict=True):
            if state is None:  # finished by a stop string while the core ran on
                continue
            reason = core.finish_reason
            if core.prompt_logprobs is not None:
                state.prompt_logprobs = core.prompt_logprobs
            if len(core.new_token_ids) > 1 and state.stops.stops:  # several tokens (speculative decoding)
                if self._push_until_stop_string(state, core, reason):
                    if reason is None:
                        done.stopped.append(core.request_id)
                    reason = "stop"
            elif core.new_token_ids:
                state.token_ids += core.new_token_ids
                if state.logprobs is not None and core.new_logprobs is not None:
                    state.logprobs += core.new_logprobs
                state.detokenizer.push(state.token_ids)
                if reason != "stop" and state.stops.stops and self._cut_at_stop_string(state):
                    if reason is None:
                        done.stopped.append(core.request_id)
                    reason = "stop"
            out = self._report(state, core, reason)
            if state.candidates is None:
                done.outputs.append(out)
            elif out.finished:
                done.outputs += state.candidates.add(out)
        return done

    def _push_until_stop_string(self, state: RequestState, core: CoreOutput, reason: str | None) -> bool:
        """Take a step's tokens one at a time, up to the one that completes a stop string (the rest are dropped, as
        a step of one token each would never have made them); whether one did. A last token that is itself the
        core's stop (reason "stop") is not searched, as a lone one is not."""
        tokens, logprobs = core.new_token_ids, core.new_logprobs
        for i, token in enumerate(tokens):
            state.token_ids.append(token)
            if state.logprobs is not None and logprobs is not None:
                state.logprobs.append(logprobs[i])
            state.detokenizer.push(state.token_ids)
            if (i < len(tokens) - 1 or reason != "stop") and self._cut_at_stop_string(state):
                return True
        return False

    def _cut_at_stop_string(self, state: RequestState) -> bool:
        hit = state.stops.find(state.detokenizer.text)  # only the new text and the tail before it
        if hit is None:
            return False
        index, stop = hit
        state.text_end = index + len(stop) if state.include_stop_str else index
        return True

    def _report(self, state: RequestState, core: CoreOutput, reason: str | None) -> RequestOutput:
        finished = reason is not None
        if finished and state.text_end is None:
            state.detokenizer.flush(state.token_ids)
        text = state.detokenizer.text
        if state.text_end is not None:
            text = text[: state.text_end]
        elif not finished and state.stops.stops:
            # Hold back what could still become a stop string, so streamed text is never taken back.
            text = text[: max(state.reported_chars, state.stops.releasable(text))]
        out = RequestOutput(
            request_id=state.public_id or state.request_id,
            index=state.index,
            cumulative_logprob=core.cumulative_logprob,
            draft_tokens=core.draft_tokens, accepted_tokens=core.accepted_tokens, verify_steps=core.verify_steps,
            tenant_id=state.tenant_id,
            prompt_token_ids=state.prompt_token_ids,
            token_ids=list(state.token_ids),
            text=text,
            delta_token_ids=state.token_ids[state.reported_tokens :],
            delta_text=text[state.reported_chars :],
            finished=finished,
            finish_reason=reason,
            logprobs=list(state.logprobs) if state.logprobs is not None else None,
            prompt_logprobs=state.prompt_logprobs,
            num_cached_tokens=core.num_cached_tokens,
            error=core.error,
            times=RequestTimes(state.arrived_ns, core.scheduled_ns, core.first_token_ns,
                               core.finished_ns or time.time_ns()) if finished else None,
        )
        state.reported_tokens, state.reported_chars = len(state.token_ids), len(text)
        if finished:
            with self._lock:
                del self._states[state.request_id]
        return out
