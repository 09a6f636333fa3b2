"""A streamed response's typed events, in the order OpenAI sends them:

    response.created, response.in_progress,
    per output item: response.output_item.added,
      a message: response.content_part.added, response.output_text.delta..., response.output_text.done,
                 response.content_part.done
      a function call: response.function_call_arguments.delta, response.function_call_arguments.done
    response.output_item.done; then response.completed (response.incomplete when max_output_tokens cut it).

Each event carries its sequence_number (0, 1, ...). Text streams as it comes; with tools on offer it is held
until the reply ends, when it is known to be calls or text (the chat door's rule).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from herd.platform.gateway.openai_translate import Collected
from herd.platform.gateway.responses_models import OutputFunctionCall, OutputMessage, ResponseObject, ResponseUsage
from herd.platform.gateway.responses_translate import Reply, dumped, reply, text_message, usage
from herd.protos.herd.v1 import inference_pb2 as pb

Finish = Callable[[Reply, ResponseUsage], Awaitable[ResponseObject]]
"""Makes (and stores) the finished response from the reply and its usage."""


async def response_events(started: ResponseObject, chunks: AsyncIterator[pb.GenerateChunk], *, prompt_tokens: int,
                          names: list[str], finish: Finish) -> AsyncGenerator[dict[str, Any], None]:
    """The events of one response; `started` is it in progress (no output yet)."""
    sequence = 0

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        nonlocal sequence
        sequence += 1
        return {"type": kind, "sequence_number": sequence - 1, **fields}

    yield event("response.created", response=dumped(started))
    yield event("response.in_progress", response=dumped(started))
    got = Collected()
    streaming: OutputMessage | None = None  # the message item whose text streams (no tools on offer)
    async for chunk in chunks:
        got.text += chunk.text
        got.token_ids += list(chunk.token_ids)
        if chunk.finish_reason:
            got.finish_reason, got.usage = chunk.finish_reason, chunk.usage
        if names or not chunk.text:
            continue
        if streaming is None:
            streaming = text_message("", "in_progress")
            for opened in _message_opened(streaming, event):
                yield opened
        yield event("response.output_text.delta", item_id=streaming.id, output_index=0, content_index=0,
                    delta=chunk.text, logprobs=[])
    done = reply(got.text, got.finish_reason, names)
    if streaming is not None:  # the one text message: keep the id its deltas named
        done.output[0].id = streaming.id
    for index, item in enumerate(done.output):
        if isinstance(item, OutputFunctionCall):
            for call_event in _call_events(item, index, event):
                yield call_event
            continue
        if index > 0 or streaming is None:
            for opened in _message_opened(item, event, index):
                yield opened
            if item.content[0].text:
                yield event("response.output_text.delta", item_id=item.id, output_index=index, content_index=0,
                            delta=item.content[0].text, logprobs=[])
        for closed in _message_closed(item, event, index):
            yield closed
    finished = await finish(done, usage(prompt_tokens, got))
    kind = "response.incomplete" if finished.status == "incomplete" else "response.completed"
    yield event(kind, response=dumped(finished))


def _message_opened(item: OutputMessage, event: Callable[..., dict[str, Any]],
                    index: int = 0) -> list[dict[str, Any]]:
    opened = OutputMessage(id=item.id, status="in_progress", content=[])
    return [event("response.output_item.added", output_index=index, item=dumped(opened)),
            event("response.content_part.added", item_id=item.id, output_index=index, content_index=0,
                  part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]


def _message_closed(item: OutputMessage, event: Callable[..., dict[str, Any]], index: int) -> list[dict[str, Any]]:
    part = item.content[0]
    return [event("response.output_text.done", item_id=item.id, output_index=index, content_index=0, text=part.text,
                  logprobs=[]),
            event("response.content_part.done", item_id=item.id, output_index=index, content_index=0,
                  part=dumped(part)),
            event("response.output_item.done", output_index=index, item=dumped(item))]


def _call_events(item: OutputFunctionCall, index: int, event: Callable[..., dict[str, Any]]) -> list[dict[str, Any]]:
    opened = item.model_copy(update={"arguments": "", "status": "in_progress"})
    return [event("response.output_item.added", output_index=index, item=dumped(opened)),
            event("response.function_call_arguments.delta", item_id=item.id, output_index=index,
                  delta=item.arguments),
            event("response.function_call_arguments.done", item_id=item.id, output_index=index, name=item.name,
                  arguments=item.arguments),
            event("response.output_item.done", output_index=index, item=dumped(item))]
