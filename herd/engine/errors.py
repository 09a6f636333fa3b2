"""The one error type of Herd, from the engine to the gateway: a code, a message for the caller, details.

Whatever refuses or fails a request (the engine's step, an expert shard, a replica, the gateway's checks,
tenancy) raises a HerdError. It crosses processes as it is (Ray pickles it; Serve's gRPC proxy carries its
code and message), and each door turns it into its own answer: a gRPC status, or an HTTP status with an
OpenAI-style body (herd.platform.gateway.errors). No layer parses an error back out of a string.
"""

from __future__ import annotations

import enum
from typing import Any


class Code(enum.StrEnum):
    """What went wrong, by the gRPC status names every door maps from."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"

    @classmethod
    def of(cls, name: str) -> Code:
        """The code of a gRPC status name; INTERNAL for one Herd does not answer with (UNKNOWN, DATA_LOSS...)."""
        return cls.__members__.get(name, cls.INTERNAL)


class HerdError(Exception):
    """A request Herd cannot serve, or a step that failed.

    `param` names the bad request field; `reason` is a machine-readable word for the cause (the OpenAI body's
    `code`, e.g. context_length_exceeded, or which tenant limit); `retry_after_s` says when a retry may work.
    """

    def __init__(self, code: Code | str, message: str, *, param: str | None = None, reason: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.code = Code(code)
        self.message = message
        self.param = param
        self.reason = reason
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"HerdError({self.code.value}, {self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles a replica's or shard's exception to the caller; the default would call HerdError(message).
        return HerdError, (self.code.value, self.message), vars(self)


class SamplingError(ValueError):
    """A sampling setting that is refused; `field` names it (the doors report it as the bad parameter)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
