"""Llama 4 tool calling at the text level: the functions offered, the calls made, and their pythonic text.

Invariant: a call is written the way Llama 4 writes it in pythonic mode, one bracketed list of keyword-only
calls with literal arguments, ``[get_weather(city="Oslo", days=3), get_time(tz="CET")]``, and
``parse_tool_calls(format_tool_calls(calls), names).calls == calls`` for any calls with JSON arguments.

Choices:

* Rendering writes the bare list, NOT wrapped in ``<|python_start|>``/``<|python_end|>``: that is what Meta's
  Llama 4 prompt-format examples and ``llama-models``' encoder produce. The parser accepts either.
* Argument values are JSON values written as Python literals (``"x"``, ``3``, ``True``, ``None``, lists and
  dicts). An argument whose name is not a Python identifier (``from``, ``max-tokens``) is written
  ``**{"from": "SFO"}``, which Python syntax allows and the parser reads back.
* Parsing never evaluates anything: the text goes through ``ast.parse`` and only literal nodes are read
  (plus ``true``/``false``/``null``, which models sometimes borrow from JSON). JSON calls
  ``{"name": ..., "parameters"|"arguments": {...}}`` (alone, in a list, or in a ```json fence) are read too.
* Prose before a call is kept as ``content`` and the call is still extracted (Llama 4 often says
  "Let me check." first). Anything after the call, an unknown function name, a positional or non-literal
  argument, or malformed text means no calls at all and the whole text is ``content``.
* Call ids are left to the gateway: Llama 4's format carries none, and results are matched by order.
"""

from __future__ import annotations

import ast
import json
import keyword
import math
import re
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from herd.model.special_tokens import PYTHON_END, PYTHON_START

_MAX_CANDIDATES = 32
"""How many possible call starts ``parse_tool_calls`` tries before it gives up and returns content."""


@dataclass(frozen=True, kw_only=True)
class FunctionTool:
    """A function the model may call, as an OpenAI ``tools`` entry describes it."""

    name: str
    """A Python identifier (not a keyword), so that a pythonic call to it parses."""
    description: str | None = None
    """What the function does, shown to the model."""
    parameters: Mapping[str, Any] | None = None
    """JSON schema of the arguments object, shown to the model verbatim."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier() or keyword.iskeyword(self.name):
            raise ValueError(f"tool name must be a Python identifier that is not a keyword, got {self.name!r:.80}")
        if self.description is not None and not isinstance(self.description, str):
            raise ValueError(f"tool {self.name!r} description must be a str, got {type(self.description).__name__}")
        if self.parameters is not None:
            if not isinstance(self.parameters, Mapping):
                raise ValueError(
                    f"tool {self.name!r} parameters must be a JSON schema object, got {self.parameters!r:.80}"
                )
            try:
                json.dumps(self.parameters, allow_nan=False)
            except (TypeError, ValueError) as error:
                raise ValueError(f"tool {self.name!r} parameters are not JSON: {error}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FunctionTool:
        """Read ``{"type": "function", "function": {...}}`` or a bare ``{"name", "description", "parameters"}``;
        other keys (``strict``) are ignored."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a tool must be a mapping, got {type(data).__name__}: {data!r:.80}")
        if "function" in data or "type" in data:
            if data.get("type") != "function":
                raise ValueError(f"tool type {data.get('type')!r} is not supported; expected 'function'")
            function = data.get("function")
            if not isinstance(function, Mapping):
                raise ValueError(f"a function tool needs a 'function' mapping, got {function!r:.80}")
            data = function
        if "name" not in data:
            raise ValueError(f"a tool function needs a 'name', got keys {sorted(data)}")
        return cls(name=data["name"], description=data.get("description"), parameters=data.get("parameters"))

    def to_json_dict(self) -> dict[str, Any]:
        """The bare definition shown to the model; parameters default to an empty object schema."""
        out: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            out["description"] = self.description
        out["parameters"] = (
            dict(self.parameters) if self.parameters is not None else {"type": "object", "properties": {}}
        )
        return out


@dataclass(frozen=True, kw_only=True)
class ToolOffer:
    """What one request lets the model call: the decision ``tools`` and ``tool_choice`` come down to."""

    functions: tuple[FunctionTool, ...]
    """Functions shown to the model; empty means no tool section at all."""
    call_required: bool
    """The model is told it must call (one of) them rather than answer in text."""

    @property
    def names(self) -> frozenset[str]:
        """Names to pass to ``parse_tool_calls`` for this request's output."""
        return frozenset(f.name for f in self.functions)


def offer_tools(tools: Sequence[FunctionTool | Mapping[str, Any]] | None, tool_choice: Any = "auto") -> ToolOffer:
    """Validate OpenAI ``tools`` and ``tool_choice`` and decide what is offered.

    ``tool_choice`` is ``"auto"`` (all, optional), ``"none"`` (nothing shown), ``"required"`` (all, must call)
    or ``{"type": "function", "function": {"name": ...}}`` (only that one, must call).

    Raises:
        ValueError: a malformed tool, a repeated name, or a tool_choice that is unknown or names no tool.
    """
    functions = _function_tools(tools)
    if tool_choice == "auto":
        return ToolOffer(functions=functions, call_required=False)
    if tool_choice == "none":
        return ToolOffer(functions=(), call_required=False)
    if tool_choice == "required":
        if not functions:
            raise ValueError("tool_choice 'required' needs at least one tool")
        return ToolOffer(functions=functions, call_required=True)
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        chosen = [f for f in functions if f.name == name]
        if not chosen:
            raise ValueError(
                f"tool_choice names function {name!r}, which is not among the tools {[f.name for f in functions]}"
            )
        return ToolOffer(functions=tuple(chosen), call_required=True)
    raise ValueError(
        f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': {{'name': ...}}}}, "
        f"got {tool_choice!r:.80}"
    )


def forced_call_schema(offer: ToolOffer, *, parallel: bool = True) -> dict[str, Any]:
    """The JSON schema a forced tool choice ("required" or a named function) holds the output to: a JSON list of
    calls ``[{"name": ..., "parameters": {...}}]``, each naming one of the offered functions with arguments that
    match its parameters' schema; one call at most unless ``parallel``. ``parse_tool_calls`` reads this form."""
    if not offer.functions:
        raise ValueError("a forced tool call needs at least one function")
    calls = [{"type": "object", "properties": {"name": {"const": f.name}, "parameters": f.to_json_dict()["parameters"]},
              "required": ["name", "parameters"], "additionalProperties": False} for f in offer.functions]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1})}


def _function_tools(tools: Sequence[FunctionTool | Mapping[str, Any]] | None) -> tuple[FunctionTool, ...]:
    if tools is None:
        return ()
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of function definitions, got {type(tools).__name__}")
    functions = tuple(t if isinstance(t, FunctionTool) else FunctionTool.from_dict(t) for t in tools)
    names = [f.name for f in functions]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"tool names must be unique, got {repeated} more than once")
    return functions


@dataclass(frozen=True, kw_only=True)
class ToolCall:
    """One call the model made (or made earlier in the conversation)."""

    name: str
    """The function's name."""
    arguments: dict[str, Any]
    """Keyword arguments as JSON values."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"tool call name must be a non-empty str, got {self.name!r:.80}")
        if not isinstance(self.arguments, dict) or not all(isinstance(k, str) for k in self.arguments):
            raise ValueError(f"tool call arguments must be a dict with str keys, got {self.arguments!r:.80}")

    @classmethod
    def from_openai(cls, data: Mapping[str, Any]) -> ToolCall:
        """Read ``{"id", "type": "function", "function": {"name", "arguments": "<json object>"}}``; the id is
        ignored and ``arguments`` may also be a mapping already."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a tool call must be a mapping, got {type(data).__name__}: {data!r:.80}")
        if data.get("type") != "function":
            raise ValueError(f"tool call type {data.get('type')!r} is not supported; expected 'function'")
        function = data.get("function")
        if not isinstance(function, Mapping) or "name" not in function or "arguments" not in function:
            raise ValueError(f"a tool call needs 'function' with 'name' and 'arguments', got {function!r:.80}")
        arguments = function["arguments"]
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments, parse_constant=_reject_constant)
            except ValueError as error:
                raise ValueError(f"tool call {function['name']!r} arguments are not JSON: {error}") from None
        if not isinstance(arguments, Mapping):
            raise ValueError(f"tool call {function['name']!r} arguments must be a JSON object, got {arguments!r:.80}")
        return cls(name=function["name"], arguments=dict(arguments))


@dataclass(frozen=True, kw_only=True)
class ToolCallParse:
    """What ``parse_tool_calls`` found in one assistant reply."""

    calls: list[ToolCall] = field(default_factory=list)
    """The calls, in order; empty when the reply is plain text."""
    content: str | None = None
    """Text outside the calls (the prose before them), ``None`` if there is none; the whole reply if no calls."""


def arguments_json(call: ToolCall) -> str:
    """The call's arguments as compact JSON, for OpenAI's ``function.arguments``."""
    return json.dumps(call.arguments, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def format_tool_calls(calls: Sequence[ToolCall]) -> str:
    """Write calls as Llama 4's pythonic list, e.g. ``[f(a=1, b="x"), g()]``.

    Raises:
        ValueError: no calls, a name that is not an identifier, or an argument that is not a JSON value.
    """
    if not calls:
        raise ValueError("cannot format an empty list of tool calls")
    return "[" + ", ".join(_format_call(c) for c in calls) + "]"


def _format_call(call: ToolCall) -> str:
    if not call.name.isidentifier() or keyword.iskeyword(call.name):
        raise ValueError(f"tool call name {call.name!r} is not a Python identifier, so it has no pythonic form")
    parts = []
    for name, value in call.arguments.items():
        if name.isidentifier() and not keyword.iskeyword(name):
            parts.append(f"{name}={_literal(value)}")
        else:
            parts.append(f"**{{{_literal(name)}: {_literal(value)}}}")
    return f"{call.name}({', '.join(parts)})"


def _literal(value: Any) -> str:
    """A JSON value as Python literal source."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are all valid Python escapes
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"tool call argument {value!r} is not a finite number")
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"tool call argument dict keys must be str, got {value!r:.80}")
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"tool call argument {value!r:.80} is not a JSON value ({type(value).__name__})")


def parse_tool_calls(text: str, tool_names: Collection[str]) -> ToolCallParse:
    """Find the tool calls at the end of a model reply; never raises.

    Accepts the pythonic list (optionally inside ``<|python_start|>``/``<|python_end|>``, or a ```python
    fence) and JSON calls (an object or a list of objects, optionally in a ```json fence). Only functions
    named in ``tool_names`` count. When nothing valid is found, ``calls`` is empty and ``content`` is ``text``.
    """
    names = frozenset(tool_names)
    if not isinstance(text, str) or not names:
        return ToolCallParse(calls=[], content=text)
    starts = _candidate_starts(text, names)
    # The whole reply being a call is the common case; after it, a call after prose is likeliest near the end.
    for start in (starts[:1] + starts[:0:-1])[:_MAX_CANDIDATES]:
        calls = _parse_block(text[start:], names)
        if calls:
            return ToolCallParse(calls=calls, content=text[:start].strip() or None)
    return ToolCallParse(calls=[], content=text)


_CANDIDATE = re.compile(r"<\|python_start\|>|```|\[\s*\{|\{\s*\"|\[\s*([^\W\d]\w*)\s*\(")
_FENCE = re.compile(r"```(?:json|python)?[ \t]*\n?(.*?)\n?[ \t]*```", re.DOTALL)


def _candidate_starts(text: str, names: frozenset[str]) -> list[int]:
    return [m.start() for m in _CANDIDATE.finditer(text) if m.group(1) is None or m.group(1) in names]


def _parse_block(block: str, names: frozenset[str]) -> list[ToolCall] | None:
    """Calls if ``block`` (a suffix of the reply) is exactly one call block, else ``None``."""
    body = block.strip()
    if body.startswith(PYTHON_START):
        body = body.removeprefix(PYTHON_START).strip()
        body = body.removesuffix(PYTHON_END).strip()
    if body.startswith("```"):
        fence = _FENCE.fullmatch(body)
        if fence is None:
            return None
        body = fence.group(1).strip()
    calls = None
    if body.startswith("["):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "\d" in a string argument is an invalid escape, not our problem
                calls = _pythonic_calls(ast.parse(body, mode="eval").body, names)
        except (SyntaxError, ValueError, RecursionError):
            return None
    if calls is None and body.startswith(("[", "{")):
        try:
            calls = _json_calls(json.loads(body, parse_constant=_reject_constant), names)
        except (ValueError, RecursionError):
            return None
    return calls


def _pythonic_calls(tree: ast.expr, names: frozenset[str]) -> list[ToolCall] | None:
    """Calls if ``tree`` is a non-empty list of known-function calls with literal keyword arguments.

    A list of anything else is ``None`` (it may still be JSON); a non-literal argument raises ``ValueError``.
    """
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.func.id not in names:
            return None
        if node.args:
            return None  # positional arguments have no names to map onto the schema
        arguments: dict[str, Any] = {}
        for kw in node.keywords:
            value = _literal_value(kw.value)
            if kw.arg is None and not isinstance(value, dict):
                return None  # ** of something that is not a dict
            for name, item in value.items() if kw.arg is None else [(kw.arg, value)]:
                if name in arguments:
                    return None
                arguments[name] = item
        calls.append(ToolCall(name=node.func.id, arguments=arguments))
    return calls


_JSON_NAMES = {"true": True, "false": False, "null": None}


def _literal_value(node: ast.expr) -> Any:
    """The JSON value a literal node denotes; ``ValueError`` for anything that is not a literal."""
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, bool | int | str) or (isinstance(value, float) and math.isfinite(value)):
            return value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = node.operand
        # A number, not a bool: -True is no JSON value.
        if (isinstance(operand, ast.Constant) and isinstance(operand.value, int | float)
                and not isinstance(operand.value, bool)):
            number = -operand.value if isinstance(node.op, ast.USub) else operand.value
            if math.isfinite(number):
                return number
    elif isinstance(node, ast.List | ast.Tuple):
        return [_literal_value(e) for e in node.elts]
    elif isinstance(node, ast.Dict):
        out: dict[str, Any] = {}
        for key, item in zip(node.keys, node.values, strict=True):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                raise ValueError("dict keys must be string literals")
            out[key.value] = _literal_value(item)
        return out
    elif isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise ValueError(f"not a literal: {ast.dump(node):.80}")


def _json_calls(data: Any, names: frozenset[str]) -> list[ToolCall] | None:
    items = data if isinstance(data, list) else [data]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or item["name"] not in names:
            return None
        if item.get("type", "function") != "function":
            return None
        if set(item) - {"name", "type"} not in ({"parameters"}, {"arguments"}):
            return None
        arguments = item.get("parameters", item.get("arguments"))
        if isinstance(arguments, str):
            arguments = json.loads(arguments, parse_constant=_reject_constant)
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(name=item["name"], arguments=arguments))
    return calls or None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
