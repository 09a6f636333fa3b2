"""How one request wants its tokens chosen and when it wants to stop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_LOGPROBS = 20
GREEDY_BELOW = 1e-5
"""Temperatures this small sample greedily: dividing logits by them would overflow float32."""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request sampling settings; every field is checked when the object is made."""

    max_tokens: int = 16
    """Most tokens to generate (finish reason "length" when reached)."""
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
    """Strings that end generation; the text is cut before the first one found."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation, besides the model's own end tokens."""
    ignore_eos: bool = False
    """Keep generating past the model's end tokens (stop_token_ids still apply)."""
    logprobs: int | None = None
    """Return the chosen token's log-probability and this many top alternatives (0..20)."""
    include_stop_str_in_output: bool = False
    """Keep the stop string that ended generation at the end of the text."""

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        _check_int("top_k", self.top_k, low=0)
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Sequence):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        for token in self.stop_token_ids:
            _check_int("stop_token_ids entry", token, low=0)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _stop_strings(stop: object) -> tuple[str, ...]:
    """Stop may be one string or a list of them; anything else is refused by name."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}: {stop!r}")
    for s in stop:
        if not isinstance(s, str):
            raise ValueError(f"stop must hold only strings, got {type(s).__name__}: {s!r}")
        if not s:
            raise ValueError("stop strings must not be empty")
    return tuple(stop)


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_number(
    name: str, value: object, *, low: float, high: float | None = None, low_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        upper = f"{high}]" if high is not None else "inf)"
        interval = f"{'(' if low_open else '['}{low}, {upper}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
