"""The Responses API door through the official openai client, in process, over a real tiny replica: a plain
response is the chat door's answer to the same chat, streamed it is the same text in OpenAI's event order,
previous_response_id continues the stored conversation, retrieve and delete, and bad input is a 4xx naming it."""

from __future__ import annotations

import asyncio
import base64

import httpx
import openai
import pytest

from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.http_app import create_app
from herd.platform.tenancy.database import connect
from herd.platform.tenancy.responses import ResponseStore
from tests.images import random_png

HELLO = "Tell me about the herd."


class Recording:
    """A backend that keeps every prompt it is asked to continue (as text) and passes the request on."""

    def __init__(self, inner):
        self.inner, self.prompts = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, request):
        self.prompts.append(self.inner.tokenizer.decode(list(request.token_ids.ids), skip_special_tokens=False))
        return self.inner.generate(request)


@pytest.fixture
def backend(core):
    return Recording(LocalBackend(core, max_ongoing_requests=4, max_queued_requests=4))


def _with_client(backend, body):
    async def main():
        app = create_app(Gateway({"scout": backend}))
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://herd/v1")
        async with openai.AsyncOpenAI(api_key="unused", base_url="http://herd/v1", http_client=http) as client:
            return await body(client)

    return asyncio.run(main())


def test_a_plain_response_is_the_chat_doors_answer_with_usage(backend):
    async def body(client):
        chat = await client.chat.completions.create(model="scout", messages=[
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": HELLO}],
            max_tokens=8, temperature=0)
        response = await client.responses.create(model="scout", instructions="Be brief.", input=HELLO,
                                                 max_output_tokens=8, temperature=0, metadata={"run": "1"})
        cut = await client.responses.create(model="scout", input=HELLO, max_output_tokens=1, temperature=0)
        return chat, response, cut

    chat, response, cut = _with_client(backend, body)
    assert backend.prompts[0] == backend.prompts[1], "instructions are the system message, input the user's"
    assert response.id.startswith("resp_") and response.object == "response" and response.model == "scout"
    assert response.output_text == chat.choices[0].message.content
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == chat.usage.total_tokens
    assert response.usage.input_tokens_details.cached_tokens >= 0
    assert response.instructions == "Be brief." and response.metadata == {"run": "1"} and response.store is True
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 1


def test_streamed_events_come_in_openais_order_and_spell_the_same_text(backend):
    async def body(client):
        whole = await client.responses.create(model="scout", input=HELLO, max_output_tokens=10, temperature=0)
        stream = await client.responses.create(model="scout", input=HELLO, max_output_tokens=10, temperature=0,
                                               stream=True)
        events = [event async for event in stream]
        fetched = await client.responses.retrieve(events[-1].response.id)
        return whole, events, fetched

    whole, events, fetched = _with_client(backend, body)
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1
    done = "response.incomplete" if whole.status == "incomplete" else "response.completed"
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done", done]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    item_id = events[2].item.id
    assert {e.item_id for e in events if hasattr(e, "item_id")} == {item_id}
    assert events[-4].text == text and events[-3].part.text == text and events[-2].item.content[0].text == text
    final = events[-1].response
    assert final.output_text == text and final.output[0].id == item_id
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert fetched.output_text == text, "a streamed response is stored too"


def test_previous_response_id_continues_the_stored_conversation(backend):
    async def body(client):
        first = await client.responses.create(model="scout", instructions="Only for the first.", input=HELLO,
                                              max_output_tokens=6, temperature=0)
        second = await client.responses.create(model="scout", previous_response_id=first.id,
                                               input=[{"role": "user", "content": "And the goats?"}],
                                               max_output_tokens=6, temperature=0)
        third = await client.responses.create(model="scout", previous_response_id=second.id, input="Why?",
                                              max_output_tokens=2, temperature=0, store=False)
        unstored = await _status(client.responses.retrieve(third.id))
        return first, second, third, unstored

    first, second, third, unstored = _with_client(backend, body)
    prompt = backend.prompts[1]
    assert HELLO in prompt and first.output_text in prompt and "And the goats?" in prompt
    assert prompt.index(HELLO) < prompt.index("And the goats?")
    assert "Only for the first." not in prompt, "instructions are not carried over (OpenAI's rule)"
    assert second.previous_response_id == first.id and third.previous_response_id == second.id
    assert all(part in backend.prompts[2] for part in (HELLO, "And the goats?", second.output_text, "Why?"))
    assert unstored == 404, "store false keeps nothing"


async def _status(call):
    try:
        await call
    except openai.APIStatusError as err:
        return err.status_code
    return 200


def test_retrieve_and_delete_and_unknown_ids_are_404(backend):
    async def body(client):
        made = await client.responses.create(model="scout", input=HELLO, max_output_tokens=3)
        fetched = await client.responses.retrieve(made.id)
        await client.responses.delete(made.id)
        gone = await _status(client.responses.retrieve(made.id))
        deleted_again = await _status(client.responses.delete(made.id))
        try:
            await client.responses.create(model="scout", input="x", previous_response_id="resp_nope")
        except openai.NotFoundError as err:
            unknown = err.body
        return made, fetched, gone, deleted_again, unknown

    made, fetched, gone, deleted_again, unknown = _with_client(backend, body)
    assert fetched.model_dump() == made.model_dump()
    assert gone == deleted_again == 404
    assert unknown["param"] == "previous_response_id" and unknown["type"] == "invalid_request_error"
    assert len(backend.prompts) == 1, "an unknown previous_response_id reaches no model"


@pytest.mark.parametrize(("item", "named"), [
    ({"type": "function_call", "name": "f", "arguments": "{}"}, "input[1] (function_call) call_id"),
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}, "input[1] (function_call 'f')"),
    ({"role": "narrator", "content": "x"}, "input[1] (message) role"),
    ({"type": "web_search_call", "id": "w"}, "input[1] (web_search_call)"),
    ({"role": "user", "content": [{"type": "input_audio", "data": "x"}]}, "input[1] (message) content"),
])
def test_a_malformed_item_is_400_naming_it(backend, item, named):
    async def body(client):
        try:
            await client.responses.create(model="scout", input=[{"role": "user", "content": "hi"}, item])
        except openai.BadRequestError as err:
            return err.body

    refused = _with_client(backend, body)
    assert refused["param"] == "input" and named in refused["message"], refused
    assert not backend.prompts


def test_a_store_whose_database_fails_is_503_not_500(backend, tmp_path):
    broken = ResponseStore(connect(f"sqlite:///{tmp_path / 'unmigrated.db'}"))  # no stored_responses table

    async def main():
        app = create_app(Gateway({"scout": backend}), responses=broken)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://herd") as client:
            return [await client.get("/v1/responses/resp_1"),
                    await client.post("/v1/responses", json={"model": "scout", "input": "x", "max_output_tokens": 2})]

    for answer in asyncio.run(main()):
        assert answer.status_code == 503 and answer.headers["retry-after"], answer.text


def test_an_input_image_counts_as_the_chat_doors_image_part(backend):
    url = "data:image/png;base64," + base64.b64encode(random_png(120, 90, seed=1)).decode()

    async def body(client):
        chat = await client.chat.completions.create(model="scout", max_tokens=2, temperature=0, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}])
        response = await client.responses.create(model="scout", max_output_tokens=2, temperature=0, input=[
            {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                         {"type": "input_image", "image_url": url}]}])
        return chat, response

    chat, response = _with_client(backend, body)
    assert backend.prompts[0] == backend.prompts[1] and "<|image|>" in backend.prompts[1]
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.output_text == chat.choices[0].message.content
