"""A streamed Message: the chunk stream as Anthropic's server-sent events.

Order: message_start; per content block content_block_start, content_block_delta..., content_block_stop (a ping
after the first block opens); message_delta (stop_reason, stop_sequence, usage.output_tokens); message_stop.
Without tools the reply's text streams as it comes (text_delta). With tools on offer it is held until the end,
since only the whole text says whether it is calls: then it goes out as tool_use blocks (their input as one
input_json_delta) after any prose before them, or as one text block.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from herd.platform.gateway.anthropic_models import MessagesRequest, OutputBlock, OutputText, OutputToolUse
from herd.platform.gateway.anthropic_translate import content_of, message_id, stop_of, tool_names, usage_of
from herd.platform.gateway.core import Prepared
from herd.platform.gateway.openai_translate import Collected
from herd.protos.herd.v1 import inference_pb2 as pb

Event = tuple[str, dict[str, Any]]  # (event type, its data)


def sse(kind: str, data: dict[str, Any]) -> bytes:
    """One server-sent event with its `event:` line, as Anthropic's clients read them."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _event(kind: str, **data: Any) -> Event:
    return kind, {"type": kind, **data}


async def message_events(request: MessagesRequest, prepared: Prepared,
                         chunks: AsyncIterator[pb.GenerateChunk]) -> AsyncIterator[Event]:
    names = tool_names(request)
    usage = {"input_tokens": prepared.prompt_tokens, "output_tokens": 0, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0}
    yield _event("message_start", message={
        "id": message_id(prepared), "type": "message", "role": "assistant", "model": request.model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": usage})
    got = Collected()
    if names:
        yield _event("ping")
    else:
        yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
        yield _event("ping")
    async for chunk in chunks:
        got.text += chunk.text
        got.token_ids += list(chunk.token_ids)
        if chunk.finish_reason:
            got.finish_reason, got.usage = chunk.finish_reason, chunk.usage
        if chunk.text and not names:
            yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": chunk.text})
    blocks = content_of(got.text, names) if names else []
    for index, block in enumerate(blocks):
        for event in _block_events(index, block):
            yield event
    if not names:
        yield _event("content_block_stop", index=0)
    reason, sequence = stop_of(request, prepared, got)
    if any(isinstance(block, OutputToolUse) for block in blocks):
        reason, sequence = "tool_use", None
    final = usage_of(prepared, got)
    yield _event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                 usage={"output_tokens": final.output_tokens, "input_tokens": final.input_tokens,
                        "cache_read_input_tokens": final.cache_read_input_tokens})
    yield _event("message_stop")


def _block_events(index: int, block: OutputBlock) -> list[Event]:
    """A held block whole: its start, one delta, its stop."""
    if isinstance(block, OutputText):
        events = [_event("content_block_start", index=index, content_block={"type": "text", "text": ""}),
                  _event("content_block_delta", index=index, delta={"type": "text_delta", "text": block.text})]
    else:
        events = [_event("content_block_start", index=index,
                         content_block={"type": "tool_use", "id": block.id, "name": block.name, "input": {}}),
                  _event("content_block_delta", index=index,
                         delta={"type": "input_json_delta", "partial_json": json.dumps(block.input)})]
    return [*events, _event("content_block_stop", index=index)]
