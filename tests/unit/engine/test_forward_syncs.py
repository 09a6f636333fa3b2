"""No host sync inside the model's forward in the engine (issue 20): decode steps and a mixed prefill + decode step.

The guard (herd.kernels.host_syncs) wraps Llama4Model.forward only: the sampler's one copy of the sampled ids comes
after it. On the CPU it counts the calls that would sync on a GPU. Scope: the experts held in the engine's process
(the default, float weights, the torch backend). The first step warms up (grouped_mm is tried once per device and
dtype) and is not counted. Int4 experts keep their documented sync (one per MoE layer), and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.model_runner import ModelRunner
from herd.engine.prompt_images import ImageInput
from herd.kernels import torch_moe
from herd.kernels.host_syncs import HostSyncGuard, forward_syncs
from herd.model import load_model
from herd.model.moe import MoE
from herd.model.quant.convert import quantize_checkpoint
from herd.model.tiny import make_tiny

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def scout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=4)


def _record(engine: LLMEngine, note: Callable[[tuple[Any, ...], dict[str, Any], torch.Tensor], None]) -> None:
    """Call note(args, kwargs, logits) after each model forward (outside a guard forward_syncs put on it first)."""
    forward = engine.model.forward

    def recorded(*args: Any, **kwargs: Any) -> torch.Tensor:
        logits: torch.Tensor = forward(*args, **kwargs)
        note(args, kwargs, logits)
        return logits

    engine.model.forward = recorded  # type: ignore[method-assign]  # forward_syncs takes it off with its own


def _run(scout: Path, *, static_decode: bool = False) -> tuple[LLMEngine, list[tuple[int, int]], list[list[str]]]:
    """(engine, (tokens, logit rows) of each forward after the warm-up step, the syncs inside each)."""
    config = EngineConfig(kv_cache_mb=16, max_num_seqs=8, static_decode=static_decode)
    engine = LLMEngine.from_pretrained(scout, config)
    engine.runner = ModelRunner(engine.model, engine.kv, engine.runner.cache, config=config)  # static_decode, surely
    shapes: list[tuple[int, int]] = []
    engine.add_request(list(range(3, 21)), PARAMS)
    engine.add_request(list(range(40, 51)), PARAMS)
    engine.step()  # both prompts: the warm-up
    with forward_syncs(engine.model) as per_forward:
        _record(engine, lambda args, kwargs, logits: shapes.append((args[0].shape[0], logits.shape[0])))
        engine.step()  # two decodes
        engine.step()
        engine.add_request(list(range(60, 73)), PARAMS)
        engine.step()  # the new prompt's 13 tokens with two decodes
        while engine.has_unfinished():  # decodes
            engine.step()
    return engine, shapes, per_forward


@pytest.mark.parametrize(("static_decode", "first_shapes"), [
    (False, [(2, 2), (2, 2), (15, 3), (3, 3)]),
    (True, [(2, 2), (2, 2), (15, 3), (4, 4)]),  # the static path pads 3 decodes to its bucket of 4
], ids=["eager", "static decode"])
def test_decode_and_mixed_steps_have_no_host_sync_inside_the_forward(
        scout: Path, static_decode: bool, first_shapes: list[tuple[int, int]]) -> None:
    _, shapes, per_forward = _run(scout, static_decode=static_decode)
    assert shapes[:4] == first_shapes, "the steps are not the decodes and mixed step meant"
    assert len(shapes) >= 8
    assert per_forward == [[]] * len(shapes)


def test_the_guard_sees_a_sync_inside_the_forward(scout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without grouped_mm the experts loop on the host, reading the offsets: one sync per MoE layer per forward."""
    monkeypatch.setattr(torch_moe, "_grouped_mm_works", lambda device, dtype: False)
    engine, shapes, per_forward = _run(scout)
    moe_layers = sum(isinstance(layer.feed_forward, MoE) for layer in engine.model.model.layers)
    assert moe_layers > 0
    assert len(per_forward) == len(shapes) >= 8
    for syncs in per_forward:
        assert len(syncs) == moe_layers, syncs
        assert all(s.startswith("tolist") and "torch_moe.py" in s for s in syncs), syncs


def test_a_direct_call_with_host_ids_has_no_sync_and_still_checks_them(scout: Path) -> None:
    model = load_model(scout, progress=False)
    model(torch.arange(3, 9))  # warm-up
    with HostSyncGuard() as guard:
        model(torch.arange(3, 9), logit_rows=torch.tensor([5]))
    assert guard.syncs == []
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the vocabulary"):
        model(torch.tensor([1, vocab]))
    with pytest.raises(IndexError):  # unchecked: the embedding refuses it (on a GPU, a device-side assert)
        model(torch.tensor([1, vocab]), check_ids=False)


def test_quantised_experts_keep_one_sync_per_moe_layer_and_no_other(scout: Path, tmp_path: Path) -> None:
    """The documented exception: int4 experts loop over the experts on the host (Backend.quantized_experts)."""
    engine = LLMEngine.from_pretrained(quantize_checkpoint(scout, tmp_path / "int4", "int4", progress=False),
                                       EngineConfig(kv_cache_mb=16, max_num_seqs=8))
    engine.add_request(list(range(3, 21)), PARAMS)
    engine.step()  # the warm-up
    with forward_syncs(engine.model) as per_forward:
        while engine.has_unfinished():
            engine.step()
    moe_layers = sum(isinstance(layer.feed_forward, MoE) for layer in engine.model.model.layers)
    assert len(per_forward) == PARAMS.max_tokens - 1
    for syncs in per_forward:
        assert len(syncs) == moe_layers, syncs
        assert all(s.startswith("tolist") and "herd/kernels/backend.py" in s for s in syncs), syncs


def test_prefill_chunks_that_take_image_features_have_no_host_sync(scout: Path) -> None:
    """An image split across prefill chunks (image rows and features placed by the runner) beside a decode."""
    engine = LLMEngine.from_pretrained(scout, EngineConfig(kv_cache_mb=16, max_num_batched_tokens=48, block_size=16))
    engine.add_request(list(range(3, 21)), PARAMS)
    engine.step()  # the warm-up
    placeholder = engine.model.config.image_token_id
    assert placeholder is not None
    pixels = torch.rand(1, 3, 336, 336, generator=torch.Generator().manual_seed(0)) * 2 - 1
    engine.add_request([5, 6, 7] + [placeholder] * 144 + [8, 9], PARAMS, images=[ImageInput(pixels)])
    image_forwards: list[int] = []
    with forward_syncs(engine.model) as per_forward:
        _record(engine, lambda args, kwargs, logits: image_forwards.append(kwargs.get("image_rows") is not None))
        while engine.has_unfinished():
            engine.step()
    assert sum(image_forwards) >= 3, "the image spans several prefill chunks"
    assert per_forward == [[]] * len(image_forwards)
