"""Failures the engine reports per request instead of raising out of a step."""

from __future__ import annotations


class StepError(RuntimeError):
    """A step could not complete (an expert shard unreachable, a deadline missed, ...).

    `code` is a gRPC status name the serving layer maps to its own answer; the requests of the failed
    step finish with finish_reason "error" and this message, and their blocks are freed.
    """

    code = "INTERNAL"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
