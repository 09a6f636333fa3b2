"""A batch's input file, checked whole before the batch exists (as OpenAI does at create): every request line
a JSON object with a unique custom_id, method POST and the batch's endpoint as url, and a JSON object body.

Pure: bytes in, lines or a 400 naming the first bad line (1-based, as an editor numbers it) out. Blank lines
are skipped; the request's `index` counts requests only, and is the BatchItem's line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from herd.engine.errors import HerdError
from herd.platform.gateway.errors import invalid_request

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
"""What a batch's lines may call (the Responses API joins when the gateway serves it)."""
MAX_CUSTOM_ID_CHARS = 255
WINDOWS_S = {"24h": 24 * 3600}
"""completion_window values and their length (OpenAI takes 24h only)."""


@dataclass(frozen=True)
class InputLine:
    index: int  # among the file's requests, from 0
    custom_id: str
    body: dict[str, Any]


def parse_input(data: bytes, endpoint: str) -> list[InputLine]:
    """The file's requests, or HerdError(INVALID_ARGUMENT) naming the line that is wrong and why."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _refused(f"the input file is not UTF-8 text (byte {err.start})") from None
    lines: list[InputLine] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(re.split(r"\r?\n", text), start=1):
        if not raw.strip():
            continue
        request = _request(number, raw, endpoint)
        custom_id = request["custom_id"]
        if custom_id in seen:
            raise _refused(f"line {number}: custom_id {custom_id!r} is also on line {seen[custom_id]}; "
                           "each request needs its own")
        seen[custom_id] = number
        lines.append(InputLine(index=len(lines), custom_id=custom_id, body=request["body"]))
    if not lines:
        raise _refused("the input file has no requests")
    return lines


def _request(number: int, raw: str, endpoint: str) -> dict[str, Any]:
    try:
        request = json.loads(raw)
    except json.JSONDecodeError as err:
        raise _refused(f"line {number}: not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(request, dict):
        raise _refused(f"line {number}: a request must be a JSON object")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _refused(f"line {number}: custom_id is missing (a non-empty string)")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise _refused(f"line {number}: custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters")
    if request.get("method") != "POST":
        raise _refused(f"line {number}: method must be \"POST\", got {request.get('method')!r}")
    if request.get("url") != endpoint:
        raise _refused(f"line {number}: url {request.get('url')!r} is not this batch's endpoint {endpoint!r}")
    if not isinstance(request.get("body"), dict):
        raise _refused(f"line {number}: body must be a JSON object (the {endpoint} request)")
    unknown = sorted(set(request) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise _refused(f"line {number}: unknown fields {unknown}")
    return request


def window_s(completion_window: str) -> int:
    """The completion window's length in seconds (a 400 for one not served)."""
    if completion_window not in WINDOWS_S:
        raise invalid_request(f"completion_window must be one of {sorted(WINDOWS_S)}, got {completion_window!r}",
                              param="completion_window")
    return WINDOWS_S[completion_window]


def _refused(message: str) -> HerdError:
    return invalid_request(message, param="input_file_id")


__all__ = ["ENDPOINTS", "InputLine", "parse_input", "window_s"]
