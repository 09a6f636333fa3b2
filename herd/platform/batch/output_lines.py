"""A batch's output and error lines, as OpenAI writes them: one JSON object per input request,
{"id", "custom_id", "response": {"status_code", "request_id", "body"} or null, "error": {"code", "message"} or null}.

A request that ran has a response (200 in the output file; 4xx/5xx with its OpenAI error body in the error
file); one that never ran (the batch expired first) has an error and no response. Pure.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


def line_id(batch_id: str, index: int) -> str:
    return f"batch_req_{batch_id.removeprefix('batch_')}_{index}"


def request_id(batch_id: str, index: int) -> str:
    """The request id of a batch's line: the same on every attempt, so the usage ledger (one row per request
    id) bills a line once however often it is retried after a crash."""
    return f"{batch_id}-{index}"


def response_line(batch_id: str, index: int, custom_id: str, status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": line_id(batch_id, index), "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id(batch_id, index), "body": body},
            "error": None}


def expired_line(batch_id: str, index: int, custom_id: str) -> dict[str, Any]:
    return {"id": line_id(batch_id, index), "custom_id": custom_id, "response": None,
            "error": {"code": "batch_expired",
                      "message": "This request could not be executed before the completion window expired."}}


def jsonl(lines: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)


__all__ = ["expired_line", "jsonl", "line_id", "request_id", "response_line"]
