"""Tools on gRPC Chat: herd.v1.FunctionTool and tool_choice as the gateway takes them, and the calls in a
finished reply put on its last chunk (parsed as the HTTP door parses them)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

from herd.model.tool_calls import arguments_json, offer_tools, parse_tool_calls
from herd.platform.gateway.errors import invalid_request
from herd.protos.herd.v1 import inference_pb2 as pb


def chat_tools(request: pb.ChatRequest) -> tuple[list[dict[str, Any]], Any, frozenset[str]]:
    """(tools as OpenAI's dicts, tool_choice as OpenAI's value, the names a reply's calls may use); 400 naming
    tools or tool_choice for what is malformed."""
    tools = []
    for tool in request.tools:
        try:
            parameters = json.loads(tool.parameters_json) if tool.parameters_json else None
        except ValueError as err:
            raise invalid_request(f"tool {tool.name!r} parameters_json is not JSON: {err}", param="tools") from None
        function = {"name": tool.name, "parameters": parameters, **({"description": tool.description}
                                                                    if tool.description else {})}
        tools.append({"type": "function", "function": function})
    given = request.tool_choice or "auto"
    choice: Any = given if given in ("auto", "none", "required") else {"type": "function", "function": {"name": given}}
    if not tools:
        if choice not in ("auto", "none"):
            raise invalid_request("tool_choice needs tools", param="tool_choice")
        return [], choice, frozenset()
    try:
        offer_tools(tools, "auto")
    except ValueError as err:
        raise invalid_request(str(err), param="tools") from err
    try:
        names = offer_tools(tools, choice).names
    except ValueError as err:
        raise invalid_request(str(err), param="tool_choice") from err
    return tools, choice, names


async def with_calls(chunks: AsyncGenerator[pb.GenerateChunk, None], names: Callable[[], frozenset[str]],
                     ) -> AsyncGenerator[pb.GenerateChunk, None]:
    """The chunks as they come; the last one also carries the reply's calls when the whole reply is calls of the
    offered functions (finish_reason "tool_calls")."""
    text = ""
    async for chunk in chunks:
        text += chunk.text
        allowed = names()
        if chunk.finish_reason and allowed:
            parsed = parse_tool_calls(text, allowed)
            if parsed.calls and not parsed.content:
                chunk.tool_calls.extend(pb.FunctionCall(name=call.name, arguments_json=arguments_json(call))
                                        for call in parsed.calls)
                chunk.finish_reason = "tool_calls"
        yield chunk
