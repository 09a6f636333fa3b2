"""OpenAI shapes <-> the gateway's: requests into Prepared requests, chunk streams into responses.

Pure functions except for reading the chunk stream and image URLs; the HTTP routes are thin wrappers
around these. A request of n choices gets chunks of each choice (GenerateChunk.index) interleaved: whole, they
become n choices in index order; streamed, each event carries its choice's index. Usage counts the prompt once
and the completion tokens of every choice (best_of: of the n returned).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from herd.engine.sampling_params import checked_logit_bias
from herd.model.tool_calls import arguments_json, offer_tools, parse_tool_calls
from herd.platform.gateway.core import Gateway, Prepared
from herd.platform.gateway.image_urls import ImageUrlPolicy, image_bytes
from herd.platform.gateway.openai_models import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionRequest,
    FunctionCall,
    NamedToolChoice,
    PromptTokensDetails,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from herd.protos.herd.v1 import inference_pb2 as pb


def sampling(request: ChatCompletionRequest | CompletionRequest, *, logprobs: int | None) -> pb.SamplingOptions:
    options = pb.SamplingOptions(ignore_eos=request.ignore_eos)
    max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens
    if request.n != 1:
        options.n = request.n
    best_of = getattr(request, "best_of", None)
    if best_of is not None:
        options.best_of = best_of
    for name, value in (("temperature", request.temperature), ("top_p", request.top_p), ("max_tokens", max_tokens),
                        ("seed", request.seed), ("top_k", request.top_k), ("min_p", request.min_p),
                        ("logprobs", logprobs), ("presence_penalty", request.presence_penalty),
                        ("frequency_penalty", request.frequency_penalty),
                        ("repetition_penalty", request.repetition_penalty), ("min_tokens", request.min_tokens)):
        if value is not None:
            setattr(options, name, value)
    for token, bias in checked_logit_bias(request.logit_bias or {}):
        options.logit_bias[token] = bias
    if request.bad_words:
        options.bad_words.extend(request.bad_words)
    if request.stop is not None:
        options.stop.extend([request.stop] if isinstance(request.stop, str) else request.stop)
    if request.stop_token_ids:
        options.stop_token_ids.extend(request.stop_token_ids)
    return options


async def prepare_chat(gateway: Gateway, request: ChatCompletionRequest, identity: Any,
                       image_urls: ImageUrlPolicy) -> Prepared:
    """The chat as the gateway takes it; image_url parts are read (data: URLs) or fetched (http(s), where
    allowed) by the gateway only once the model is authorised and the image count checked."""
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    tools = [t.function.model_dump(exclude_none=True) for t in request.tools or []]
    choice = request.tool_choice
    tool_choice = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice

    async def load_image(url: str) -> bytes:
        return await image_bytes(url, image_urls)

    return await gateway.prepare_chat(
        request.model, [_message(m) for m in request.messages], sampling(request, logprobs=logprobs),
        tools=[{"type": "function", "function": t} for t in tools] or None, tool_choice=tool_choice, identity=identity,
        load_image=load_image,
    )


async def prepare_completion(gateway: Gateway, request: CompletionRequest, identity: Any) -> Prepared:
    return await gateway.prepare_text(request.model, request.prompt, sampling(request, logprobs=request.logprobs),
                                      identity=identity)


def _message(message: ChatMessage) -> dict[str, Any]:
    """An OpenAI message as the gateway takes it (an image part keeps its URL, read after authorisation)."""
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role}
    if isinstance(message.content, list):
        out["content"] = [{"type": "image_url", "url": part.image_url.url} if part.type == "image_url"
                          else {"type": "text", "text": part.text} for part in message.content]
    else:
        out["content"] = message.content if message.content is not None else ""
    if message.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in message.tool_calls]
    for key in ("tool_call_id", "name"):
        if getattr(message, key):
            out[key] = getattr(message, key)
    return out


@dataclass
class Collected:
    """One choice of a whole response, gathered from the chunk stream."""

    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: pb.Usage | None = None


async def collect(chunks: AsyncIterator[pb.GenerateChunk]) -> list[Collected]:
    """Every choice of the response, in index order."""
    choices: dict[int, Collected] = {}
    async for chunk in chunks:
        out = choices.setdefault(chunk.index, Collected(index=chunk.index))
        out.text += chunk.text
        out.token_ids += list(chunk.token_ids)
        out.logprobs += list(chunk.logprobs)
        if chunk.finish_reason:
            out.finish_reason = chunk.finish_reason
            out.usage = chunk.usage
    return [choices[index] for index in sorted(choices)] or [Collected()]


def usage(prepared: Prepared, finals: list[pb.Usage | None], completion_tokens: int) -> Usage:
    """The prompt once; the completion tokens of every choice (each one's final usage where it came, else the
    tokens counted in the stream); the cached prompt tokens once."""
    done = [u for u in finals if u is not None]
    completion = sum(u.completion_tokens for u in done) if done and len(done) == len(finals) else completion_tokens
    cached = done[0].cached_tokens if done else 0
    return Usage(prompt_tokens=prepared.prompt_tokens, completion_tokens=completion,
                 total_tokens=prepared.prompt_tokens + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def _usage_of(prepared: Prepared, got: list[Collected]) -> Usage:
    return usage(prepared, [c.usage for c in got], sum(len(c.token_ids) for c in got))


def chat_logprobs(entries: list[pb.TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
                     top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()))
                                   for t in e.top])
        for e in entries
    ])


def completion_logprobs(entries: list[pb.TokenLogprob]) -> dict[str, Any]:
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries], "text_offset": offsets}


def tool_names(request: ChatCompletionRequest) -> list[str]:
    """Functions the model may call in this request (none when tool_choice is "none"; only the named one
    when tool_choice names one)."""
    if not request.tools:
        return []
    choice = request.tool_choice
    tools = [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in request.tools]
    try:
        named = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice or "auto"
        return sorted(offer_tools(tools, named).names)
    except ValueError:
        return []  # prepare_chat has refused such a request already


def assistant_message(text: str, names: list[str]) -> tuple[AssistantMessage, bool]:
    """The reply, with tool calls parsed out of it when tools were offered; (message, has tool calls)."""
    if names:
        parsed = parse_tool_calls(text, names)
        if parsed.calls:
            calls = [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                              function=FunctionCall(name=c.name, arguments=arguments_json(c)))
                     for c in parsed.calls]
            return AssistantMessage(content=parsed.content or None, tool_calls=calls), True
    return AssistantMessage(content=text), False


def chat_completion(request: ChatCompletionRequest, prepared: Prepared, got: list[Collected]) -> ChatCompletion:
    """The whole chat response: each choice's tool calls parsed from its own text."""
    names = tool_names(request)
    choices = []
    for one in got:
        message, called = assistant_message(one.text, names)
        choices.append(ChatChoice(index=one.index, message=message,
                                  finish_reason="tool_calls" if called else one.finish_reason,
                                  logprobs=chat_logprobs(one.logprobs) if request.logprobs else None))
    return ChatCompletion(id=f"chatcmpl-{prepared.request.request_id}", created=int(time.time()), model=request.model,
                          choices=choices, usage=_usage_of(prepared, got))


def completion(request: CompletionRequest, prepared: Prepared, got: list[Collected]) -> Completion:
    choices = [CompletionChoice(index=one.index, text=one.text, finish_reason=one.finish_reason,
                                logprobs=completion_logprobs(one.logprobs) if request.logprobs is not None else None)
               for one in got]
    return Completion(id=f"cmpl-{prepared.request.request_id}", created=int(time.time()), model=request.model,
                      choices=choices, usage=_usage_of(prepared, got))


async def chat_events(
    request: ChatCompletionRequest, prepared: Prepared, chunks: AsyncIterator[pb.GenerateChunk]
) -> AsyncIterator[dict[str, Any]]:
    """chat.completion.chunk objects, each of one choice (its index). With tools on offer a choice's text is
    held until that choice ends, when it is either a tool call or plain content; otherwise content streams as it
    comes. Each choice opens with the assistant's role and ends with its finish reason."""
    base = {"id": f"chatcmpl-{prepared.request.request_id}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": request.model}
    names = tool_names(request)

    def event(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        return {**base, "choices": [choice]}

    for index in range(request.n):
        yield event(index, {"role": "assistant", "content": ""})
    held: dict[int, str] = {}
    count = 0
    finals: dict[int, pb.Usage | None] = dict.fromkeys(range(request.n))
    open_choices = set(range(request.n))
    async for chunk in chunks:
        count += len(chunk.token_ids)
        lp = chat_logprobs(list(chunk.logprobs)).model_dump() if request.logprobs and chunk.logprobs else None
        if names:
            held[chunk.index] = held.get(chunk.index, "") + chunk.text
        elif chunk.text or lp:
            yield event(chunk.index, {"content": chunk.text}, logprobs=lp)
        if chunk.finish_reason:
            finals[chunk.index] = chunk.usage
            open_choices.discard(chunk.index)
            delta, called = _held_reply(held.pop(chunk.index, ""), names)
            if delta:
                yield event(chunk.index, delta)
            yield event(chunk.index, {}, "tool_calls" if called else chunk.finish_reason)
    for index in sorted(open_choices):  # a stream that ended without this choice's last chunk
        delta, _ = _held_reply(held.pop(index, ""), names)
        if delta:
            yield event(index, delta)
        yield event(index, {}, None)
    if request.stream_options is not None and request.stream_options.include_usage:
        yield {**base, "choices": [], "usage": usage(prepared, list(finals.values()), count).model_dump()}


def _held_reply(held: str, names: list[str]) -> tuple[dict[str, Any] | None, bool]:
    """A choice's held text (tools on offer) at its end: the delta to send (tool calls, or the text; None when
    there is nothing), and whether it called a tool."""
    if not names:
        return None, False
    message, called = assistant_message(held, names)
    if called:
        calls = [{"index": i, **c.model_dump()} for i, c in enumerate(message.tool_calls or [])]
        return ({"content": message.content, "tool_calls": calls} if message.content else {"tool_calls": calls}), True
    return ({"content": held} if held else None), False


async def completion_events(
    request: CompletionRequest, prepared: Prepared, chunks: AsyncIterator[pb.GenerateChunk]
) -> AsyncIterator[dict[str, Any]]:
    base = {"id": f"cmpl-{prepared.request.request_id}", "object": "text_completion", "created": int(time.time()),
            "model": request.model}
    count = 0
    finals: dict[int, pb.Usage | None] = dict.fromkeys(range(request.n))
    async for chunk in chunks:
        count += len(chunk.token_ids)
        lp = completion_logprobs(list(chunk.logprobs)) if request.logprobs is not None else None
        choice = {"index": chunk.index, "text": chunk.text, "finish_reason": chunk.finish_reason or None,
                  "logprobs": lp}
        if chunk.finish_reason:
            finals[chunk.index] = chunk.usage
        yield {**base, "choices": [choice]}
    if request.stream_options is not None and request.stream_options.include_usage:
        yield {**base, "choices": [], "usage": usage(prepared, list(finals.values()), count).model_dump()}


def sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
