"""Images through the engine: chunked prefill over image spans, exact to transformers; the prefix cache
keyed by pixels; bad image requests refused.

The tiny checkpoint's vision tower has 336-pixel tiles and 144 features per tile; with a step budget of
48 tokens, every image is split across several prefill chunks (and, for the attention chunk of 16,
across several attention windows).
"""

from __future__ import annotations

import pytest
import torch
from transformers import Llama4ForConditionalGeneration

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.prefix_hash import block_hashes
from herd.engine.prompt_images import ImageInput, ImageSpan, PromptImages, pixel_digest
from herd.model.tiny import make_tiny
from tests.hf_reference import conditional_generation_fixed

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PER_TILE = 144


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("vision"), preset="scout", seed=3)


@pytest.fixture(scope="module")
def reference(tiny):
    with conditional_generation_fixed():
        yield Llama4ForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32).eval()


def _engine(tiny, **overrides) -> LLMEngine:
    config = dict(kv_cache_mb=16, max_num_batched_tokens=48, block_size=16) | overrides
    return LLMEngine.from_pretrained(tiny, EngineConfig(**config))


def _pixels(tiles: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(tiles, 3, 336, 336, generator=generator) * 2 - 1


def _prompt(engine: LLMEngine, tiles: list[int], seed: int) -> list[int]:
    """Text, then for each image its tiles' placeholders (tile runs split by a text token), then text."""
    placeholder = engine.model.config.image_token_id
    generator = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(0, 300, (n,), generator=generator).tolist()

    ids = text(7)
    for count in tiles:
        for _ in range(count):
            ids += [placeholder] * PER_TILE + text(1)
        ids += text(5)
    return ids


@torch.no_grad()
def _expected(reference, ids: list[int], images: list[torch.Tensor]) -> list[int]:
    out = reference.generate(input_ids=torch.tensor([ids]), pixel_values=torch.cat(images), max_new_tokens=8,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("tiles", [[1], [2, 1]], ids=["one image", "two images"])
def test_greedy_with_images_equals_transformers(tiny, reference, tiles):
    engine = _engine(tiny)
    for seed in (0, 1):
        ids = _prompt(engine, tiles, seed)
        images = [_pixels(n, 10 * seed + i) for i, n in enumerate(tiles)]
        with conditional_generation_fixed():
            expected = _expected(reference, ids, images)
            other = _expected(reference, ids, [-p for p in images])
        [out] = engine.generate([ids], GREEDY, images=[ImageInput(p) for p in images])
        assert out.token_ids == expected, f"seed {seed}"
        assert other != expected, "the pixels must change what is generated"


def test_a_batch_with_and_without_images_matches_each_alone(tiny):
    engine = _engine(tiny)
    ids = _prompt(engine, [1], 5)
    image = ImageInput(_pixels(1, 5))
    [alone] = engine.generate([ids], GREEDY, images=[image])
    requests = [engine.prepare(ids, GREEDY, images=[image]), engine.prepare(list(range(40)), GREEDY),
                engine.prepare(ids, GREEDY, images=[ImageInput(_pixels(1, 6))])]
    for request in requests:
        engine.submit(request)
    finals = {}
    while len(finals) < 3:
        finals |= {out.request_id: out for out in engine.step() if out.finished}
    assert finals[requests[0].seq.request_id].token_ids == alone.token_ids
    assert finals[requests[2].seq.request_id].token_ids != alone.token_ids


def test_prefix_cache_shares_an_image_only_with_the_same_pixels(tiny):
    engine = _engine(tiny)
    ids = _prompt(engine, [1], 7)
    first_placeholder = ids.index(engine.model.config.image_token_id)
    image, other = ImageInput(_pixels(1, 7)), ImageInput(_pixels(1, 8))
    [cold] = engine.generate([ids], GREEDY, images=[image])
    [warm] = engine.generate([ids], GREEDY, images=[image])
    [different] = engine.generate([ids], GREEDY, images=[other])
    assert cold.num_cached_tokens == 0
    assert warm.num_cached_tokens == (len(ids) - 1) // 16 * 16, "the same image: the whole prompt's blocks"
    assert warm.token_ids == cold.token_ids
    assert different.num_cached_tokens == first_placeholder // 16 * 16, "other pixels: only the text before it"
    [fresh] = _engine(tiny).generate([ids], GREEDY, images=[other])
    assert different.token_ids == fresh.token_ids


def test_block_keys_carry_the_digest_of_every_image_they_overlap():
    ids = list(range(40))
    a, b = ImageSpan(10, 20, b"a" * 32), ImageSpan(10, 20, b"b" * 32)
    plain = block_hashes(ids, 8, "s")
    with_a, with_b = block_hashes(ids, 8, "s", images=[a]), block_hashes(ids, 8, "s", images=[b])
    assert with_a[0] == plain[0] == with_b[0], "block [0, 8) holds no image token"
    assert all(x != y for x, y in zip(with_a[1:], with_b[1:], strict=True)), "[8, 16) on: the pixels differ"
    assert block_hashes(ids, 8, "s", start=2, parent=with_a[1], images=[a]) == with_a[2:]


def test_placing_needs_one_placeholder_per_feature():
    features = [torch.zeros(3, 4), torch.ones(2, 4)]
    images = PromptImages.place([5, 9, 9, 9, 6, 9, 9, 7], 9, features, [b"x", b"y"])
    assert images.spans == (ImageSpan(1, 4, b"x"), ImageSpan(5, 7, b"y"))
    offsets, rows = images.within(3, 6)
    assert offsets.tolist() == [0, 2] and rows[:, 0].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"holds 6 image placeholder tokens .* give 5 features"):
        PromptImages.place([9] * 6, 9, features, [b"x", b"y"])


def test_pixel_digest_tells_values_shapes_and_dtypes_apart():
    x = torch.rand(1, 3, 4, 4)
    assert pixel_digest(x) == pixel_digest(x.clone())
    assert pixel_digest(x) != pixel_digest(x + 1e-3)
    assert pixel_digest(x) != pixel_digest(x.view(1, 3, 2, 8))
    assert pixel_digest(x.bfloat16()) != pixel_digest(x)


def test_bad_image_requests_are_refused_and_disturb_nothing(tiny):
    engine = _engine(tiny)
    ids = _prompt(engine, [1], 9)
    with pytest.raises(ValueError, match=r"144 image placeholder tokens .* give 288 features"):
        engine.add_request(ids, GREEDY, images=[ImageInput(_pixels(2, 0))])
    with pytest.raises(ValueError, match=r"pixel_values must be \[tiles, 3, 336, 336\]"):
        engine.add_request(ids, GREEDY, images=[ImageInput(torch.zeros(1, 3, 28, 28))])
    with pytest.raises(ValueError, match="must be an ImageInput"):
        engine.add_request(ids, GREEDY, images=[_pixels(1, 0)])  # type: ignore[list-item]
    text_only = LLMEngine(engine.model, engine.tokenizer, engine.config)
    with pytest.raises(ValueError, match="takes no images"):
        text_only.add_request(ids, GREEDY, images=[ImageInput(_pixels(1, 0))])
    assert not engine.has_unfinished()
    [out] = engine.generate([ids], GREEDY, images=[ImageInput(_pixels(1, 0))])
    assert len(out.token_ids) == 8
