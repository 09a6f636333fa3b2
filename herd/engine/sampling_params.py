"""How one request wants its tokens chosen and when it wants to stop.

The limits below are the ones every door (HTTP, gRPC) and every library caller meets: the engine is shared,
so what one request may ask of each step is bounded here, where the engine checks it, and the gateway
checks the same constants before any work is done for the request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from herd.engine.errors import SamplingError as SamplingError  # re-exported: the doors import it from here
from herd.engine.structured_output import StructuredOutput

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
MAX_LOGIT_BIAS_ENTRIES = 300
"""Token ids one request may bias (OpenAI's logit_bias takes a map; a step adds each entry to its row)."""
LOGIT_BIAS_LIMIT = 100.0
"""A bias is in [-100, 100] (OpenAI's range: -100 bans a token in effect, +100 all but forces it)."""
MAX_BAD_WORDS = 64
"""Words one request may ban (each becomes one or two token sequences the sampler checks every step)."""
MAX_BAD_WORD_CHARS = 256
"""Characters per banned word."""
PENALTY_LIMIT = 2.0
"""presence_penalty and frequency_penalty are in [-2, 2] (OpenAI's range)."""
MAX_N = 16
"""Most choices (n, and best_of candidates) one request may ask for; they share the prompt's KV blocks but each
holds its own sequence slot and output blocks."""
GREEDY_BELOW = 1e-5
"""Temperatures this small sample greedily: dividing logits by them would overflow float32."""


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
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated (OpenAI's), in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it has been generated (OpenAI's), in [-2, 2]."""
    repetition_penalty: float = 1.0
    """Divides the positive logits (multiplies the negative) of tokens in the prompt or generated so far (as
    transformers and vLLM do); 1 is off, > 0."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias in [-100, 100]) added to that token's logit at every step, at most MAX_LOGIT_BIAS_ENTRIES;
    a mapping is taken too. Ids are checked against the vocabulary when the engine takes the request."""
    min_tokens: int = 0
    """Tokens generated before an end token or stop_token_ids may end the request (they are masked until then);
    at most max_tokens. Stop strings still apply."""
    bad_words: tuple[str, ...] = ()
    """Words never generated (at most MAX_BAD_WORDS of MAX_BAD_WORD_CHARS): each is tokenized as it stands and
    after a space, and a token that would complete one of those token sequences is masked."""
    structured: StructuredOutput | None = None
    """Constrain the output to a JSON schema, any JSON object, a regex, a grammar or a choice
    (herd.engine.structured_output); compiled when the engine takes the request, refused there if it does not
    compile. The request finishes ("stop") once the constraint is complete."""
    prompt_logprobs: int | None = None
    """Return each prompt token's log-probability given the tokens before it, and this many top alternatives
    (0..MAX_LOGPROBS); computed in the prefill, so such a request takes no prefix-cache hit for its prompt."""
    n: int = 1
    """Choices to return, 1..MAX_N: completions of the one prompt, sampled apart (a seeded request's choice i
    draws from a seed derived from (seed, i); choice 0 from seed itself)."""
    best_of: int | None = None
    """Candidates to generate, n..MAX_N, of which the n with the highest cumulative log-probability of their
    tokens are returned (nothing is streamed until all are done); None: n."""
    speculative: bool = True
    """Let the engine speculate for this request where it is configured to (EngineConfig.speculative); False
    decodes one token per step. The tokens are the same either way."""
    output_offset: int = 0
    """Output tokens the request produced before, elsewhere (a continuation whose prompt ends with them): its
    seeded draws are keyed by output position output_offset + n, as the undisturbed request's were."""

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
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, low=0, high=MAX_LOGPROBS)
        object.__setattr__(self, "stop", checked_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", checked_stop_token_ids(self.stop_token_ids))
        _check_number("presence_penalty", self.presence_penalty, low=-PENALTY_LIMIT, high=PENALTY_LIMIT)
        _check_number("frequency_penalty", self.frequency_penalty, low=-PENALTY_LIMIT, high=PENALTY_LIMIT)
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        object.__setattr__(self, "logit_bias", checked_logit_bias(self.logit_bias))
        _check_int("min_tokens", self.min_tokens, low=0, high=self.max_tokens)
        _check_int("output_offset", self.output_offset, low=0)
        object.__setattr__(self, "bad_words", checked_bad_words(self.bad_words))
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise SamplingError("structured", f"structured must be a StructuredOutput, got {self.structured!r:.80}")
        _check_int("n", self.n, low=1, high=MAX_N)
        if self.best_of is not None:
            _check_int("best_of", self.best_of, low=self.n, high=MAX_N)
        if not isinstance(self.speculative, bool):
            raise SamplingError("speculative", f"speculative must be true or false, got {self.speculative!r}")

    @property
    def num_candidates(self) -> int:
        """Sequences the request runs: best_of, or n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def ranks_candidates(self) -> bool:
        """More candidates than choices: each one's cumulative log-probability decides which are returned."""
        return self.num_candidates > self.n

    @property
    def penalised(self) -> bool:
        """Whether the step's logits of this request depend on its tokens so far (penalties, min_tokens)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or self.min_tokens > 0 or bool(self.bad_words))

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


def checked_bad_words(words: object) -> tuple[str, ...]:
    """A sequence of non-empty words within the limits; the count is checked before any word is looked at."""
    if isinstance(words, (str, bytes)) or not isinstance(words, Sequence):
        raise SamplingError("bad_words", f"bad_words must be a list of strings, got {words!r}")
    if len(words) > MAX_BAD_WORDS:
        raise SamplingError("bad_words", f"at most {MAX_BAD_WORDS} bad_words, got {len(words)}")
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise SamplingError("bad_words", f"bad_words must be non-empty strings, got {word!r}")
        if len(word) > MAX_BAD_WORD_CHARS:
            raise SamplingError("bad_words", f"bad_words may be at most {MAX_BAD_WORD_CHARS} characters, got one "
                                             f"of {len(word)}")
    return tuple(words)


def checked_logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
    """A {token id: bias} mapping or (id, bias) pairs, within the limits, as sorted pairs; the count is checked
    before any entry is looked at. JSON object keys arrive as strings of digits, and are taken as such."""
    if isinstance(bias, Mapping):
        bias = tuple(bias.items())
    if isinstance(bias, (str, bytes)) or not isinstance(bias, Sequence):
        raise SamplingError("logit_bias", f"logit_bias must map token ids to biases, got {bias!r}")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise SamplingError("logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} logit_bias entries, got {len(bias)}")
    out: dict[int, float] = {}
    for entry in bias:
        if not isinstance(entry, Sequence) or isinstance(entry, (str, bytes)) or len(entry) != 2:
            raise SamplingError("logit_bias", f"logit_bias entries are (token id, bias), got {entry!r}")
        token, value = entry
        if isinstance(token, str) and token.isascii() and token.isdigit():
            token = int(token)
        _check_int("logit_bias", token, low=0, shown="logit_bias token id")
        _check_number("logit_bias", value, low=-LOGIT_BIAS_LIMIT, high=LOGIT_BIAS_LIMIT)
        out[token] = float(value)
    return tuple(sorted(out.items()))


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
