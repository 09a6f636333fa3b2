"""`herd plan --kv-dtype fp8` describes the engine's FP8 KV cache (EngineConfig.kv_cache_dtype "fp8"): the same bytes
per block and token, the same least kv_cache_bytes for a workload, and about 2x the blocks of a bfloat16 cache (4x
float32) in the same memory."""

from __future__ import annotations

import pytest
import torch

from herd.engine import EngineConfig
from herd.engine.kv_cache_manager import CHUNKED, FULL
from herd.engine.paged_kv import bytes_per_block
from herd.model import load_config
from herd.model.config import ModelConfig, TextConfig
from herd.model.tiny import make_tiny
from herd.platform.capacity.memory import KV_DTYPES, Workload, kv_bytes, trunk_activation_bytes
from herd.platform.capacity.presets import PRESETS, preset_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 16-token attention chunk, so these workloads' windows and contexts cross (as test_plan's)."""
    return make_tiny(tmp_path_factory.mktemp("tiny"), preset="maverick", seed=0)


def text(preset: str) -> TextConfig:
    return ModelConfig.from_hf(preset_config(preset), source=preset).text


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fp8_bytes_per_token_are_the_engines_layout_bytes(preset):
    t = text(preset)
    engine = EngineConfig(kv_cache_dtype="fp8", dtype=torch.bfloat16, block_size=16, kv_cache_mb=4096,
                          max_model_len=8192)
    layout = engine.kv_layout(t)
    assert layout.bytes_per_block == bytes_per_block(t, 16, KV_DTYPES["fp8"])
    per_token = sum(bytes_per_block(t, 1, KV_DTYPES["fp8"]).values())
    assert per_token * 16 == sum(layout.bytes_per_block.values())
    layers, k, d = t.num_hidden_layers, t.num_key_value_heads, t.head_dim
    assert per_token == layers * 2 * k * (d + 4), "one byte a key/value element, a float32 scale per kv head"


@pytest.mark.parametrize(("sequences", "context", "step"), [(1, 100, 64), (3, 40, 16), (8, 17, 512), (5, 300, 32)])
def test_fp8_kv_bytes_are_the_least_an_fp8_engine_needs(tiny, sequences, context, step):
    t = load_config(tiny).text
    load = Workload(sequences=sequences, context_tokens=context, step_tokens=step, block_size=16, kv_dtype="fp8")

    def holds(kv_cache_bytes: int) -> bool:
        engine = EngineConfig(kv_cache_mb=kv_cache_bytes / 2**20, max_num_seqs=sequences, max_num_batched_tokens=step,
                              max_model_len=context, block_size=16, dtype=torch.bfloat16, kv_cache_dtype="fp8")
        try:
            blocks = engine.kv_layout(t).num_blocks
        except ValueError:
            return False
        return (blocks[FULL] >= sequences * -(-context // 16)
                and blocks[CHUNKED] >= engine.chunked_blocks_needed(t, sequences=sequences))

    needed = kv_bytes(t, load)
    assert holds(needed) and not holds(needed - 1)
    bf16 = kv_bytes(t, Workload(sequences=sequences, context_tokens=context, step_tokens=step, block_size=16))
    assert needed * 2 * t.head_dim == bf16 * (t.head_dim + 4)


@pytest.mark.parametrize(("dtype", "ratio"), [(torch.bfloat16, 2), (torch.float32, 4)])
def test_an_fp8_cache_holds_about_2x_bfloat16s_blocks_and_4x_float32s(dtype, ratio):
    t = text("scout")
    common = dict(kv_cache_mb=8192, dtype=dtype, max_model_len=8192, max_num_seqs=256)
    plain = EngineConfig(**common).kv_layout(t).num_blocks  # type: ignore[arg-type]
    fp8 = EngineConfig(**common, kv_cache_dtype="fp8").kv_layout(t).num_blocks  # type: ignore[arg-type]
    exact = ratio * t.head_dim / (t.head_dim + 4)  # 1.94 and 3.88 at head_dim 128: the scales take the rest
    total = sum(fp8.values()) / sum(plain.values())
    assert abs(total - exact) < 0.01 * exact and 0.95 * ratio < total <= ratio
    assert EngineConfig(kv_cache_dtype="fp8", dtype=dtype).kv_dtype == torch.float8_e4m3fn
    assert EngineConfig(dtype=dtype).kv_dtype == dtype, "auto: the engine's dtype"


def test_an_fp8_gather_counts_its_bytes_and_their_dequantised_copy():
    t = text("scout")
    loads = {d: Workload(sequences=4, context_tokens=8192, kv_dtype=d) for d in ("fp8", "bf16", "fp32")}
    act = {d: trunk_activation_bytes(t, load) for d, load in loads.items()}
    gathered = 2 * 4 * 8192 * t.num_key_value_heads * t.head_dim  # values
    assert act["fp8"] - act["bf16"] == gathered, "e4m3 bytes (1) plus bfloat16 copies (2) against bfloat16 (2)"
    assert act["fp32"] - act["bf16"] == 2 * gathered
