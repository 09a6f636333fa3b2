"""What a request constrains its output to: a JSON schema, any JSON object, a regular expression, a grammar or
a choice of strings. Only the request's words, checked for shape and size here; compiling them against the
tokenizer is herd.engine.grammar's, when the engine takes the request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from herd.engine.errors import SamplingError

Kind = Literal["json_schema", "json_object", "regex", "grammar", "choice"]
KINDS: tuple[Kind, ...] = get_args(Kind)
MAX_STRUCTURED_CHARS = 100_000
"""Characters of a schema (as JSON text), regex or grammar; a request's constraint is compiled once per distinct
text and kept in the engine's cache, so its size bounds the memory one request can make the engine hold."""
MAX_CHOICES = 256
"""Strings a choice may list."""


@dataclass(frozen=True)
class StructuredOutput:
    """kind and its text: a JSON schema as JSON text (json_schema), "" (json_object: any JSON object), a regex
    (matched whole), a grammar in Lark or GBNF syntax (llguidance's), or a JSON list of strings (choice).
    `field` is the request field that carried it, named in errors."""

    kind: Kind
    spec: str
    field: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SamplingError(self.field, f"{self.field} kind must be one of {list(KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise SamplingError(self.field, f"{self.field} {self.kind} must be text, got {type(self.spec).__name__}")
        if len(self.spec) > MAX_STRUCTURED_CHARS:
            raise SamplingError(self.field, f"{self.field} {self.kind} may be at most {MAX_STRUCTURED_CHARS} "
                                            f"characters, got {len(self.spec)}")
        if self.kind == "json_schema":
            schema = _json(self.spec, self.field, "json_schema")
            if not isinstance(schema, (dict, bool)):
                raise SamplingError(self.field, f"{self.field} json_schema must be a JSON object, got "
                                                f"{type(schema).__name__}")
        elif self.kind == "json_object" and self.spec:
            raise SamplingError(self.field, f"{self.field} json_object takes no schema")
        elif self.kind in ("regex", "grammar") and not self.spec.strip():
            raise SamplingError(self.field, f"{self.field} {self.kind} must not be empty")
        elif self.kind == "choice":
            choices = _json(self.spec, self.field, "choice")
            if (not isinstance(choices, list) or not choices or len(choices) > MAX_CHOICES
                    or not all(isinstance(c, str) and c for c in choices)):
                raise SamplingError(self.field, f"{self.field} choice must list 1..{MAX_CHOICES} non-empty strings")

    @classmethod
    def json_schema(cls, schema: Mapping[str, object] | bool, *, field: str = "response_format") -> StructuredOutput:
        return cls("json_schema", _dumps(schema, field), field)

    @classmethod
    def choice(cls, choices: Sequence[str], *, field: str = "structured_outputs") -> StructuredOutput:
        return cls("choice", _dumps(list(choices), field), field)


def _json(text: str, field: str, what: str) -> object:
    try:
        return json.loads(text)
    except ValueError as err:
        raise SamplingError(field, f"{field} {what} is not valid JSON: {err}") from None


def _dumps(value: object, field: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise SamplingError(field, f"{field} is not JSON: {err}") from None
