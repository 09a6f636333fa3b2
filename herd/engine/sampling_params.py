"""How one request wants its tokens chosen and when it wants to stop.

The limits below are the ones every door (HTTP, gRPC) and every library caller meets: the engine is shared,
so what one request may ask of each step is bounded here, where the engine checks it, and the gateway
checks the same constants before any work is done for the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_STOP_STRINGS = 4
"""Stop strings per request (OpenAI's limit); each is searched for in the new text at every step."""
MAX_STOP_STRING_CHARS = 256
"""Characters per stop string; streamed text is held back by the longest one less one."""
MAX_STOP_TOKEN_IDS = 64
"""Stop token ids per request, besides the model's own end tokens."""
MAX_LOGPROBS = 20
"""Top alternatives per token that logprobs may ask for (OpenAI's top_logprobs limit)."""
MAX_TOKENS_LIMIT = 2**31 - 1
"""Largest max_tokens (the wire's int32); the model's context limit bounds a request further."""
MAX_SEED = 2**64 - 1
"""Largest seed (the wire's uint64, and the most a torch generator takes)."""
GREEDY_BELOW = 1e-5
"""Temperatures this small sample greedily: dividing logits by them would overflow float32."""


class SamplingError(ValueError):
    """A sampling setting that is refused; `field` names it (the doors report it as the bad parameter)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request sampling settings; every field is checked when the object is made (SamplingError)."""

    max_tokens: int = 16
    """Most tokens to generate (finish reason "length" when reached), 1..MAX_TOKENS_LIMIT."""
    temperature: float = 1.0
    """0 (or below 1e-5) means greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one, in [0, 1]."""
    seed: int | None = None
    """Seeds this request's own generator, so its samples repeat whatever else is in the batch."""
    stop: tuple[str, ...] = ()
    """Strings that end generation (at most MAX_STOP_STRINGS of MAX_STOP_STRING_CHARS); the text is cut
    before the first one found."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (at most MAX_STOP_TOKEN_IDS), besides the model's own end tokens."""
    ignore_eos: bool = False
    """Keep generating past the model's end tokens (stop_token_ids still apply)."""
    logprobs: int | None = None
    """Return the chosen token's log-probability and this many top alternatives (0..MAX_LOGPROBS)."""
    include_stop_str_in_output: bool = False
    """Keep the stop string that ended generation at the end of the text."""

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, low=1, high=MAX_TOKENS_LIMIT)
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        _check_int("top_k", self.top_k, low=0)
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=MAX_SEED)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        object.__setattr__(self, "stop", checked_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", checked_stop_token_ids(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def checked_stop(stop: object) -> tuple[str, ...]:
    """Stop may be one string or a sequence of them, within the limits; anything else is refused by name.
    The count is checked before any item is looked at."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if isinstance(stop, bytes) or not isinstance(stop, Sequence):
        raise SamplingError("stop", f"stop must be a string or a list of strings, got {type(stop).__name__}: "
                                    f"{stop!r}")
    if len(stop) > MAX_STOP_STRINGS:
        raise SamplingError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for s in stop:
        if not isinstance(s, str):
            raise SamplingError("stop", f"stop must hold only strings, got {type(s).__name__}: {s!r}")
        if not s:
            raise SamplingError("stop", "stop strings must not be empty")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise SamplingError("stop", f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters, got one "
                                        f"of {len(s)}")
    return tuple(stop)


def checked_stop_token_ids(ids: object) -> tuple[int, ...]:
    """A sequence of token ids within the limit; the count is checked before any item is looked at."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise SamplingError("stop_token_ids", f"stop_token_ids must be a list of token ids, got {ids!r}")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise SamplingError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(ids)}")
    for token in ids:
        _check_int("stop_token_ids", token, low=0, shown="stop_token_ids entry")
    return tuple(ids)


def _check_int(name: str, value: object, *, low: int, high: int | None = None, shown: str | None = None) -> None:
    shown = shown or name
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingError(name, f"{shown} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise SamplingError(name, f"{shown} must be {bound}, got {value}")


def _check_number(
    name: str, value: object, *, low: float, high: float | None = None, low_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise SamplingError(name, f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        upper = f"{high}]" if high is not None else "inf)"
        interval = f"{'(' if low_open else '['}{low}, {upper}"
        raise SamplingError(name, f"{name} must be in {interval}, got {value}")
