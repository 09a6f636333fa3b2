"""Structured outputs compiled against the tokenizer, with llguidance: one compiler per engine, one Grammar per
request.

Why llguidance (not xgrammar): it has no dependencies (xgrammar brings triton, transformers and a TVM runtime
into the serving image), it takes JSON schema, regexes and Lark/GBNF grammars natively, it builds a grammar in
about a millisecond with no per-schema precompilation (an Earley parser over a lazily built lexer), and it
fills a batch's token masks in parallel in Rust with the GIL released, about 10 microseconds a row for the
tiny vocabulary here (herd.engine.grammar_mask).

Compiled grammars are cached per (kind, text) and tokenizer (one compiler per engine): a request takes a copy of
the cached matcher, so a schema that many requests send is compiled once. Compilation is bounded twice:
llguidance's fuel limits (deterministic work bounds on the lexer and grammar size) and a wall-clock limit,
past which the request is refused (the compilation finishes in the background and is cached for next time).
JSON is generated compact (no whitespace between tokens), as OpenAI's structured outputs are. A regex is matched
whole, in Rust's regex syntax with \\d and \\w meaning ASCII digits and word characters (as JSON Schema patterns
and JavaScript have them); a grammar is Lark (llguidance's dialect) or GBNF.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import llguidance

from herd.engine.errors import SamplingError
from herd.engine.structured_output import StructuredOutput
from herd.model.tokenizer import Tokenizer


class Grammar:
    """One request's place in its constraint: which tokens may come next, and whether it is complete."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def copy(self) -> Grammar:
        """Another request's Grammar at the same place (a choice of an n > 1 request)."""
        return Grammar(self.matcher.deep_copy())

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False if the constraint does not allow it (the matcher then stays in
        its error state)."""
        return bool(self.matcher.consume_token(token))

    @property
    def complete(self) -> bool:
        """Nothing more may follow (only an end token would)."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        return str(self.matcher.get_error())


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer; safe from any thread."""

    def __init__(self, tokenizer: Tokenizer, *, cache_size: int = 256, timeout_s: float = 5.0) -> None:
        self._tokenizer = tokenizer
        self._llg: llguidance.LLTokenizer | None = None  # built on first use (about a second for a real vocabulary)
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="herd-grammar")

    @property
    def vocab_size(self) -> int:
        """Tokens the masks cover (the tokenizer's; a model's extra rows are never allowed)."""
        return int(self.llg_tokenizer().vocab_size)

    def llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._llg is None:
                self._llg = llguidance.LLTokenizer(self._tokenizer.backend_json(),
                                                   eos_token=sorted(self._tokenizer.stop_ids))
            return self._llg

    def cached(self, structured: StructuredOutput) -> bool:
        """Whether the constraint is compiled already (starting it then costs a copy)."""
        with self._lock:
            return (structured.kind, structured.spec) in self._cache

    def start(self, structured: StructuredOutput) -> Grammar:
        """A new request's Grammar; SamplingError naming the request's field if the constraint does not compile,
        uses what is not supported, or takes longer than the time limit to compile."""
        key = (structured.kind, structured.spec)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        if cached is None:
            future = self._pool.submit(self._compile, structured)
            try:
                cached = future.result(timeout=self._timeout_s)
            except FutureTimeout:
                raise SamplingError(structured.field, f"{structured.field} {structured.kind} took longer than "
                                                      f"{self._timeout_s:g} s to compile") from None
        return Grammar(cached.deep_copy())

    def _compile(self, structured: StructuredOutput) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.llg_tokenizer(), _grammar_text(structured), log_level=0)
        if matcher.is_error():
            raise SamplingError(structured.field, f"{structured.field} {structured.kind} does not compile: "
                                                  f"{_first_lines(matcher.get_error())}")
        with self._lock:
            self._cache[(structured.kind, structured.spec)] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher


def _grammar_text(structured: StructuredOutput) -> str:
    """llguidance's grammar for the constraint."""
    kind, spec = structured.kind, structured.spec
    if kind in ("json_schema", "json_object"):
        schema = spec if kind == "json_schema" else '{"type":"object"}'
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False}))
    if kind == "regex":  # \d and \w are ASCII, as in JSON Schema's patterns and JavaScript
        return str(llguidance.LLMatcher.grammar_from_lark(f"start: /{llguidance.regex_to_lark(spec, 'dw')}/"))
    if kind == "choice":
        return str(llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(choice) for choice in json.loads(spec))))
    try:
        return str(llguidance.grammar_from("grammar", spec))  # Lark, or GBNF converted to Lark
    except ValueError as err:
        raise SamplingError(structured.field, f"{structured.field} grammar does not parse: {err}") from None


def _first_lines(message: str, lines: int = 6) -> str:
    """The start of llguidance's message (it may quote a whole grammar)."""
    kept = message.strip().splitlines()[:lines]
    return "\n".join(kept)[:1000]
