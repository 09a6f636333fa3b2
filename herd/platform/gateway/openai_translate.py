"""OpenAI shapes <-> the gateway's: requests into Prepared requests, chunk streams into responses.

Pure functions except for reading the chunk stream and image URLs; the HTTP routes are thin wrappers
around these. A request of n choices gets chunks of each choice (GenerateChunk.index) interleaved: whole, they
become n choices in index order; streamed, each event carries its choice's index. Usage counts the prompt once
and the completion tokens of every choice (best_of: of the n returned).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from herd.engine.errors import HerdError
from herd.engine.sampling_params import checked_logit_bias
from herd.model.tool_calls import arguments_json, offer_tools, parse_tool_calls
from herd.platform.gateway.core import Gateway, Prepared
from herd.platform.gateway.forced_tools import constrain_to_calls
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
    JsonObjectFormat,
    JsonSchemaResponseFormat,
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
    structured = _structured(request)
    if structured is not None:
        options.structured.CopyFrom(structured)
    max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens
    if request.n != 1:
        options.n = request.n
    best_of = getattr(request, "best_of", None)
    if best_of is not None:
        options.best_of = best_of
    if not request.speculative:  # unset on the wire: the replica's default, speculate
        options.speculative = False
    for name, value in (("temperature", request.temperature), ("top_p", request.top_p), ("max_tokens", max_tokens),
                        ("seed", request.seed), ("top_k", request.top_k), ("min_p", request.min_p),
                        ("logprobs", logprobs), ("presence_penalty", request.presence_penalty),
                        ("frequency_penalty", request.frequency_penalty),
                        ("repetition_penalty", request.repetition_penalty), ("min_tokens", request.min_tokens),
                        ("prompt_logprobs", request.prompt_logprobs)):
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
                       image_urls: ImageUrlPolicy, *, request_id: str | None = None) -> Prepared:
    """The chat as the gateway takes it; image_url parts are read (data: URLs) or fetched (http(s), where
    allowed) by the gateway only once the model is authorised and the image count checked. A forced tool
    choice ("required" or a named function) constrains the output to calls of the offered functions."""
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    tools = [t.function.model_dump(exclude_none=True) for t in request.tools or []]
    choice = request.tool_choice
    tool_choice = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice
    offered = [{"type": "function", "function": t} for t in tools]
    options = constrain_to_calls(sampling(request, logprobs=logprobs), offered, tool_choice,
                                 parallel=request.parallel_tool_calls is not False)

    async def load_image(url: str) -> bytes:
        return await image_bytes(url, image_urls)

    try:
        return await gateway.prepare_chat(
            request.model, [_message(m) for m in request.messages], options,
            tools=offered or None, tool_choice=tool_choice,
            identity=identity, load_image=load_image, request_id=request_id,
        )
    except HerdError as err:
        raise _renamed(err, constraint_field(request)) from None


def _structured(request: ChatCompletionRequest | CompletionRequest) -> pb.StructuredOutput | None:
    """response_format (json_schema, json_object) or the structured_outputs extension, on the wire."""
    fmt, ext = request.response_format, request.structured_outputs
    if isinstance(fmt, JsonSchemaResponseFormat):
        return pb.StructuredOutput(json_schema=json.dumps(fmt.json_schema.schema_, separators=(",", ":")))
    if isinstance(fmt, JsonObjectFormat):
        return pb.StructuredOutput(json_object=True)
    if ext is None:
        return None
    if ext.json_ is not None:
        return pb.StructuredOutput(json_schema=json.dumps(ext.json_, separators=(",", ":")))
    if ext.choice is not None:
        return pb.StructuredOutput(choice=pb.Choices(choices=ext.choice))
    return pb.StructuredOutput(regex=ext.regex) if ext.regex is not None else pb.StructuredOutput(grammar=ext.grammar)


def constraint_field(request: ChatCompletionRequest | CompletionRequest) -> str:
    """The request field its output constraint came from, named when a replica refuses the constraint."""
    if request.structured_outputs is not None:
        return "structured_outputs"
    if request.response_format is not None and request.response_format.type != "text":
        return "response_format"
    return "tool_choice"


async def named_errors(chunks: AsyncGenerator[pb.GenerateChunk, None], field: str,
                       ) -> AsyncGenerator[pb.GenerateChunk, None]:
    """The chunks, with a replica's refusal of the wire's "structured" field renamed to the request's own."""
    async with contextlib.aclosing(chunks):  # closing this stream closes (aborts) the request's
        try:
            async for chunk in chunks:
                yield chunk
        except HerdError as err:
            raise _renamed(err, field) from None


def _renamed(err: HerdError, field: str) -> HerdError:
    if err.param == "structured":
        err.param = field
        err.message = err.message.replace("structured", field, 1)
    return err


async def prepare_completion(gateway: Gateway, request: CompletionRequest, identity: Any, *,
                             request_id: str | None = None) -> Prepared:
    """With echo the replica puts the prompt's text first, and with logprobs too scores the prompt (as many
    alternatives as logprobs or prompt_logprobs asks, whichever is more)."""
    options = sampling(request, logprobs=request.logprobs)
    if request.echo:
        options.echo = True
        if request.logprobs is not None:
            options.prompt_logprobs = max(request.logprobs, request.prompt_logprobs or 0)
    try:
        return await gateway.prepare_text(request.model, request.prompt, options, identity=identity,
                                          request_id=request_id)
    except HerdError as err:
        raise _renamed(err, constraint_field(request)) from None


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
    prompt_logprobs: list[pb.TokenLogprob] = field(default_factory=list)
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
        out.prompt_logprobs += list(chunk.prompt_logprobs)
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


def completion_logprobs(entries: list[pb.TokenLogprob], *, special: frozenset[int] = frozenset(), start: int = 0,
                        unscored: int = 0, top: int | None = None) -> dict[str, Any]:
    """OpenAI's legacy logprobs object. text_offset is where each token's text starts in the choice's text,
    counting from `start` (a special token spells none of it: the text leaves them out); the first `unscored`
    entries (the first prompt token, with echo) have null logprob and top_logprobs; `top` alternatives at most."""
    offsets, at = [], start
    for e in entries:
        offsets.append(at)
        at += 0 if e.token_id in special else len(e.token)
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [None if i < unscored else e.logprob for i, e in enumerate(entries)],
            "top_logprobs": [None if i < unscored else {t.token: t.logprob for t in e.top[:top]}
                             for i, e in enumerate(entries)],
            "text_offset": offsets}


def vllm_prompt_logprobs(entries: list[pb.TokenLogprob], top: int) -> list[dict[str, Any] | None]:
    """vLLM's prompt_logprobs: None for the first prompt token, then per token {token id: {logprob, rank,
    decoded_token}} for the token itself (first; rank null when it is not among the alternatives returned) and
    its `top` alternatives (rank 1 first)."""
    out: list[dict[str, Any] | None] = [None] if entries else []
    for e in entries[1:]:
        rank = next((i + 1 for i, t in enumerate(e.top) if t.token_id == e.token_id), None)
        scored = {str(e.token_id): {"logprob": e.logprob, "rank": rank, "decoded_token": e.token}}
        for i, t in enumerate(e.top[:top]):
            scored.setdefault(str(t.token_id), {"logprob": t.logprob, "rank": i + 1, "decoded_token": t.token})
        out.append(scored)
    return out


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
                                  logprobs=chat_logprobs(one.logprobs) if request.logprobs else None,
                                  prompt_logprobs=_prompt_logprobs(request, one.prompt_logprobs)))
    return ChatCompletion(id=f"chatcmpl-{prepared.request.request_id}", created=int(time.time()), model=request.model,
                          choices=choices, usage=_usage_of(prepared, got))


def _prompt_logprobs(request: ChatCompletionRequest | CompletionRequest,
                     entries: list[pb.TokenLogprob]) -> list[dict[str, Any] | None] | None:
    return vllm_prompt_logprobs(entries, request.prompt_logprobs) if request.prompt_logprobs is not None else None


def _echoed(request: CompletionRequest, chunk_entries: list[pb.TokenLogprob],
            prompt_entries: list[pb.TokenLogprob]) -> tuple[list[pb.TokenLogprob], int]:
    """The entries a completion's logprobs cover: with echo the prompt's first (the first unscored)."""
    if request.echo and prompt_entries:
        return prompt_entries + chunk_entries, 1
    return chunk_entries, 0


def completion(request: CompletionRequest, prepared: Prepared, got: list[Collected]) -> Completion:
    """Each choice's text is the replica's (the prompt's first, with echo)."""
    choices = []
    for one in got:
        logprobs = None
        if request.logprobs is not None:
            entries, unscored = _echoed(request, one.logprobs, one.prompt_logprobs)
            logprobs = completion_logprobs(entries, special=prepared.backend.tokenizer.special_ids,
                                           unscored=unscored, top=request.logprobs)
        choices.append(CompletionChoice(index=one.index, text=one.text, finish_reason=one.finish_reason,
                                        logprobs=logprobs,
                                        prompt_logprobs=_prompt_logprobs(request, one.prompt_logprobs)))
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

    def event(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None,
              prompt_logprobs: list[dict[str, Any] | None] | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        if prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs
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
        scored = _prompt_logprobs(request, list(chunk.prompt_logprobs)) if chunk.prompt_logprobs else None
        if names:
            held[chunk.index] = held.get(chunk.index, "") + chunk.text
            if scored is not None:
                yield event(chunk.index, {}, prompt_logprobs=scored)
        elif chunk.text or lp or scored is not None:
            yield event(chunk.index, {"content": chunk.text}, logprobs=lp, prompt_logprobs=scored)
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
    at: dict[int, int] = {}  # per choice: the text offset where its next chunk's tokens start
    special = prepared.backend.tokenizer.special_ids
    async for chunk in chunks:
        count += len(chunk.token_ids)
        lp = None
        if request.logprobs is not None:
            entries, unscored = _echoed(request, list(chunk.logprobs), list(chunk.prompt_logprobs))
            start = at.get(chunk.index, 0)
            lp = completion_logprobs(entries, special=special, start=start, unscored=unscored, top=request.logprobs)
            at[chunk.index] = start + sum(len(e.token) for e in entries if e.token_id not in special)
        choice = {"index": chunk.index, "text": chunk.text, "finish_reason": chunk.finish_reason or None,
                  "logprobs": lp}
        if request.prompt_logprobs is not None and chunk.prompt_logprobs:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(list(chunk.prompt_logprobs), request.prompt_logprobs)
        if chunk.finish_reason:
            finals[chunk.index] = chunk.usage
        yield {**base, "choices": [choice]}
    if request.stream_options is not None and request.stream_options.include_usage:
        yield {**base, "choices": [], "usage": usage(prepared, list(finals.values()), count).model_dump()}


def sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
