"""The capacity planner: its counts agree with what Herd loads and allocates, and its verdicts with the
published deployments of Llama 4."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open

from herd.engine import EngineConfig
from herd.engine.kv_cache_manager import CHUNKED, FULL
from herd.model import load_config
from herd.model.tiny import make_tiny
from herd.model.vision_config import load_vision_config
from herd.platform.capacity.cli import load_model_config
from herd.platform.capacity.gpus import gpu_type
from herd.platform.capacity.memory import Workload, kv_bytes
from herd.platform.capacity.plan import _bisect, plan
from herd.platform.capacity.presets import PRESETS
from herd.platform.capacity.weights import matrix_bytes, weight_sizes

H100, H200 = gpu_type("h100"), gpu_type("h200")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), preset="maverick", seed=0)


def _plan(model: str, weights: str, gpu, gpus: int, *, sequences: int = 1, context: int = 8192):
    config, vision, _ = load_model_config(model)
    return plan(config.text, vision, weight_format=weights, gpu=gpu, num_gpus=gpus,
                load=Workload(sequences=sequences, context_tokens=context))


@pytest.mark.parametrize("model", sorted(PRESETS))
def test_parameter_counts_are_the_published_totals(model):
    config, vision, _ = load_model_config(model)
    sizes = weight_sizes(config.text, vision, "bf16")
    total = sum(sizes.params.values())
    assert abs(total / PRESETS[model]["published_params"] - 1) < 0.015, f"{total / 1e9:.1f}B"
    assert sizes.total_bytes == 2 * total


def test_bf16_bytes_are_the_tiny_checkpoints_tensor_bytes(tiny):
    stored = 0
    for file in tiny.glob("model-*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            stored += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys()) * 2  # noqa: SIM118 (safe_open has no __iter__)
    sizes = weight_sizes(load_config(tiny).text, load_vision_config(tiny), "bf16")
    assert sizes.total_bytes == stored


def test_formats_shrink_only_the_feed_forward_weights(tiny):
    text, vision = load_config(tiny).text, load_vision_config(tiny)
    bf16, fp8, int4 = (weight_sizes(text, vision, f) for f in ("bf16", "fp8", "int4"))
    for part in ("embeddings", "attention", "router", "vision"):
        assert bf16.bytes[part] == fp8.bytes[part] == int4.bytes[part]
    for part in ("routed_experts", "shared_expert", "dense_mlp"):
        assert bf16.bytes[part] > fp8.bytes[part] > int4.bytes[part] > 0
    assert matrix_bytes(256, 10, "int4") == 256 * 10 // 2 + 2 * 2 * 10  # two groups of 128 per output
    assert matrix_bytes(256, 10, "fp8") == 2560 + 40


@pytest.mark.parametrize(("sequences", "context", "step"),
                         [(1, 100, 64), (3, 40, 16), (8, 17, 512), (2, 9, 16), (5, 300, 32)])
def test_kv_bytes_are_the_least_the_engine_needs_for_the_workload(tiny, sequences, context, step):
    text = load_config(tiny).text
    load = Workload(sequences=sequences, context_tokens=context, step_tokens=step, block_size=16)

    def holds(kv_cache_bytes: int) -> bool:
        engine = EngineConfig(kv_cache_mb=kv_cache_bytes / 2**20, max_num_seqs=sequences, max_num_batched_tokens=step,
                              max_model_len=context, block_size=16, dtype=torch.bfloat16)
        try:
            blocks = engine.kv_layout(text).num_blocks
        except ValueError:
            return False
        return (blocks[FULL] >= sequences * -(-context // 16)
                and blocks[CHUNKED] >= engine.chunked_blocks_needed(text, sequences=sequences))

    needed = kv_bytes(text, load)
    assert holds(needed) and not holds(needed - 1)
    assert kv_bytes(text, load, chunk_aware=False) == sequences * -(-context // 16) * 16 * 4 * 2 * 2 * 32 * 2


def test_published_deployments():
    assert _plan("scout", "int4", H100, 1).fits, "Scout int4 on one H100"
    assert not _plan("scout", "bf16", H100, 1).fits, "Scout bf16 does not fit one H100"
    maverick = _plan("maverick", "fp8", H100, 8, context=430_000)
    assert maverick.fits, "Maverick FP8 on 8 x H100 with vLLM's published 430K context"
    assert maverick.tensor_parallel_context >= 430_000
    assert not _plan("maverick", "bf16", H100, 8).fits, "Maverick bf16 does not fit 8 x H100"
    scout = _plan("scout", "bf16", H100, 8)
    assert scout.tensor_parallel_context >= 1_000_000, "a tensor-parallel Scout on 8 x H100 reaches 1M"
    for long in (maverick, scout):
        assert long.largest_context >= 3 * long.largest_context_without_chunk_saving, "chunk-aware KV: 12 of 48"
    assert _plan("maverick", "fp8", H200, 8).largest_context == 1_048_576, "capped at max_position_embeddings"


def test_the_trunk_keeps_its_gpu_when_the_shards_fit_elsewhere():
    maverick = _plan("maverick", "fp8", H100, 8)
    assert [g.role for g in maverick.gpus] == ["trunk"] + [f"shard {s}" for s in range(7)]
    assert sorted(e for g in maverick.gpus for e in g.experts) == list(range(128))
    one = _plan("scout", "int4", H100, 1)
    assert one.gpus[0].role == "trunk + shard 0" and one.gpus[0].experts == tuple(range(16))


def test_limits_are_the_edges_of_fitting():
    base = _plan("scout", "int4", H100, 1)
    config, vision, _ = load_model_config("scout")

    def fits(**change) -> bool:
        return plan(config.text, vision, weight_format="int4", gpu=H100, num_gpus=1,
                    load=dataclasses.replace(base.load, **change)).fits

    assert fits(context_tokens=base.largest_context) and not fits(context_tokens=base.largest_context + 16)
    assert fits(sequences=base.largest_batch) and not fits(sequences=base.largest_batch + 1)
    assert _bisect(lambda n: n <= 37, 100) == 37 and _bisect(lambda n: False, 100) == 0


@pytest.mark.parametrize(("change", "needle"), [
    (dict(weight_format="int3"), "weight format"), (dict(num_gpus=0), "at least one GPU"),
    (dict(memory_utilization=1.5), "memory_utilization"),
])
def test_bad_requests_are_refused(change, needle):
    config, vision, _ = load_model_config("scout")
    kwargs = dict(weight_format="bf16", gpu=H100, num_gpus=1, load=Workload(sequences=1, context_tokens=8)) | change
    with pytest.raises(ValueError, match=needle):
        plan(config.text, vision, **kwargs)
    with pytest.raises(ValueError, match="KV dtype"):
        Workload(sequences=1, context_tokens=8, kv_dtype="int2")
    with pytest.raises(ValueError, match="unknown GPU"):
        gpu_type("tpu-v5")


def test_herd_plan_prints_the_table_and_exits_by_the_verdict(capsys, tiny):
    from herd.cli import main

    assert main(["plan", "--model", "scout", "--weights", "int4", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "routed_experts" in out and "largest context" in out
    assert main(["plan", "--model", "scout", "--weights", "bf16"]) == 1
    assert "DOES NOT FIT: GPU 0 needs" in capsys.readouterr().out
    assert main(["plan", "--model", str(tiny), "--json", "--gpu-memory-gib", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["gpus"][0]["experts"] == "0-31"


def test_a_quantised_checkpoint_is_planned_in_its_own_format(capsys, tiny, tmp_path):
    from herd.cli import main
    from herd.model.quant.convert import quantize_checkpoint

    int4 = quantize_checkpoint(tiny, tmp_path / "int4", "int4", progress=False)
    sizes = {}
    for args, key in (([], "own"), (["--weights", "bf16"], "bf16")):
        assert main(["plan", "--model", str(int4), "--json", *args]) == 0
        report = json.loads(capsys.readouterr().out)
        sizes[key] = (report["weight_format"], report["weights_bytes"]["routed_experts"])
    assert sizes["own"][0] == "int4" and sizes["bf16"][0] == "bf16"
    assert sizes["own"][1] < sizes["bf16"][1] / 3
