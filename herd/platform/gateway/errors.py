"""Every way a request can be refused, once, with its HTTP status, OpenAI error type and gRPC code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GatewayError(Exception):
    """A request the gateway answers with an error; the server keeps serving."""

    status: int  # HTTP status
    code: str  # gRPC status name
    type: str  # OpenAI error type
    message: str
    param: str | None = None
    openai_code: str | None = None  # OpenAI error code, e.g. context_length_exceeded
    retry_after_s: int | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, object]:
        """The OpenAI-shaped error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.openai_code}}


def invalid_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "INVALID_ARGUMENT", "invalid_request_error", message, param=param)


def too_many_images(count: int, limit: int) -> GatewayError:
    return invalid_request(f"{count} images in one request; at most {limit} are allowed", param="messages")


def model_not_found(name: str, known: list[str]) -> GatewayError:
    return GatewayError(404, "NOT_FOUND", "invalid_request_error", f"The model '{name}' does not exist; "
                        f"this server serves {known}", param="model", openai_code="model_not_found")


def context_length_exceeded(limit: int, prompt: int, completion: int) -> GatewayError:
    return GatewayError(
        400, "INVALID_ARGUMENT", "invalid_request_error",
        f"This model's maximum context length is {limit} tokens. However, you requested {prompt + completion} "
        f"tokens ({prompt} in the prompt, {completion} in the completion).",
        param="messages", openai_code="context_length_exceeded",
    )


def payload_too_large(limit_bytes: int) -> GatewayError:
    return GatewayError(413, "RESOURCE_EXHAUSTED", "invalid_request_error",
                        f"The request body is larger than this server's limit of {limit_bytes} bytes.",
                        openai_code="request_too_large")


def overloaded(retry_after_s: int = 1) -> GatewayError:
    return GatewayError(429, "RESOURCE_EXHAUSTED", "rate_limit_error",
                        "The server is at capacity; retry shortly.", retry_after_s=retry_after_s)


def unavailable(message: str) -> GatewayError:
    return GatewayError(503, "UNAVAILABLE", "server_error", message, retry_after_s=1)


def deadline_exceeded(seconds: float) -> GatewayError:
    return GatewayError(504, "DEADLINE_EXCEEDED", "timeout", f"The request did not finish within {seconds:g} s.")


def internal(message: str) -> GatewayError:
    return GatewayError(500, "INTERNAL", "server_error", message)


_FROM_CODE = {
    "INVALID_ARGUMENT": lambda m: invalid_request(m),
    "NOT_FOUND": lambda m: GatewayError(404, "NOT_FOUND", "invalid_request_error", m),
    "RESOURCE_EXHAUSTED": lambda m: overloaded(),
    "UNAVAILABLE": unavailable,
    "DEADLINE_EXCEEDED": lambda m: GatewayError(504, "DEADLINE_EXCEEDED", "timeout", m),
    "CANCELLED": lambda m: GatewayError(499, "CANCELLED", "cancelled", m),
}


def from_code(code: str, message: str) -> GatewayError:
    """The GatewayError for a gRPC status name reported by a replica."""
    return _FROM_CODE.get(code, internal)(message)
