"""The Files and Batch APIs at the HTTP door, with the official openai client in process (ASGI): a batch to
completion with its output file parsed, cancel, lists, another tenant's ids (404), a malformed line and an
oversize file (400 and 413 in OpenAI's error shape)."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import openai
import pytest

from herd.platform.batch.service import BatchLimits
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.http_app import create_app
from tests.unit.platform.batch.world import chat_lines, make_world


@pytest.fixture
def world(tmp_path, core):
    return make_world(tmp_path, LocalBackend(core, max_ongoing_requests=8, max_queued_requests=8),
                      limits=BatchLimits(max_file_bytes=4096, max_queued_lines=10))


def _client(world, tenant):
    app = create_app(world.gateway, batches=world.batches)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://herd/v1")
    return openai.AsyncOpenAI(api_key=world.keys[tenant], base_url="http://herd/v1", http_client=http,
                              max_retries=0)


def _run(world, body):
    async def main():
        world.ledger.start()
        runner = world.runner()
        runner.start()
        try:
            return await body(_client(world, "acme"), _client(world, "umbrella"))
        finally:
            await runner.stop()
            await world.ledger.close()

    return asyncio.run(main())


async def _done(client, batch_id):
    batch = None

    async def finished():
        nonlocal batch
        batch = await client.batches.retrieve(batch_id)
        return batch.status in ("completed", "failed", "expired", "cancelled")

    deadline = asyncio.get_running_loop().time() + 60
    while not await finished():
        assert asyncio.get_running_loop().time() < deadline, f"batch still {batch.status}"
        await asyncio.sleep(0.05)
    return batch


def test_files_and_a_batch_to_completion_with_the_output_file_parsed(world):
    async def body(acme, _):
        upload = await acme.files.create(file=("in.jsonl", io.BytesIO(chat_lines(3))), purpose="batch")
        batch = await acme.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                          completion_window="24h", metadata={"team": "search"})
        done = await _done(acme, batch.id)
        output = (await acme.files.content(done.output_file_id)).content
        listed = await acme.batches.list(limit=5)
        files = await acme.files.list()
        return upload, batch, done, output, listed, files, await acme.files.retrieve(upload.id)

    upload, batch, done, output, listed, files, again = _run(world, body)
    assert (upload.purpose, upload.bytes, upload.filename) == ("batch", len(chat_lines(3)), "in.jsonl")
    assert again.id == upload.id
    assert batch.status == "in_progress" and batch.metadata == {"team": "search"}
    assert batch.request_counts.total == 3 and batch.expires_at == batch.created_at + 86400
    assert done.status == "completed" and done.request_counts.completed == 3 and done.error_file_id is None
    lines = [json.loads(x) for x in output.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["req-0", "req-1", "req-2"]
    assert all(x["response"]["status_code"] == 200 and x["response"]["body"]["choices"][0]["message"]["role"]
               == "assistant" for x in lines)
    assert [b.id for b in listed.data] == [batch.id]
    assert {f.id for f in files.data} == {upload.id, done.output_file_id}
    assert {f.purpose for f in files.data} == {"batch", "batch_output"}


def test_a_batch_of_responses_api_requests_to_completion(world):
    lines = [{"custom_id": f"r-{i}", "method": "POST", "url": "/v1/responses",
              "body": {"model": "scout", "input": f"Say {i}.", "max_output_tokens": 6, "temperature": 0}}
             for i in range(2)]
    lines.append({"custom_id": "r-bad", "method": "POST", "url": "/v1/responses",
                  "body": {"model": "scout", "input": "x", "previous_response_id": "resp_nope"}})
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()

    async def body(acme, _):
        upload = await acme.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = await acme.batches.create(input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h")
        done = await _done(acme, batch.id)
        return done, (await acme.files.content(done.output_file_id)).content, \
            (await acme.files.content(done.error_file_id)).content

    done, output, errors = _run(world, body)
    assert done.status == "completed" and done.request_counts.completed == 2 and done.request_counts.failed == 1
    answers = {x["custom_id"]: x["response"]["body"] for x in map(json.loads, output.splitlines())}
    assert set(answers) == {"r-0", "r-1"}
    for answer in answers.values():
        assert answer["object"] == "response" and answer["output"][0]["type"] == "message"
        assert answer["usage"]["output_tokens"] > 0
    (failed,) = [json.loads(x) for x in errors.splitlines()]
    assert failed["custom_id"] == "r-bad" and failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"]["param"] == "previous_response_id"


def test_cancel_and_lists_newest_first(world):
    async def body(acme, _):
        upload = await acme.files.create(file=("in.jsonl", io.BytesIO(chat_lines(2, max_tokens=64))), purpose="batch")
        first = await acme.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
        cancelling = await acme.batches.cancel(first.id)
        second = await acme.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                           completion_window="24h")
        cancelled = await _done(acme, first.id)
        page = await acme.batches.list(limit=1)
        rest = await acme.batches.list(limit=1, after=page.data[0].id)
        await _done(acme, second.id)
        return first, cancelling, cancelled, second, page, rest

    first, cancelling, cancelled, second, page, rest = _run(world, body)
    assert cancelling.status == "cancelling" and cancelled.status == "cancelled"
    assert cancelled.cancelled_at is not None
    assert cancelled.request_counts.completed + cancelled.request_counts.failed < 2 or cancelled.output_file_id
    assert [b.id for b in page.data] == [second.id] and page.has_more
    assert [b.id for b in rest.data] == [first.id] and not rest.has_more


def test_another_tenants_files_and_batches_are_not_found(world):
    async def body(acme, umbrella):
        upload = await acme.files.create(file=("in.jsonl", io.BytesIO(chat_lines(1))), purpose="batch")
        batch = await acme.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
        refusals = []
        for call in (lambda: umbrella.files.retrieve(upload.id), lambda: umbrella.files.content(upload.id),
                     lambda: umbrella.files.delete(upload.id), lambda: umbrella.batches.retrieve(batch.id),
                     lambda: umbrella.batches.cancel(batch.id),
                     lambda: umbrella.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                                     completion_window="24h")):
            with pytest.raises(openai.NotFoundError) as caught:
                await call()
            refusals.append(caught.value)
        theirs = (await umbrella.batches.list()).data, (await umbrella.files.list()).data
        await _done(acme, batch.id)
        deleted = await acme.files.delete(upload.id)
        with pytest.raises(openai.NotFoundError):
            await acme.files.retrieve(upload.id)
        return refusals, theirs, deleted

    refusals, theirs, deleted = _run(world, body)
    assert all(r.status_code == 404 and r.body["type"] == "invalid_request_error" for r in refusals)
    assert theirs == ([], [])
    assert deleted.deleted


def test_a_malformed_line_refuses_the_batch_naming_the_line(world):
    good = chat_lines(1).decode()
    bad = good.replace('"req-0"', '"req-1"').replace('"POST"', '"GET"')

    async def body(acme, _):
        upload = await acme.files.create(file=("in.jsonl", io.BytesIO((good + bad).encode())), purpose="batch")
        with pytest.raises(openai.BadRequestError) as caught:
            await acme.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        other = await acme.files.create(file=("in.jsonl", io.BytesIO(chat_lines(1))), purpose="batch")
        with pytest.raises(openai.BadRequestError) as wrong_endpoint:
            await acme.batches.create(input_file_id=other.id, endpoint="/v1/completions", completion_window="24h")
        return caught.value, wrong_endpoint.value, (await acme.batches.list()).data

    refused, wrong_endpoint, batches = _run(world, body)
    assert "line 2: method must be" in refused.message and refused.body["param"] == "input_file_id"
    assert "line 1: url '/v1/chat/completions' is not this batch's endpoint" in wrong_endpoint.message
    assert batches == [], "a refused batch is not made"


def test_an_oversize_file_and_a_full_queue_are_refused(world):
    async def body(acme, _):
        with pytest.raises(openai.APIStatusError) as oversize:
            await acme.files.create(file=("in.jsonl", io.BytesIO(b"x" * 5000)), purpose="batch")
        with pytest.raises(openai.BadRequestError) as purpose:
            await acme.files.create(file=("in.jsonl", io.BytesIO(chat_lines(1))), purpose="assistants")
        upload = await acme.files.create(file=("in.jsonl", io.BytesIO(chat_lines(11, max_tokens=1))), purpose="batch")
        with pytest.raises(openai.RateLimitError) as queue:
            await acme.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        return oversize.value, purpose.value, queue.value, (await acme.files.list()).data

    oversize, purpose, queue, files = _run(world, body)
    assert oversize.status_code == 413 and "over this server's limit of 4096" in oversize.message
    assert oversize.body["type"] == "invalid_request_error"
    assert purpose.body["param"] == "purpose"
    assert queue.body["code"] == "max_queued_lines"
    assert len(files) == 1, "a refused upload keeps nothing"


def test_a_body_that_is_not_a_form_is_a_400(world):
    async def main():
        app = create_app(world.gateway, batches=world.batches)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://herd") as http:
            auth = {"authorization": f"Bearer {world.keys['acme']}"}
            answers = [await http.post("/v1/files", content=b"{}", headers=auth | {"content-type": "application/json"}),
                       await http.post("/v1/files", content=b"--x\r\nbroken", headers=auth | {
                           "content-type": "multipart/form-data; boundary=x"}),
                       await http.post("/v1/files", files={"purpose": (None, "batch")}, headers=auth),
                       await http.get("/v1/files", headers={})]
        return answers

    answers = asyncio.run(main())
    assert [a.status_code for a in answers] == [400, 400, 400, 401]
    assert all("error" in a.json() for a in answers)
