"""Herd's Llama 4 against transformers' on random tiny configurations: logits, greedy decoding."""

from __future__ import annotations

import pytest
import torch

from herd.model import greedy_decode, load_model
from tests.hf_reference import VOCAB, build, per_position_rel_error, reference_logits, save, text_reference

TOLERANCE = 1e-4
CHUNK = 8


@pytest.mark.parametrize("layout", ["conditional", "causal"])
@pytest.mark.parametrize("variant", ["scout", "maverick", "top2_bias_gqa4"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logits_match_reference(tmp_path, layout, variant, seed):
    ref = build(variant, seed, layout=layout)
    moe_layer = text_reference(ref).config.moe_layers[0]
    experts = text_reference(ref).model.layers[moe_layer].feed_forward.experts
    assert experts.gate_up_proj.abs().sum() > 0, "an unfilled reference proves nothing"
    model = load_model(save(ref, tmp_path), progress=False)
    generator = torch.Generator().manual_seed(100 + seed)
    for length in (CHUNK - 3, 5 * CHUNK):  # within one chunk, and across several chunk boundaries
        ids = torch.randint(0, VOCAB, (length,), generator=generator)
        errors = per_position_rel_error(model.logits(ids), reference_logits(ref, ids))
        assert errors.max() < TOLERANCE, f"{variant}/{layout} seed {seed} T={length}: max rel err {errors.max():.2e}"


@pytest.mark.parametrize("variant", ["scout", "maverick", "top2_bias_gqa4"])
def test_greedy_decoding_matches_reference(tmp_path, variant):
    ref = build(variant, 7, layout="conditional")
    model = load_model(save(ref, tmp_path), progress=False)
    prompt = torch.randint(0, VOCAB, (CHUNK + 3,), generator=torch.Generator().manual_seed(7))
    expected = text_reference(ref).generate(
        prompt[None], max_new_tokens=32, do_sample=False, pad_token_id=0
    )[0, prompt.shape[0] :].tolist()
    assert len(expected) == 32
    assert greedy_decode(model, prompt.tolist(), max_new_tokens=32) == expected


def test_incremental_decoding_equals_full_forward(tmp_path):
    model = load_model(save(build("scout", 3, layout="causal"), tmp_path), progress=False)
    ids = torch.randint(0, VOCAB, (3 * CHUNK + 2,), generator=torch.Generator().manual_seed(3))
    full = model.logits(ids)
    cache = model.new_cache()
    steps = [model(ids[:5], cache=cache)] + [model(ids[t : t + 1], cache=cache) for t in range(5, ids.shape[0])]
    assert per_position_rel_error(torch.cat(steps).float(), full).max() < 1e-5


def _mutations():
    def no_chunking(m):
        for layer in m.model.layers:
            layer.self_attn.chunk_size = None

    def no_temperature(m):
        for layer in m.model.layers:
            layer.self_attn.temperature_tuning = False

    def no_qk_norm(m):
        for layer in m.model.layers:
            layer.self_attn.qk_norm = False

    def plain_rope(m):
        m.config = m.config.model_copy(update={"rope": m.config.rope.model_copy(update={"rope_type": "default"})})

    def score_on_output(m):
        # Scaling the expert output instead of its input: wrong for Llama 4 (SwiGLU is not linear).
        for layer in m.model.layers:
            moe = layer.feed_forward
            moe.executor = lambda _layer, rows, offsets, moe=moe: _unscaled_then_scaled(moe, rows, offsets)

    return [no_chunking, no_temperature, no_qk_norm, plain_rope, score_on_output]


def _unscaled_then_scaled(moe, rows, offsets):
    norms = rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return moe.experts(rows / norms, offsets) * norms


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_comparison_detects_a_wrong_model(tmp_path, mutate):
    """Each Llama 4 detail, done wrong, must push the error far over the tolerance."""
    ref = build("scout", 0, layout="causal")
    model = load_model(save(ref, tmp_path), progress=False)
    model._inv_freq = None
    mutate(model)
    ids = torch.randint(0, VOCAB, (5 * CHUNK,), generator=torch.Generator().manual_seed(0))
    errors = per_position_rel_error(model.logits(ids), reference_logits(ref, ids))
    assert errors.max() > 100 * TOLERANCE
