"""Anthropic Messages shapes <-> the gateway's: a Messages request becomes a chat, a chat's reply a Message.

Pure functions except for reading image URLs; the route (herd.platform.gateway.messages_http) is a thin
wrapper around these and herd.platform.gateway.anthropic_stream.

A request maps onto the chat path so: `system` is the system message; a user turn's text and image blocks are
one user message, and each of its tool_result blocks a tool message (in block order); an assistant turn's text
is its content and its tool_use blocks its tool calls. Tools are offered as functions (input_schema as their
parameters); tool_choice any is "required", tool is the named function, both held to calls by the output
constraint (herd.platform.gateway.forced_tools); disable_parallel_tool_use allows one call at most.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Sequence
from typing import Any

from herd.engine.errors import HerdError
from herd.model.tool_calls import offer_tools, parse_tool_calls
from herd.platform.gateway.anthropic_models import (
    AnyChoice,
    Base64Source,
    ImageBlock,
    InputMessage,
    Message,
    MessagesRequest,
    MessageUsage,
    NoneChoice,
    OutputBlock,
    OutputText,
    OutputToolUse,
    StopReason,
    TextBlock,
    ToolChoiceByName,
    ToolResultBlock,
    ToolUseBlock,
)
from herd.platform.gateway.core import Gateway, Prepared
from herd.platform.gateway.errors import invalid_request
from herd.platform.gateway.forced_tools import constrain_to_calls, forcing
from herd.platform.gateway.image_urls import ImageUrlPolicy, image_bytes
from herd.platform.gateway.openai_translate import Collected
from herd.protos.herd.v1 import inference_pb2 as pb


def sampling(request: MessagesRequest) -> pb.SamplingOptions:
    options = pb.SamplingOptions(max_tokens=request.max_tokens)
    for name, value in (("temperature", request.temperature), ("top_p", request.top_p), ("top_k", request.top_k)):
        if value is not None:
            setattr(options, name, value)
    if request.stop_sequences:
        options.stop.extend(request.stop_sequences)
    output = request.output_config.format if request.output_config is not None else None
    if output is not None:
        options.structured.json_schema = json.dumps(output.schema_, separators=(",", ":"))
    return options


def constraint_field(request: MessagesRequest) -> str:
    """The request field its output constraint came from, named when a replica refuses the constraint."""
    has_format = request.output_config is not None and request.output_config.format is not None
    return "output_config.format" if has_format else "tool_choice"


def offered_tools(request: MessagesRequest) -> list[dict[str, Any]]:
    """The request's tools as the chat path takes them (OpenAI function tools)."""
    return [{"type": "function", "function": {"name": t.name, "parameters": t.input_schema,
                                              **({"description": t.description} if t.description else {})}}
            for t in request.tools or []]


def tool_choice(request: MessagesRequest) -> Any:
    """Anthropic's tool_choice as the chat path's: "auto", "none", "required" or a named function."""
    choice = request.tool_choice
    if choice is None:
        return "auto"
    if choice == "none" or isinstance(choice, NoneChoice):
        return "none"
    if isinstance(choice, AnyChoice):
        return "required"
    if isinstance(choice, ToolChoiceByName):
        return {"type": "function", "function": {"name": choice.name}}
    return "auto"


def _parallel(request: MessagesRequest) -> bool:
    return not getattr(request.tool_choice, "disable_parallel_tool_use", False)


def tool_names(request: MessagesRequest) -> list[str]:
    """The functions the reply may call (none with tool_choice none): what its text is parsed for."""
    if not request.tools:
        return []
    try:
        return sorted(offer_tools(offered_tools(request), tool_choice(request)).names)
    except ValueError:
        return []  # prepare has refused such a request already


async def prepare(gateway: Gateway, request: MessagesRequest, identity: Any, image_urls: ImageUrlPolicy) -> Prepared:
    """The Messages request as the gateway's chat; url image sources are read by the gateway, after the model
    is authorised and the image count checked, under the gateway's image URL policy."""
    choice = tool_choice(request)
    tools = offered_tools(request)
    if not tools and choice not in ("auto", "none"):
        raise invalid_request("tool_choice forces a tool call, but the request offers no tools", param="tool_choice")
    options = sampling(request)
    if options.HasField("structured") and forcing(tools, choice):
        raise invalid_request("output_config.format and a forced tool_choice each constrain the output: send one",
                              param="tool_choice")
    options = constrain_to_calls(options, tools, choice, parallel=_parallel(request))

    async def load_image(url: str) -> bytes:
        return await image_bytes(url, image_urls)

    try:
        return await gateway.prepare_chat(request.model, chat_messages(request), options, tools=tools or None,
                                          tool_choice=choice, identity=identity, load_image=load_image)
    except HerdError as err:
        if err.param == "structured":  # the wire's name for the constraint: the request's own instead
            err.param = constraint_field(request)
        raise


def chat_messages(request: MessagesRequest) -> list[dict[str, Any]]:
    """The system prompt and every turn, as chat messages."""
    out: list[dict[str, Any]] = []
    if request.system:
        system = request.system
        text = system if isinstance(system, str) else "\n\n".join(block.text for block in system)
        out.append({"role": "system", "content": text})
    for index, message in enumerate(request.messages):
        out += _turn(message, f"messages.{index}")
    if request.messages[-1].role == "assistant":
        raise invalid_request("the last message must be the user's: a final assistant turn (prefill) is not "
                              "supported", param=f"messages.{len(request.messages) - 1}")
    return out


def _turn(message: InputMessage, where: str) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    if message.role == "assistant":
        return [_assistant(message.content, where)]
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []  # the user's text and images since the last tool result
    for index, block in enumerate(message.content):
        if isinstance(block, ToolResultBlock):
            if parts:
                out.append({"role": "user", "content": parts})
                parts = []
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _result_text(block)})
        elif isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append(_image(block, f"{where}.content.{index}"))
        else:
            raise invalid_request("tool_use blocks belong in assistant turns", param=f"{where}.content.{index}")
    if parts or not out:
        out.append({"role": "user", "content": parts})
    return out


def _assistant(blocks: Sequence[Any], where: str) -> dict[str, Any]:
    text, calls = [], []
    for index, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": json.dumps(block.input)}})
        else:
            raise invalid_request(f"an assistant turn holds only text and tool_use blocks, not {block.type}",
                                  param=f"{where}.content.{index}")
    out: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if calls:
        out["tool_calls"] = calls
    return out


def _result_text(block: ToolResultBlock) -> str:
    content = block.content
    text = content if isinstance(content, str) else "".join(b.text for b in content or [])
    return f"Error: {text}" if block.is_error else text


def _image(block: ImageBlock, where: str) -> dict[str, Any]:
    source = block.source
    if not isinstance(source, Base64Source):
        return {"type": "image_url", "url": source.url}
    try:
        return {"type": "image", "image": base64.b64decode(source.data, validate=True)}
    except (binascii.Error, ValueError):
        raise invalid_request("the image's base64 data does not decode", param=f"{where}.source.data") from None


# --- the reply ----------------------------------------------------------------------------------------------
def stop_of(request: MessagesRequest, prepared: Prepared, got: Collected) -> tuple[StopReason, str | None]:
    """Why the reply ended, and which stop sequence ended it. The engine cuts a matched stop string from the
    text but reports every token, so the tokens' text past the reply's text starts with the one that matched."""
    if got.finish_reason == "length":
        return "max_tokens", None
    if request.stop_sequences and got.finish_reason == "stop":
        full = prepared.backend.tokenizer.decode(got.token_ids)
        rest = full[len(got.text):] if full.startswith(got.text) else full
        found = sorted((rest.find(s), -len(s), s) for s in request.stop_sequences if s in rest)
        if found:
            return "stop_sequence", found[0][2]
    return "end_turn", None


def content_of(text: str, names: list[str]) -> list[OutputBlock]:
    """A reply's content blocks: tool_use blocks (after the prose before them, if any) when its text is calls of
    the offered tools, else one text block."""
    if names:
        parsed = parse_tool_calls(text, names)
        if parsed.calls:
            prose: list[OutputBlock] = [OutputText(text=parsed.content)] if (parsed.content or "").strip() else []
            return prose + [OutputToolUse(id=f"toolu_{uuid.uuid4().hex[:24]}", name=c.name, input=c.arguments)
                            for c in parsed.calls]
    return [OutputText(text=text)]


def usage_of(prepared: Prepared, got: Collected) -> MessageUsage:
    output = got.usage.completion_tokens if got.usage is not None else len(got.token_ids)
    cached = got.usage.cached_tokens if got.usage is not None else 0
    return MessageUsage(input_tokens=prepared.prompt_tokens, output_tokens=output, cache_read_input_tokens=cached)


def message_id(prepared: Prepared) -> str:
    return f"msg_{prepared.request.request_id.removeprefix('herd-')}"


def message(request: MessagesRequest, prepared: Prepared, got: Collected) -> Message:
    """The whole reply as a Message."""
    content = content_of(got.text, tool_names(request))
    reason, sequence = stop_of(request, prepared, got)
    if any(isinstance(block, OutputToolUse) for block in content):
        reason, sequence = "tool_use", None
    return Message(id=message_id(prepared), model=request.model, content=content, stop_reason=reason,
                   stop_sequence=sequence, usage=usage_of(prepared, got))

