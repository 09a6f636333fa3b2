"""OpenAI Responses API bodies (pydantic): the request POST /v1/responses takes and the response object it
returns (and GET /v1/responses/{id} returns again).

Unknown fields are refused by name. Input items are read one at a time, so a malformed one is refused as
"input[i] (its type): what is wrong", not as a union's every alternative.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from herd.engine.sampling_params import MAX_TOKENS_LIMIT
from herd.platform.gateway.openai_models import JsonSchemaFormat


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- input ----------------------------------------------------------------------------------------------------
class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class InputImage(_Strict):
    type: Literal["input_image"]
    image_url: str = Field(description="a data: URL (or http(s) where the server fetches images)")
    detail: Literal["low", "high", "auto"] | None = None


class OutputText(_Strict):
    """An earlier reply's text, as a client sends an output message back."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] | None = None


class Refusal(_Strict):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[InputText | InputImage | OutputText | Refusal, Field(discriminator="type")]


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallItem(_Strict):
    """A call the model made earlier (sent back with its result)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = Field(description="the arguments, a JSON object")
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(_Strict):
    """A call's result."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


def _item_type(value: Any) -> str | None:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if isinstance(kind, str) else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]
_ITEM: TypeAdapter[Any] = TypeAdapter(InputItem)


def _named_items(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A string, or a list of items each validated on its own so that an error names the item."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("input must be a string or a list of input items")
    items = []
    for index, item in enumerate(value):
        try:
            items.append(_ITEM.validate_python(item))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"][1:])
            kind = _item_type(item) or "?"
            raise ValueError(f"input[{index}] ({kind}){' ' + where if where else ''}: {first['msg']}") from None
    return items


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(None, description="a forced call is held to its schema either way")


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormatText(_Strict):
    type: Literal["text"]


class TextFormatJsonObject(_Strict):
    type: Literal["json_object"]


class TextFormatJsonSchema(JsonSchemaFormat):
    type: Literal["json_schema"]


TextFormat = Annotated[TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")]


class TextConfig(_Strict):
    format: TextFormat = Field(default_factory=lambda: TextFormatText(type="text"))


Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     Field(max_length=16)]


class ResponseRequest(_Strict):
    """POST /v1/responses."""

    model: str
    input: Annotated[str | list[InputItem], WrapValidator(_named_items)]
    instructions: str | None = None
    previous_response_id: str | None = Field(None, description="continue this stored response's conversation")
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction = "auto"
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    store: bool = Field(True, description="keep the response for GET and previous_response_id")
    stream: bool = False
    metadata: Metadata | None = None
    user: str | None = Field(None, max_length=256)
    truncation: Literal["disabled"] | None = Field(None, description="only 'disabled': a prompt too long is a 400")
    background: Literal[False] | None = Field(None, description="not served: responses run in the foreground")


# --- output ---------------------------------------------------------------------------------------------------
class OutputTextPart(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputTextPart]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = Annotated[OutputMessage | OutputFunctionCall, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    """A response: its output items, its status and usage, and the request's settings."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress"]
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction
    tools: list[FunctionTool]
    text: TextConfig
    truncation: Literal["disabled"] = "disabled"
    store: bool
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    usage: ResponseUsage | None = None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True
