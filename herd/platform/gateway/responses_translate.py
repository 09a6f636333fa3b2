"""Responses API <-> the gateway's chat: a request becomes chat messages, tools and sampling options; a reply's
text becomes output items (a message, or function calls) and the assistant message a follow-up continues.

Pure functions. A request's chat is: its instructions as the system message, the previous response's
conversation (without that response's instructions: OpenAI does not carry them over), then its input items.
Function-call items become an assistant message's tool_calls (consecutive calls in one message, after that
message's text when one precedes them), function_call_output items tool messages, so the Llama 4 tool-call
template renders them as it renders a chat's.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from herd.model.tool_calls import arguments_json, parse_tool_calls
from herd.platform.gateway.errors import invalid_request
from herd.platform.gateway.forced_tools import constrain_to_calls
from herd.platform.gateway.openai_translate import Collected
from herd.platform.gateway.responses_models import (
    FunctionCallItem,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    NamedFunction,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputTextPart,
    ResponseObject,
    ResponseRequest,
    ResponseUsage,
    TextConfig,
    TextFormatJsonObject,
    TextFormatJsonSchema,
)
from herd.protos.herd.v1 import inference_pb2 as pb

Message = dict[str, Any]  # a chat message as Gateway.prepare_chat takes it


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --- the request ----------------------------------------------------------------------------------------------
def input_messages(request: ResponseRequest) -> list[Message]:
    """The request's input as chat messages (400 naming input[i] for an item that cannot be one)."""
    if isinstance(request.input, str):
        return [{"role": "user", "content": request.input}]
    out: list[Message] = []
    for index, item in enumerate(request.input):
        if isinstance(item, MessageItem):
            out.append(_message(item))
        elif isinstance(item, FunctionCallItem):
            call = {"type": "function", "id": item.call_id,
                    "function": {"name": item.name, "arguments": _arguments(item, index)}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and isinstance(last["content"], str):
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            out.append(_tool_result(item))
    if not out:
        raise invalid_request("input must hold at least one item", param="input")
    return out


def _message(item: MessageItem) -> Message:
    role = "system" if item.role == "developer" else item.role
    if isinstance(item.content, str):
        return {"role": role, "content": item.content}
    parts: list[dict[str, Any]] = []
    for part in item.content:
        if part.type == "input_image":
            parts.append({"type": "image_url", "url": part.image_url})
        else:
            parts.append({"type": "text", "text": part.refusal if part.type == "refusal" else part.text})
    if role == "assistant":  # the template takes an assistant's text as a string (it may carry tool calls next)
        if any(p["type"] != "text" for p in parts):
            raise invalid_request("an assistant message carries text only", param="input")
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def _arguments(item: FunctionCallItem, index: int) -> str:
    try:
        arguments = json.loads(item.arguments)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise invalid_request(f"input[{index}] (function_call {item.name!r}): arguments must be a JSON object",
                              param="input")
    return item.arguments


def _tool_result(item: FunctionCallOutputItem) -> Message:
    output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
    return {"role": "tool", "content": output, "tool_call_id": item.call_id}


def chat(request: ResponseRequest, conversation: Sequence[Message], new: Sequence[Message]) -> list[Message]:
    """The whole chat of this request: instructions, the previous conversation, the new input's messages."""
    system = [{"role": "system", "content": request.instructions}] if request.instructions is not None else []
    return [*system, *conversation, *new]


def offered_tools(request: ResponseRequest) -> tuple[list[dict[str, Any]], Any]:
    """The tools in chat form and the tool choice in chat form."""
    offered = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type", "strict"})}
               for t in request.tools or []]
    choice = request.tool_choice
    return offered, ({"type": "function", "function": {"name": choice.name}}
                     if isinstance(choice, NamedFunction) else choice)


def sampling(request: ResponseRequest) -> pb.SamplingOptions:
    """temperature, top_p, max_output_tokens, text.format as the output constraint; a forced tool choice
    constrains the output to calls instead (400 naming tool_choice beside a json format)."""
    options = pb.SamplingOptions()
    for name, value in (("temperature", request.temperature), ("top_p", request.top_p),
                        ("max_tokens", request.max_output_tokens)):
        if value is not None:
            setattr(options, name, value)
    fmt = request.text.format if request.text is not None else None
    if isinstance(fmt, TextFormatJsonSchema):
        options.structured.json_schema = json.dumps(fmt.schema_, separators=(",", ":"))
    elif isinstance(fmt, TextFormatJsonObject):
        options.structured.json_object = True
    offered, choice = offered_tools(request)
    return constrain_to_calls(options, offered, choice, parallel=request.parallel_tool_calls is not False)


def tool_names(request: ResponseRequest) -> list[str]:
    """The functions a reply may call (none with tool_choice "none"; only the named one when one is named)."""
    if not request.tools or request.tool_choice == "none":
        return []
    if isinstance(request.tool_choice, NamedFunction):
        return [request.tool_choice.name]
    return sorted(t.name for t in request.tools)


# --- the reply ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """A finished reply: its output items and the assistant message a follow-up's chat carries."""

    output: list[OutputItem]
    message: Message
    incomplete: bool


def reply(text: str, finish_reason: str | None, names: list[str]) -> Reply:
    """Output items of a reply's text: function_call items when tools were offered and the text is calls (a
    message item first for prose before them), else one message item."""
    incomplete = finish_reason == "length"
    status = "incomplete" if incomplete else "completed"
    parsed = parse_tool_calls(text, names) if names else None
    if parsed is None or not parsed.calls:
        return Reply([text_message(text, status)], {"role": "assistant", "content": text}, incomplete)
    calls = [OutputFunctionCall(id=new_id("fc"), call_id=new_id("call"), name=c.name, arguments=arguments_json(c),
                                status="completed") for c in parsed.calls]
    output: list[OutputItem] = [text_message(parsed.content, "completed")] if parsed.content else []
    message = {"role": "assistant", "content": parsed.content or "",
               "tool_calls": [{"type": "function", "id": c.call_id,
                               "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}
    return Reply([*output, *calls], message, False)


def text_message(text: str, status: str) -> OutputMessage:
    return OutputMessage(id=new_id("msg"), status=status, content=[OutputTextPart(text=text)])


def usage(prompt_tokens: int, got: Collected) -> ResponseUsage:
    output = got.usage.completion_tokens if got.usage is not None else len(got.token_ids)
    cached = got.usage.cached_tokens if got.usage is not None else 0
    return ResponseUsage(input_tokens=prompt_tokens, input_tokens_details=InputTokensDetails(cached_tokens=cached),
                         output_tokens=output, total_tokens=prompt_tokens + output)


def response_object(request: ResponseRequest, response_id: str, *, output: list[OutputItem], status: str,
                    usage: ResponseUsage | None = None, created_at: int | None = None) -> ResponseObject:
    """The response object, with the request's settings echoed as OpenAI does."""
    return ResponseObject(
        id=response_id, created_at=created_at or int(time.time()), status=status,
        incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
        instructions=request.instructions, max_output_tokens=request.max_output_tokens, model=request.model,
        output=output, parallel_tool_calls=request.parallel_tool_calls is not False,
        previous_response_id=request.previous_response_id, temperature=request.temperature, top_p=request.top_p,
        tool_choice=request.tool_choice, tools=request.tools or [], text=request.text or TextConfig(),
        store=request.store, metadata=request.metadata or {}, user=request.user, usage=usage)


def dumped(obj: Any) -> dict[str, Any]:
    """A body model as JSON (the json_schema format's `schema` under its own name)."""
    out: dict[str, Any] = obj.model_dump(mode="json", by_alias=True)
    return out
