"""Images at both doors over an in-process replica: a chat with an image is answered as the engine would
answer it, image tokens are counted, and every bad image is a 400 / INVALID_ARGUMENT while serving goes on.
"""

from __future__ import annotations

import asyncio
import base64

import grpc
import httpx
import pytest

from herd.engine import SamplingParams
from herd.engine.prompt_images import ImageInput
from herd.model.chat_template import render_chat
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.grpc_server import start_grpc
from herd.platform.gateway.http_app import create_app
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from tests.images import png_header_only, random_png

TEXT_CHAT = {"model": "scout", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0}
ONE_TILE_TOKENS = 147  # <|image_start|> <|image|> 144 x <|patch|> <|image_end|>


def _data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def _chat(*urls: str, text: str = "What is in this picture?") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls] + [{"type": "text", "text": text}]
    return {**TEXT_CHAT, "messages": [{"role": "user", "content": parts}]}


def _client(gateway, **kwargs):
    app = create_app(gateway, **kwargs)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://herd")


def _post_all(gateway, *bodies):
    async def main():
        async with _client(gateway) as client:
            return [await client.post("/v1/chat/completions", json=body) for body in bodies]

    return asyncio.run(main())


def test_a_chat_with_an_image_is_answered_as_the_engine_answers_it(gateway, core):
    png = random_png(120, 90, seed=1)
    [reply, text_only] = [r.json() for r in _post_all(gateway, _chat(_data_url(png)), _chat())]
    prompt_ids = core.tokenizer.encode(
        core.image_prompts.expand(render_chat([{"role": "user", "content": [{"type": "image"}, {
            "type": "text", "text": "What is in this picture?"}]}]), [core.image_prompts.grid(png)]))
    image = ImageInput(core.image_prompts.pixel_values(png))
    [expected] = core.engine.engine.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=6),
                                             images=[image])
    assert reply["choices"][0]["message"]["content"] == expected.text
    assert reply["usage"]["prompt_tokens"] == len(prompt_ids)
    assert reply["usage"]["prompt_tokens"] == text_only["usage"]["prompt_tokens"] + ONE_TILE_TOKENS


def test_several_tiles_and_two_images_are_counted(gateway):
    wide = random_png(600, 300, seed=3)  # 1 x 2 tiles + the global tile
    text = _text_tokens(gateway)
    two = _chat(_data_url(random_png(50, 50, seed=4)), _data_url(random_png(60, 20, seed=5)))
    replies = _post_all(gateway, {**_chat(_data_url(wide)), "max_tokens": 2}, {**two, "max_tokens": 2})
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    wide_tokens = 3 + 3 * 144 + 2  # start, image, end; 3 tiles of patches; an x and a y separator
    assert replies[0].json()["usage"]["prompt_tokens"] == text + wide_tokens
    assert replies[1].json()["usage"]["prompt_tokens"] == text + 2 * ONE_TILE_TOKENS


def _text_tokens(gateway) -> int:
    """Prompt tokens of the chat without its images."""
    [reply] = _post_all(gateway, {**_chat(), "max_tokens": 1})
    return reply.json()["usage"]["prompt_tokens"]


BAD = [
    ("corrupt base64", _chat("data:image/png;base64,iVBORw0KGgo*not base64*"), "corrupt base64"),
    ("text labelled as PNG", _chat(_data_url(b"I am a text file, saved as cat.png.\n")), "not a recognised image"),
    ("20000 x 20000", _chat(_data_url(png_header_only(20000, 20000))), "decompression bomb"),
    ("too many images", _chat(*[_data_url(random_png(8, 8))] * 9), "at most 8"),
    ("truncated pixels", _chat(_data_url(random_png(64, 64)[:200])), "truncated or corrupt"),
    ("http URL, fetching off", _chat("http://127.0.0.1:9/cat.png"), "not fetched by this server"),
    ("not base64 at all", _chat("data:image/png,rawbytes"), "must be base64"),
    ("not an image media type", _chat(_data_url(b"x", media="text/plain")), "not an image"),
    ("grid over the context", _chat(_data_url(random_png(1300, 1300))), "maximum context length is 512"),
]


@pytest.mark.parametrize(("body", "needle"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_images_are_400_and_the_server_keeps_serving(gateway, body, needle):
    bad, good = _post_all(gateway, body, _chat(_data_url(random_png(40, 30))))
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert needle in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert error["param"] in ("messages", None)  # None: refused by the replica, which decodes the pixels
    assert good.status_code == 200, good.text


def test_the_image_marker_typed_in_text_is_text_beside_a_real_image(gateway):
    """<|image|> in a client's text is literal text (herd.model.chat_prompt): it neither takes the place of an
    image nor makes a second one."""
    typed, good = _post_all(gateway, _chat(_data_url(random_png(8, 8)), text="<|image|>"),
                            _chat(_data_url(random_png(8, 8)), text="image"))
    assert typed.status_code == 200 and good.status_code == 200, typed.text
    assert typed.json()["usage"]["prompt_tokens"] > good.json()["usage"]["prompt_tokens"]


@pytest.fixture
def text_only_gateway(core):
    backend = LocalBackend(core)
    backend.image_prompts = None  # as a text-only checkpoint's backend has
    return Gateway({"scout": backend})


def test_a_text_only_model_refuses_images(text_only_gateway):
    bad, good = _post_all(text_only_gateway, _chat(_data_url(random_png(10, 10))), TEXT_CHAT)
    assert bad.status_code == 400 and "takes no images" in bad.json()["error"]["message"]
    assert good.status_code == 200


def _grpc(gateway, body):
    async def main():
        server, port = await start_grpc(gateway, port=0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await body(pb_grpc.InferenceStub(channel))
        finally:
            await server.stop(0)

    return asyncio.run(main())


def _grpc_chat(*images: bytes) -> pb.ChatRequest:
    parts = [pb.ContentPart(image=data) for data in images] + [pb.ContentPart(text="What is in this picture?")]
    return pb.ChatRequest(model="scout", messages=[pb.ChatMessage(role="user", parts=parts)],
                          sampling=pb.SamplingOptions(temperature=0, max_tokens=6))


def test_grpc_chat_with_image_parts_equals_http(gateway):
    png = random_png(120, 90, seed=1)

    async def body(stub):
        return [c async for c in stub.Chat(_grpc_chat(png))]

    chunks = _grpc(gateway, body)
    [reply] = _post_all(gateway, _chat(_data_url(png)))
    assert "".join(c.text for c in chunks) == reply.json()["choices"][0]["message"]["content"]
    assert chunks[-1].usage.prompt_tokens == reply.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize(("request_", "needle"), [
    (_grpc_chat(b"GIF89a but not really"), "image 0"),
    (_grpc_chat(png_header_only(20000, 20000)), "decompression bomb"),
    (_grpc_chat(*[random_png(8, 8)] * 9), "at most 8"),
    (pb.GenerateRequest(model="scout", text="hi", images=[random_png(8, 8)]), "Generate takes no images"),
], ids=["not an image", "20000 x 20000", "too many", "images on Generate"])
def test_grpc_bad_images_are_invalid_argument(gateway, request_, needle):
    async def body(stub):
        call = stub.Chat if isinstance(request_, pb.ChatRequest) else stub.Generate
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [c async for c in call(request_)]
        good = [c async for c in stub.Chat(_grpc_chat(random_png(40, 30)))]
        return caught.value, good

    error, good = _grpc(gateway, body)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.details(), error.details()
    assert good[-1].finish_reason


def test_an_image_part_without_bytes_is_refused_at_the_gateway(gateway):
    from herd.engine.errors import HerdError
    from herd.platform.gateway.errors import http_status

    for part in ({"type": "image"}, {"type": "image", "image": b""}, {"type": "image", "image": "cat.png"}):
        with pytest.raises(HerdError, match="image 0 has no image bytes") as caught:
            asyncio.run(gateway.prepare_chat("scout", [{"role": "user", "content": [part]}],
                                             pb.SamplingOptions(max_tokens=2)))
        assert http_status(caught.value) == 400
