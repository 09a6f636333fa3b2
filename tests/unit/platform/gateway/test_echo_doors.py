"""Echo and prompt logprobs through both doors to a real replica: legacy completions' `echo` (with `logprobs`
over the prompt, as OpenAI gives them), vLLM's `prompt_logprobs` extra field, and the herd.v1 options."""

from __future__ import annotations

import json
import math

import grpc
import pytest

from herd.engine import SamplingParams
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from tests.unit.platform.gateway.asgi import post as _post
from tests.unit.platform.gateway.test_grpc_server import _with_server

PROMPT = "the herd grazes on"
PLAIN = {"model": "scout", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}


def _events(body: str):
    lines = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _reference(core, prompt_ids, top):
    """The engine's own prompt logprobs for these ids (checked against the model's full forward elsewhere)."""
    (out,) = core.engine.engine.generate([list(prompt_ids)], SamplingParams(max_tokens=1, prompt_logprobs=top))
    return out.prompt_logprobs


def _prompt_ids(core):
    return core.tokenizer.encode(PROMPT, add_bos=True)


def test_echo_returns_the_prompt_then_the_completion(gateway):
    plain = _post(gateway, "/v1/completions", PLAIN).json()
    echoed = _post(gateway, "/v1/completions", {**PLAIN, "echo": True})
    assert echoed.status_code == 200, echoed.text
    body = echoed.json()
    assert body["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]
    assert body["usage"] == plain["usage"]  # the prompt is not counted as completion


def test_echo_with_logprobs_covers_the_prompt_then_the_completion(gateway, core):
    plain = _post(gateway, "/v1/completions", {**PLAIN, "logprobs": 2}).json()["choices"][0]
    reply = _post(gateway, "/v1/completions", {**PLAIN, "logprobs": 2, "echo": True})
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    lp, ids = choice["logprobs"], _prompt_ids(core)
    completion = plain["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 6 == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert lp["tokens"] == [core.tokenizer.decode([t], skip_special_tokens=False) for t in ids] + completion["tokens"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    # the same completion (the echoed request computed its whole prompt: no prefix-cache hit, so float noise)
    assert lp["token_logprobs"][len(ids):] == pytest.approx(completion["token_logprobs"], abs=1e-4)
    want = _reference(core, ids, 2)
    for got, entry in zip(lp["token_logprobs"][1:len(ids)], want[1:], strict=True):
        assert got == pytest.approx(entry.logprob, abs=1e-5)
    assert all(0 < len(top) <= 2 for top in lp["top_logprobs"][1:])  # keyed by text: equal spellings merge
    # text_offset: where each token's text starts in the choice's text (<|begin_of_text|> spells none of it)
    text, offsets = choice["text"], lp["text_offset"]
    assert offsets[:2] == [0, 0] and offsets == sorted(offsets) and offsets[-1] <= len(text)
    for token, at in zip(lp["tokens"][1:len(ids)], offsets[1:len(ids)], strict=True):
        assert text[at:].startswith(token)
    assert offsets[len(ids)] == len(PROMPT)


def test_streamed_echo_adds_up_to_the_whole_answer(gateway):
    body = {**PLAIN, "logprobs": 1, "echo": True}
    whole = _post(gateway, "/v1/completions", body).json()["choices"][0]
    streamed = _post(gateway, "/v1/completions", {**body, "stream": True})
    assert streamed.status_code == 200, streamed.text
    choices = [e["choices"][0] for e in _events(streamed.text) if e["choices"]]
    assert choices[0]["text"].startswith(PROMPT)  # the prompt first
    assert "".join(c["text"] for c in choices) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for c in choices for v in c["logprobs"][key]] == whole["logprobs"][key], key


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_extra_field_gives_vllms_list(gateway, core, path):
    body = dict(PLAIN, prompt_logprobs=3)
    if path.endswith("chat/completions"):
        body = {k: v for k, v in body.items() if k != "prompt"} | {"messages": [{"role": "user", "content": PROMPT}]}
    reply = _post(gateway, path, body)
    assert reply.status_code == 200, reply.text
    scored = reply.json()["choices"][0]["prompt_logprobs"]
    assert scored[0] is None and len(scored) == reply.json()["usage"]["prompt_tokens"]
    if path == "/v1/completions":
        ids = _prompt_ids(core)
        want = _reference(core, ids, 3)
        for token, entry, ref in zip(ids[1:], scored[1:], want[1:], strict=True):
            assert entry[str(token)]["logprob"] == pytest.approx(ref.logprob, abs=1e-5)
            ranks = sorted((v["rank"], v["logprob"]) for k, v in entry.items() if int(k) != token or v["rank"])
            assert [r for r, _ in ranks][:3] == [1, 2, 3] and all(not math.isnan(v) for _, v in ranks)
            assert all(v["decoded_token"] == core.tokenizer.decode([int(k)], skip_special_tokens=False)
                       for k, v in entry.items())


def test_plain_completions_carry_no_prompt_logprobs(gateway):
    assert _post(gateway, "/v1/completions", PLAIN).json()["choices"][0].get("prompt_logprobs") is None


@pytest.mark.parametrize("value", [-1, 21, "x"])
def test_bad_prompt_logprobs_is_400_naming_the_field(gateway, value):
    reply = _post(gateway, "/v1/completions", {**PLAIN, "prompt_logprobs": value})
    assert reply.status_code == 400, reply.text
    assert "prompt_logprobs" in json.dumps(reply.json()["error"])


def test_grpc_prompt_logprobs_and_echo_on_the_first_chunk(gateway, core):
    async def body(channel):
        stub = pb_grpc.InferenceStub(channel)
        options = pb.SamplingOptions(temperature=0, max_tokens=5, ignore_eos=True, prompt_logprobs=2, echo=True)
        chunks = [c async for c in stub.Generate(pb.GenerateRequest(model="scout", text=PROMPT, sampling=options))]
        bad = pb.SamplingOptions(max_tokens=4, prompt_logprobs=21)
        try:
            async for _ in stub.Generate(pb.GenerateRequest(model="scout", text="x", sampling=bad)):
                pass
        except grpc.aio.AioRpcError as err:
            return chunks, err
        return chunks, None

    chunks, refused = _with_server(gateway, body)
    ids = _prompt_ids(core)
    first = chunks[0].prompt_logprobs
    assert [e.token_id for e in first] == ids
    assert first[0].logprob == 0 and not first[0].top
    for entry, ref in zip(first[1:], _reference(core, ids, 2)[1:], strict=True):
        assert entry.logprob == pytest.approx(ref.logprob, abs=1e-5) and len(entry.top) == 2
    assert not any(c.prompt_logprobs for c in chunks[1:])
    assert chunks[0].text.startswith(PROMPT)
    assert sum(len(c.token_ids) for c in chunks) == 5 == chunks[-1].usage.completion_tokens
    assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_logprobs" in refused.details()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_prompt_logprobs_come_once_in_an_early_event(gateway, path):
    body = dict(PLAIN, prompt_logprobs=1, stream=True, stream_options={"include_usage": True})
    if path.endswith("chat/completions"):
        body = {k: v for k, v in body.items() if k != "prompt"} | {"messages": [{"role": "user", "content": PROMPT}]}
    reply = _post(gateway, path, body)
    assert reply.status_code == 200, reply.text
    events = _events(reply.text)
    choices = [e["choices"][0] for e in events if e["choices"]]
    scored = [c["prompt_logprobs"] for c in choices if "prompt_logprobs" in c]
    assert len(scored) == 1 and scored[0][0] is None
    assert len(scored[0]) == events[-1]["usage"]["prompt_tokens"]
