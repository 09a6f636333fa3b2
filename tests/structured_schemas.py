"""The JSON schemas, regexes and grammar the structured-output tests hold Herd's outputs to, at every layer
(engine, HTTP with the openai client, gRPC). Strings and numbers are bounded (maxLength, patterns, ranges) so a
random-weight model's outputs complete within a test's max_tokens; the constraint, not luck, makes them valid."""

from __future__ import annotations

import ast
import re
from typing import Any

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 8},
                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                "required": ["name", "age"], "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"], "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]},
                                "minItems": 2, "maxItems": 4}},
        "required": ["tags"], "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                       "n": {"type": "integer", "exclusiveMinimum": 3, "maximum": 40}},
        "required": ["x", "n"], "additionalProperties": False,
    },
    "any_of": {
        "anyOf": [
            {"type": "object", "properties": {"kind": {"const": "a"}, "v": {"type": "integer", "minimum": 0,
                                                                              "maximum": 9}},
             "required": ["kind", "v"], "additionalProperties": False},
            {"type": "object", "properties": {"kind": {"const": "b"},
                                              "w": {"type": "string", "pattern": "^[a-z]{1,5}$"}},
             "required": ["kind", "w"], "additionalProperties": False},
        ],
    },
    "optional_and_pattern": {
        "type": "object",
        "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                       "note": {"type": "string", "maxLength": 6},
                       "level": {"enum": ["low", "mid", "high", 3, None]}},
        "required": ["id"], "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {"type": "object", "properties": {"k": {"type": "string", "enum": ["x", "y"]},
                                                   "v": {"type": "number", "minimum": 0, "maximum": 1}},
                  "required": ["k", "v"], "additionalProperties": False},
        "minItems": 1, "maxItems": 3,
    },
}

REGEXES = [
    r"[a-z]{3,6}@[a-z]{2,5}\.(com|org)",
    r"\d{4}-\d{2}-\d{2}",
    r"(yes|no)( because [a-z ]{1,12})?",
]

GRAMMAR = r"""
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""
"""A Lark grammar: sums and differences of small numbers, parenthesised at most as the generator goes."""


def in_grammar(text: str) -> bool:
    """Whether text is a sentence of GRAMMAR: a Python expression (once leading zeros are dropped) made only of
    numbers of up to 3 digits, binary + and -, and parentheses, with no spaces."""
    if not re.fullmatch(r"[0-9()+\-]+", text) or any(len(n) > 3 for n in re.findall(r"[0-9]+", text)):
        return False
    try:
        tree = ast.parse(re.sub(r"\b0+([0-9])", r"\1", text), mode="eval")
    except SyntaxError:
        return False
    allowed = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Constant)
    return all(isinstance(node, allowed) for node in ast.walk(tree))
