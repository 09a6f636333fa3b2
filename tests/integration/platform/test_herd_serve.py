"""`herd serve` as a user runs it (local Ray, Serve replica with 2 gRPC expert shards), through the
official openai client, a gRPC client built from protos/, and curl."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import anthropic
import grpc
import httpx
import jsonschema
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.prompt_images import ImageInput
from herd.model.chat_template import render_chat
from herd.model.image_prompts import ImagePrompts
from herd.model.tiny import make_tiny
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from tests.images import png_header_only, random_png
from tests.integration.platform.processes import free_port
from tests.structured_schemas import REGEXES, SCHEMAS

HELLO = [{"role": "user", "content": "Tell me about the herd."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("herd")
    scout = make_tiny(root / "scout", preset="scout", seed=12)
    maverick = make_tiny(root / "maverick", preset="maverick", seed=12)
    http_port, grpc_port, ops_port = free_port(), free_port(), free_port()
    config = root / "herd.yaml"
    config.write_text(json.dumps({
        "models": [{"name": "scout", "path": str(scout), "shards": 2},
                   {"name": "maverick", "path": str(maverick), "shards": 0}],
        # The embedded database (sqlite:///.herd/herd.db, in the working directory): a local herd serve makes
        # the development tenant there, and only there.
        "tenancy": {"admin_token_file": str(root / "admin-token"),
                    "spill_path": str(root / "spill.jsonl"), "usage_flush_interval_s": 0.2},
        "ops_port": ops_port,
    }))
    command = [sys.executable, "-m", "herd.cli", "serve", "--config", str(config), "--http-port", str(http_port),
               "--grpc-port", str(grpc_port)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    log_file = (root / "stderr.log").open("w")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env, cwd=root)
    lines: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            pytest.fail("herd serve exited:\n" + "".join(lines) + (root / "stderr.log").read_text()[-3000:])
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    else:
        proc.kill()
        pytest.fail("herd serve did not come up:\n" + "".join(lines))
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    banner = "".join(lines)
    key = re.search(r"export HERD_KEY=(hk_\w+)", banner).group(1)
    yield {"http": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}", "path": scout,
           "ops": f"http://127.0.0.1:{ops_port}",
           "banner": banner, "proc": proc, "key": key, "root": root, "command": command, "env": env,
           "admin": (root / "admin-token").read_text().strip(), "completed": []}
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
    log_file.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["http"] + "/v1", api_key=server["key"])


def _metadata(key):
    return (("authorization", f"Bearer {key}"),)


def test_openai_client_models_chat_stream_usage_logprobs(server, client):
    assert sorted(m.id for m in client.models.list().data) == ["maverick", "scout"]
    reply = client.chat.completions.create(model="scout", messages=HELLO, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=2)
    engine = LLMEngine.from_pretrained(server["path"], EngineConfig(kv_cache_mb=16))
    prompt = engine.tokenizer.encode(render_chat(HELLO))
    expected = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0]
    choice = reply.choices[0]
    assert choice.message.content == expected.text and choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == len(expected.token_ids)
    assert len(choice.logprobs.content) == len(expected.token_ids)
    stream = client.chat.completions.create(model="scout", messages=HELLO, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_openai_client_sends_penalties_logit_bias_and_herds_extra_fields(server, client):
    """OpenAI's own fields as the official client sends them, Herd's (min_tokens, bad_words) in extra_body."""
    engine = LLMEngine.from_pretrained(server["path"], EngineConfig(kv_cache_mb=16))
    forced = client.completions.create(model="scout", prompt="the herd", max_tokens=6, temperature=1.0, seed=4,
                                       logit_bias={"77": 100}, frequency_penalty=0.5, presence_penalty=-0.5,
                                       extra_body={"ignore_eos": True, "min_tokens": 6})
    assert forced.choices[0].text == engine.tokenizer.decode([77] * 6)
    assert forced.usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="scout", prompt="x", max_tokens=4, logit_bias={"77": 101})
    assert "logit_bias" in str(refused.value)


def test_openai_client_echo_with_logprobs_over_the_prompt(server, client):
    """Legacy completions' echo as the official client sends it: the prompt's text then the completion's, the
    logprobs over both (the first prompt token's null), and vLLM's prompt_logprobs in extra_body."""
    engine = LLMEngine.from_pretrained(server["path"], EngineConfig(kv_cache_mb=16))
    prompt = engine.tokenizer.encode("the herd", add_bos=True)
    expected = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    reply = client.completions.create(model="scout", prompt="the herd", max_tokens=5, temperature=0, echo=True,
                                      logprobs=2, extra_body={"ignore_eos": True, "prompt_logprobs": 1})
    choice = reply.choices[0]
    assert choice.text == "the herd" + expected.text
    assert len(choice.logprobs.tokens) == len(prompt) + 5 == len(choice.logprobs.token_logprobs)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(isinstance(v, float) for v in choice.logprobs.token_logprobs[1:])
    scored = choice.model_extra["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(prompt) == reply.usage.prompt_tokens
    assert reply.usage.completion_tokens == 5
    streamed = list(client.completions.create(model="scout", prompt="the herd", max_tokens=5, temperature=0,
                                              echo=True, stream=True, extra_body={"ignore_eos": True}))
    assert streamed[0].choices[0].text.startswith("the herd")
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_openai_client_n_choices_with_indexes_streamed_and_whole(server, client):
    """n over the official client: every choice with its index, streamed choices by index, usage summing the
    choices' tokens, best_of on completions, n past the cap a BadRequestError naming n; every block comes back."""
    chat = client.chat.completions.create(model="scout", messages=HELLO, max_tokens=5, temperature=1.0, n=3,
                                          extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert chat.usage.completion_tokens == 15
    stream = client.completions.create(model="scout", prompt="the herd", max_tokens=4, temperature=1.0, n=2,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert {c.index for chunk in chunks for c in chunk.choices} == {0, 1}
    assert sorted(c.index for chunk in chunks for c in chunk.choices if c.finish_reason) == [0, 1]
    assert chunks[-1].usage.completion_tokens == 8
    best = client.completions.create(model="scout", prompt="the herd", max_tokens=4, n=2, best_of=3,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in best.choices] == [0, 1] and best.usage.completion_tokens == 8
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="scout", messages=HELLO, max_tokens=4, n=17)
    assert refused.value.param == "n"
    assert _settled(server)


def _image_chat(*images: bytes, text: str = "What is in this picture?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}
             for data in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def test_openai_client_structured_outputs_and_a_forced_tool_call(server, client):
    """Through herd serve (Ray, the shards, tenancy): response_format json_schema and a regex give output that
    validates; a named tool_choice gives a call whose arguments match the tool's schema."""
    schema = SCHEMAS["nested"]
    for seed in range(5):
        reply = client.chat.completions.create(
            model="scout", messages=HELLO, max_tokens=200, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "user", "schema": schema, "strict": True}})
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    pattern = REGEXES[1]
    reply = client.completions.create(model="scout", prompt="the date", max_tokens=40, temperature=1.0, seed=1,
                                      extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, reply.choices[0].text, re.ASCII)
    tool = {"type": "function", "function": {"name": "count", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"],
        "additionalProperties": False}}}
    named = {"type": "function", "function": {"name": "count"}}
    reply = client.chat.completions.create(model="scout", messages=HELLO, max_tokens=100, temperature=1.0, seed=2,
                                           tools=[tool], tool_choice=named)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "count"
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="scout", messages=HELLO, max_tokens=4,
                                       extra_body={"structured_outputs": {"grammar": "start: nowhere"}})
    assert refused.value.param == "structured_outputs"


def test_anthropic_client_messages_plain_streamed_and_a_tool(server):
    """The official anthropic client through herd serve with API keys on (x-api-key): a plain message, the same
    message streamed, a forced tool call whose input validates and a tool_result turn after it; missing
    max_tokens and a bad key are Anthropic-shaped refusals."""
    claude = anthropic.Anthropic(base_url=server["http"], api_key=server["key"], max_retries=0)
    greedy = {"temperature": 0}
    plain = claude.messages.create(model="scout", max_tokens=12, messages=HELLO, extra_body=greedy)
    assert plain.id.startswith("msg_") and [b.type for b in plain.content] == ["text"]
    assert plain.stop_reason in ("end_turn", "max_tokens") and plain.usage.input_tokens > 0
    with claude.messages.stream(model="scout", max_tokens=12, messages=HELLO, extra_body=greedy) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == plain.content[0].text and final.usage.output_tokens == plain.usage.output_tokens
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    tools = [{"name": "count", "description": "Count the herd", "input_schema": schema}]
    called = claude.messages.create(model="scout", max_tokens=100, messages=HELLO, tools=tools,
                                    tool_choice={"type": "tool", "name": "count"}, extra_body={"temperature": 1.0})
    use = next(b for b in called.content if b.type == "tool_use")
    assert called.stop_reason == "tool_use" and use.name == "count" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, schema)
    answered = claude.messages.create(model="scout", max_tokens=8, tools=tools, extra_body=greedy, messages=[
        *HELLO, {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": "count",
                                                   "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "12 goats"}]}])
    assert answered.usage.input_tokens > called.usage.input_tokens
    with pytest.raises(anthropic.BadRequestError) as missing:
        claude.messages.create(model="scout", max_tokens=anthropic.omit, messages=HELLO, timeout=30)
    assert missing.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.AuthenticationError) as bad_key:
        anthropic.Anthropic(base_url=server["http"], api_key="hk_nope", max_retries=0).messages.create(
            model="scout", max_tokens=4, messages=HELLO)
    assert bad_key.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                             "message": bad_key.value.body["error"]["message"]}}


def test_openai_client_responses_plain_streamed_with_a_tool_and_previous_response_id(server, client):
    """The Responses API through herd serve with API keys on: plain and streamed (the same text at temperature 0,
    OpenAI's event order), a forced tool call whose arguments validate, a follow-up continuing a stored response,
    and another tenant's id a 404 (read or continued)."""
    whole = client.responses.create(model="scout", instructions="Be brief.", input="Tell me about the herd.",
                                    max_output_tokens=12, temperature=0)
    assert whole.status in ("completed", "incomplete") and whole.output[0].type == "message"
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    events = list(client.responses.create(model="scout", instructions="Be brief.", input="Tell me about the herd.",
                                          max_output_tokens=12, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    tool = {"type": "function", "name": "count", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"],
        "additionalProperties": False}}
    called = client.responses.create(model="scout", input="Count.", tools=[tool], tool_choice="required",
                                     parallel_tool_calls=False, max_output_tokens=100, temperature=1.0)
    [call] = [item for item in called.output if item.type == "function_call"]
    assert call.name == "count"
    jsonschema.validate(json.loads(call.arguments), tool["parameters"])
    follow = client.responses.create(model="scout", previous_response_id=whole.id, input="And then?",
                                     max_output_tokens=4, temperature=0)
    assert follow.previous_response_id == whole.id
    alone = client.responses.create(model="scout", input="And then?", max_output_tokens=1, temperature=0)
    assert follow.usage.input_tokens > alone.usage.input_tokens + whole.usage.output_tokens, "the first exchange"
    assert client.responses.retrieve(whole.id).output_text == whole.output_text
    assert _admin(server, "POST", "/tenants", json={"id": "responder", "allowed_models": ["*"]}).status_code == 201
    key = _admin(server, "POST", "/tenants/responder/keys", json={"name": "test"}).json()["key"]
    other = openai.OpenAI(base_url=server["http"] + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(whole.id)
    with pytest.raises(openai.NotFoundError) as refused:
        other.responses.create(model="scout", previous_response_id=whole.id, input="x", max_output_tokens=2)
    assert refused.value.body["param"] == "previous_response_id"


def test_openai_client_chat_with_an_image_counts_its_tokens(server, client):
    png = random_png(500, 260, seed=21)  # 1 x 2 tiles and the global tile: 437 image tokens
    reply = client.chat.completions.create(model="scout", messages=_image_chat(png), max_tokens=8, temperature=0)
    engine = LLMEngine.from_pretrained(server["path"], EngineConfig(kv_cache_mb=16))
    prompts = ImagePrompts.from_pretrained(server["path"])
    rendered = render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                               "text": "What is in this picture?"}]}])
    prompt = engine.tokenizer.encode(prompts.expand(rendered, [prompts.grid(png)]))
    [expected] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8),
                                 images=[ImageInput(prompts.pixel_values(png))])
    assert reply.choices[0].message.content == expected.text
    text_only = client.chat.completions.create(model="scout", messages=_image_chat(), max_tokens=1)
    assert reply.usage.prompt_tokens == len(prompt) == text_only.usage.prompt_tokens + 437


def test_bad_images_on_both_doors_and_the_server_keeps_serving(server, client):
    bad = {"corrupt base64": [{"role": "user", "content": [
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR*w0KGgo="}}]}],
           "text labelled as PNG": _image_chat(b"plain text, saved as cat.png\n"),
           "20000 x 20000": _image_chat(png_header_only(20000, 20000)),
           "too many images": _image_chat(*[random_png(8, 8)] * 9),
           "truncated (found by the replica)": _image_chat(random_png(64, 64)[:300])}
    for what, messages in bad.items():
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="scout", messages=messages, max_tokens=3)
        assert refused.value.status_code == 400, what
        assert refused.value.body["message"], what
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(server["grpc"]))
    for data in (b"GIF89a, not really", png_header_only(20000, 20000)):
        message = pb.ChatMessage(role="user", parts=[pb.ContentPart(image=data)])
        request = pb.ChatRequest(model="scout", messages=[message])
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Chat(request, metadata=_metadata(server["key"])))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details()
    reply = client.chat.completions.create(model="scout", messages=_image_chat(random_png(30, 30)), max_tokens=3)
    assert reply.choices[0].finish_reason and _settled(server)


def test_grpc_client_from_protos_with_reflection_and_health(server):
    channel = grpc.insecure_channel(server["grpc"])
    stub = pb_grpc.InferenceStub(channel)
    auth = _metadata(server["key"])
    assert sorted(m.id for m in stub.ListModels(pb.ListModelsRequest(), metadata=auth).models) == ["maverick", "scout"]
    chunks = list(stub.Generate(pb.GenerateRequest(model="scout", text="the herd",
                                                   sampling=pb.SamplingOptions(temperature=0, max_tokens=8)),
                                metadata=auth))
    assert chunks[-1].finish_reason and chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
    chat = list(stub.Chat(pb.ChatRequest(model="scout", messages=[pb.ChatMessage(role="user", content="hi")],
                                         sampling=pb.SamplingOptions(max_tokens=4)), metadata=auth))
    assert chat[-1].finish_reason
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="herd.v1.Inference"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    asks = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    answer = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(asks))
    assert "herd.v1.Inference" in {s.name for s in answer.list_services_response.service}
    channel.close()


def test_32_concurrent_streams_over_http_and_grpc_together(server):
    async def over_http(client, i):
        body = {"model": "scout", "messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": 10 + i % 5,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 headers={"authorization": f"Bearer {server['key']}"}) as response:
            assert response.status_code == 200
            events = [json.loads(line[6:]) async for line in response.aiter_lines() if line.startswith("data: {")]
        return events[-1]["usage"]["completion_tokens"], 10 + i % 5

    async def over_grpc(stub, i):
        request = pb.GenerateRequest(model="scout", text=f"request {i}", sampling=pb.SamplingOptions(
            temperature=0, max_tokens=10 + i % 5, ignore_eos=True))
        chunks = [c async for c in stub.Generate(request, metadata=_metadata(server["key"]))]
        return sum(len(c.token_ids) for c in chunks), 10 + i % 5

    async def main():
        async with httpx.AsyncClient(base_url=server["http"], timeout=120) as client, \
                grpc.aio.insecure_channel(server["grpc"]) as channel:
            stub = pb_grpc.InferenceStub(channel)
            jobs = [over_http(client, i) for i in range(16)] + [over_grpc(stub, i) for i in range(16)]
            return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert len(results) == 32 and all(got == want for got, want in results), results


def test_bad_input_on_both_doors_and_the_server_keeps_serving(server, client):
    for body, status in ((b"{broken", 400), ({"model": "scout", "messages": []}, 400),
                         ({"model": "nope", "messages": HELLO}, 404),
                         ({"model": "scout", "messages": HELLO, "max_tokens": 10**7}, 400),
                         ({"model": "scout", "messages": HELLO, "temperature": "hot"}, 400)):
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        headers = {"content-type": "application/json", "authorization": f"Bearer {server['key']}"}
        response = httpx.post(server["http"] + "/v1/chat/completions", headers=headers, timeout=30, **kwargs)
        assert response.status_code == status, response.text
        assert response.json()["error"]["message"]
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(server["grpc"]))
    for request in (pb.GenerateRequest(model="scout", text=""),
                    pb.GenerateRequest(model="scout", text="x", sampling=pb.SamplingOptions(max_tokens=10**7))):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request, metadata=_metadata(server["key"])))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.chat.completions.create(model="scout", messages=HELLO, max_tokens=3).choices[0].finish_reason


def _stats(server):
    return httpx.get(server["ops"] + "/herd/stats", timeout=30).json()["scout"]


def _settled(server):
    for _ in range(100):
        stats = _stats(server)
        if stats["in_flight"] == 0 and stats["kv_blocks_held"] == 0:
            return True
        time.sleep(0.1)
    return False


def test_deadline_and_cancel_free_the_requests_blocks(server):
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(server["grpc"]))
    long = pb.GenerateRequest(model="scout", text="the herd " * 30,
                              sampling=pb.SamplingOptions(temperature=0, max_tokens=2000, ignore_eos=True))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(long, timeout=1.0, metadata=_metadata(server["key"])))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _settled(server)
    call = stub.Generate(long, metadata=_metadata(server["key"]))
    for i, _ in enumerate(call):
        if i == 3:
            assert _stats(server)["in_flight"] == 1
            call.cancel()
            break
    assert _settled(server)


def test_the_readme_curl_command(server):
    command = re.search(r"curl -s .*?\}'", server["banner"].replace("\\\n", " "), re.S).group(0)
    out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "HERD_KEY": server["key"]}).stdout  # as the banner says to export it
    reply = json.loads(out)
    assert reply["object"] == "chat.completion" and 1 <= reply["usage"]["completion_tokens"] <= 16


def test_openai_client_files_and_a_batch_to_completion_and_a_cancel(server, client):
    requests = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "scout", "messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 6,
                          "temperature": 0}} for i in range(4)]
    data = "".join(json.dumps(r) + "\n" for r in requests).encode()
    upload = client.files.create(file=("requests.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"run": "serve-test"})
    cancelled = client.batches.cancel(client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                                            completion_window="24h").id)
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired"):
        assert time.monotonic() < deadline, f"the batch is still {batch.status}: {batch.request_counts}"
        time.sleep(0.2)
    assert batch.status == "completed" and batch.request_counts.completed == 4
    assert batch.metadata == {"run": "serve-test"}
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == [f"line-{i}" for i in range(4)]
    for line in lines:
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert 1 <= body["usage"]["completion_tokens"] <= 6
    assert cancelled.status == "cancelling"
    while (cancelled := client.batches.retrieve(cancelled.id)).status == "cancelling":
        assert time.monotonic() < deadline, "the cancel never finished"
        time.sleep(0.2)
    assert cancelled.status == "cancelled"
    assert batch.id in {b.id for b in client.batches.list().data}
    bad = client.files.create(file=("bad.jsonl", data.replace(b"/v1/chat/completions", b"/v1/embeddings")),
                              purpose="batch")
    with pytest.raises(openai.BadRequestError, match="line 1: url"):
        client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")


def _admin(server, method, path, **kwargs):
    headers = {"authorization": f"Bearer {server['admin']}"}
    return httpx.request(method, server["ops"] + "/admin/v1" + path, headers=headers, timeout=30, **kwargs)


def test_two_tenants_see_their_models_hit_their_limits_and_are_billed_exactly(server):
    assert _admin(server, "POST", "/tenants", json={"id": "small", "allowed_models": ["scout"],
                                                    "requests_per_min": 3}).status_code == 201
    assert _admin(server, "POST", "/tenants", json={"id": "big", "allowed_models": ["*"]}).status_code == 201
    keys = {t: _admin(server, "POST", f"/tenants/{t}/keys", json={"name": "test"}).json()["key"]
            for t in ("small", "big")}
    server["tenant_keys"] = keys
    http = {t: openai.OpenAI(base_url=server["http"] + "/v1", api_key=k, max_retries=0) for t, k in keys.items()}
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(server["grpc"]))
    assert [m.id for m in http["small"].models.list().data] == ["scout"]
    assert sorted(m.id for m in http["big"].models.list().data) == ["maverick", "scout"]
    listed = stub.ListModels(pb.ListModelsRequest(), metadata=_metadata(keys["small"]))
    assert [m.id for m in listed.models] == ["scout"]
    with pytest.raises(openai.PermissionDeniedError):
        http["small"].chat.completions.create(model="maverick", messages=HELLO, max_tokens=3)

    seen = {"small": [0, 0], "big": [0, 0]}

    def over_http(tenant, model):
        reply = http[tenant].chat.completions.create(model=model, messages=HELLO, max_tokens=5, temperature=0)
        seen[tenant][0] += reply.usage.prompt_tokens
        seen[tenant][1] += reply.usage.completion_tokens
        server["completed"].append(reply.id.removeprefix("chatcmpl-"))

    def over_grpc(tenant, model):
        chunks = list(stub.Generate(pb.GenerateRequest(model=model, text="the herd", sampling=pb.SamplingOptions(
            max_tokens=4, temperature=0)), metadata=_metadata(keys[tenant])))
        seen[tenant][0] += chunks[-1].usage.prompt_tokens
        seen[tenant][1] += chunks[-1].usage.completion_tokens
        server["completed"].append(chunks[-1].request_id)

    over_http("small", "scout")
    over_grpc("small", "scout")
    over_http("small", "scout")
    with pytest.raises(openai.RateLimitError) as refused:
        over_http("small", "scout")
    assert refused.value.body["code"] == "requests_per_min"
    assert int(refused.value.response.headers["retry-after"]) >= 1
    with pytest.raises(grpc.RpcError) as refused_grpc:
        over_grpc("small", "scout")
    assert refused_grpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for model in ("scout", "maverick", "scout", "maverick"):
        over_http("big", model)
    over_grpc("big", "maverick")
    for tenant, (prompt, completion) in seen.items():
        for _ in range(100):
            rows = _admin(server, "GET", "/usage", params={"tenant_id": tenant}).json()
            if sum(r["completion_tokens"] for r in rows) == completion:
                break
            time.sleep(0.1)
        assert sum(r["prompt_tokens"] for r in rows) == prompt, (tenant, rows)
        assert sum(r["completion_tokens"] for r in rows) == completion, (tenant, rows)
        assert {r["tenant_id"] for r in rows} == {tenant}
    assert httpx.get(server["ops"] + "/admin/v1/usage", headers={"authorization": f"Bearer {keys['small']}"},
                     timeout=30).status_code == 401, "a tenant key cannot read the ledger"


def test_a_tenant_gets_no_prefix_cache_hit_on_another_tenants_prompt(server):
    """The engine's tenant-salted prefix cache, end to end: through herd serve, the Ray replica's own
    prefix-cache counters (its /metrics) and the usage each tenant is sent."""
    for tenant in ("owner", "other"):
        assert _admin(server, "POST", "/tenants", json={"id": tenant, "allowed_models": ["*"]}).status_code == 201
    keys = {t: _admin(server, "POST", f"/tenants/{t}/keys", json={"name": "t"}).json()["key"]
            for t in ("owner", "other")}
    body = {"model": "scout", "prompt": list(range(200, 296)), "max_tokens": 2, "temperature": 0}  # six blocks
    port = httpx.get(server["ops"] + "/herd/stats", timeout=30).json()["scout"]["metrics_port"]

    def hits() -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        line = next(x for x in text.splitlines() if x.startswith("herd_replica_prefix_cache_hits_tokens_total{"))
        return float(line.rsplit(" ", 1)[1])

    cached, grew = [], []
    for tenant in ("owner", "other", "owner"):
        before = hits()
        reply = httpx.post(server["http"] + "/v1/completions", json=body, timeout=60,
                           headers={"authorization": f"Bearer {keys[tenant]}"})
        assert reply.status_code == 200, reply.text
        cached.append(reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        grew.append(hits() - before)
    assert cached[1] == 0 and grew[1] == 0, "the other tenant got a hit on the owner's prompt"
    assert cached[2] >= 80 and grew[2] == cached[2], "the owner's own repeat hits"


def test_no_key_material_in_the_logs(server):
    logged = (server["root"] / "stderr.log").read_text()
    assert "herd.serve" in logged, "the check needs the server's log"
    for key in [server["key"], *server.get("tenant_keys", {}).values()]:
        assert key not in logged and key.split("_")[2] not in logged


def test_zz_sigint_drains_in_flight_streams_before_stopping(server):
    """Runs last: stops the module's server. A stream under way when SIGINT arrives still completes."""
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(server["grpc"]))
    request = pb.GenerateRequest(model="scout", text="drain me",
                                 sampling=pb.SamplingOptions(temperature=0, max_tokens=150, ignore_eos=True))
    call = stub.Generate(request, metadata=_metadata(server["key"]))
    first = next(call)
    server["proc"].send_signal(signal.SIGINT)
    rest = list(call)
    assert rest[-1].finish_reason == "length"
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 150
    assert server["proc"].wait(timeout=90) == 0


def test_zzz_usage_rows_survive_the_restart_and_serving_resumes(server):
    from herd.platform.tenancy.database import connect
    from herd.platform.tenancy.store import TenantStore

    store = TenantStore(connect(f"sqlite:///{server['root'] / '.herd' / 'herd.db'}"))
    recorded = {r.request_id: r.status for t in ("dev", "small", "big") for r in store.usage_rows(t)}
    assert server["completed"] and all(recorded.get(rid) == "ok" for rid in server["completed"])
    proc = subprocess.Popen(server["command"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=server["env"], cwd=server["root"])
    try:
        banner = ""
        while "Ctrl-C stops everything" not in banner:
            line = proc.stdout.readline()
            assert line, "herd serve did not restart"
            banner += line
        assert "shown once" not in banner, "the first-start key is made only once"
        reply = openai.OpenAI(base_url=server["http"] + "/v1", api_key=server["tenant_keys"]["big"]).chat.completions \
            .create(model="scout", messages=HELLO, max_tokens=3)
        assert reply.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
