"""A forced tool choice as an output constraint, for both doors: tool_choice "required" or a named function
holds a chat's output to calls of the offered functions (herd.model.tool_calls.forced_call_schema)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from herd.model.tool_calls import forced_call_schema, offer_tools
from herd.platform.gateway.errors import invalid_request
from herd.protos.herd.v1 import inference_pb2 as pb


def forcing(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any) -> bool:
    """Whether this tool choice forces a call (and so constrains the output)."""
    return bool(tools) and tool_choice not in (None, "auto", "none")


def constrain_to_calls(options: pb.SamplingOptions, tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any,
                       *, parallel: bool = True) -> pb.SamplingOptions:
    """options, constrained to calls when the tool choice forces one (a copy; the same options otherwise).
    400 naming tool_choice for a choice that names no offered tool, or beside another output constraint."""
    if not forcing(tools, tool_choice):
        return options
    if options.HasField("structured"):
        raise invalid_request("a forced tool_choice constrains the output to tool calls: send no other output "
                              "constraint (response_format, structured_outputs) with it", param="tool_choice")
    try:
        offer = offer_tools(tools, tool_choice)
    except ValueError as err:
        raise invalid_request(str(err), param="tool_choice") from err
    constrained = pb.SamplingOptions()
    constrained.CopyFrom(options)
    constrained.structured.json_schema = json.dumps(forced_call_schema(offer, parallel=parallel), separators=(",", ":"))
    return constrained
