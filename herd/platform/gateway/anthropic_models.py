"""Anthropic Messages API bodies (pydantic): what POST /v1/messages accepts and answers, and says so in the
OpenAPI document. Unknown fields are refused by name; `cache_control` marks (Anthropic's prompt caching) are
accepted everywhere they may appear and ignored, since Herd's prefix cache needs no marks.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from herd.engine.sampling_params import MAX_TOKENS_LIMIT, checked_stop
from herd.platform.gateway.openai_models import INT32_MAX


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheControl(BaseModel):
    """Accepted and ignored: every prompt prefix is cached without being asked."""

    type: Literal["ephemeral"]
    ttl: str | None = None


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = Field(None, description="accepted in history, not produced")


class Base64Source(_Strict):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class UrlSource(_Strict):
    type: Literal["url"]
    url: str = Field(description="read under the gateway's image URL policy (data: URLs always; http(s) only "
                                 "where the operator allowed fetching)")


class ImageBlock(_Strict):
    type: Literal["image"]
    source: Annotated[Base64Source | UrlSource, Field(discriminator="type")]
    cache_control: CacheControl | None = None


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False
    cache_control: CacheControl | None = None


InputBlock = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class InputMessage(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[InputBlock]


class InputTool(_Strict):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: CacheControl | None = None
    type: Literal["custom"] | None = None


class AutoChoice(_Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class AnyChoice(_Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceByName(_Strict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool = False


class NoneChoice(_Strict):
    type: Literal["none"]


ToolChoice = Annotated[AutoChoice | AnyChoice | ToolChoiceByName | NoneChoice, Field(discriminator="type")]


class JsonOutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema", description="the reply is JSON matching it (structured output)")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class OutputConfig(_Strict):
    format: JsonOutputFormat | None = None
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = Field(None, description="accepted; ignored")


class ThinkingDisabled(_Strict):
    type: Literal["disabled"] = Field(description="extended thinking is not served: only disabled is accepted")


class Metadata(_Strict):
    user_id: str | None = Field(None, max_length=256, description="accepted; not stored")


class MessagesRequest(_Strict):
    model: str
    max_tokens: int = Field(ge=1, le=MAX_TOKENS_LIMIT, description="required, as Anthropic's API has it")
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT32_MAX)
    metadata: Metadata | None = None
    tools: list[InputTool] | None = None
    tool_choice: ToolChoice | Literal["none"] | None = None
    stream: bool = False
    service_tier: Literal["auto", "standard_only"] | None = Field(None, description="accepted; one tier is served")
    output_config: OutputConfig | None = None
    thinking: ThinkingDisabled | None = None
    cache_control: CacheControl | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _stop_sequences(cls, value: list[str] | None) -> list[str] | None:
        checked_stop(value)  # the engine's own limits, so every door says the same thing
        return value


# --- responses --------------------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["text"] = "text"
    text: str


class OutputToolUse(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


OutputBlock = Annotated[OutputText | OutputToolUse, Field(discriminator="type")]
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[OutputBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: MessageUsage


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    """The error body on /v1/messages (and the data of a stream's `error` event)."""

    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


class StreamEvent(BaseModel):
    """One server-sent event of a streamed message: `event: <type>` then `data: <this object>`. The types, in
    order: message_start, then per content block content_block_start, content_block_delta..., content_block_stop
    (a ping after the first block's start), message_delta (stop_reason, usage.output_tokens), message_stop; or
    an `error` event (an AnthropicError) that ends the stream."""

    model_config = ConfigDict(extra="allow")

    type: Literal["message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop",
                  "message_delta", "message_stop"]
