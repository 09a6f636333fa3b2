"""The engine serving LoRA adapters on the tiny checkpoints: exact greedy per adapter, mixed batches, the prefix
cache kept apart per adapter, LRU residency with pinned slots, and the errors."""

from __future__ import annotations

import pydantic
import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.model import load_model
from herd.model.lora import load_adapter
from herd.model.lora_config import AdapterError
from herd.model.tiny import make_tiny
from herd.model.tiny_lora import make_tiny_lora

TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
SMALL = dict(kv_cache_mb=16, max_num_seqs=8)
NAMES = ("x", "y", "z")
SPECS = {"x": dict(rank=4, targets=("attention", "experts")), "y": dict(rank=16, targets=("shared_expert",
         "dense_mlp")), "z": dict(rank=8, use_rslora=True)}


def _prompt(seed: int, length: int = 20) -> list[int]:
    return torch.randint(0, 400, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(tiny, **config) -> LLMEngine:
    engine = LLMEngine.from_pretrained(tiny["model"], EngineConfig(**{**SMALL, **config}))
    for name in NAMES:
        engine.add_adapter(name, tiny[name])
    return engine


def _generate(engine: LLMEngine, prompt: list[int], adapter: str | None, params=GREEDY) -> list[int]:
    return engine.generate([prompt], params, adapter=adapter)[0].token_ids


def _make(root, preset: str, seed: int) -> dict:
    model = make_tiny(root / "model", preset=preset, seed=seed)
    config = load_model(model, progress=False).config
    return {"model": model, **{name: make_tiny_lora(root / name, config, seed=20 + i, strength=1.0, **SPECS[name])
                               for i, name in enumerate(NAMES)}}


@pytest.fixture(scope="module", params=["scout", "maverick"])
def tiny(request, tmp_path_factory):
    return _make(tmp_path_factory.mktemp(request.param), request.param, 3)


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("scout_lora"), "scout", 4)


@pytest.fixture(scope="module")
def alone(scout):
    """Each adapter's (and the base model's) greedy tokens for prompt 0, each request alone, nothing cached."""
    engine = _engine(scout, max_loras=1, enable_prefix_caching=False)
    return {name: _generate(engine, _prompt(0), name) for name in (*NAMES, None)}


@torch.no_grad()
def _model_greedy(tiny, adapter: str, prompt: list[int]) -> list[int]:
    """The reference: the model's own forward over the whole sequence with the adapter in slot 0, argmax."""
    model = load_model(tiny["model"], progress=False)
    model.new_adapter_bank(slots=1).load(0, load_adapter(tiny[adapter], model.config))
    ids = list(prompt)
    for _ in range(TOKENS):
        logits = model(torch.tensor(ids), adapter_slots=torch.zeros(len(ids), dtype=torch.int64))  # [T, V]
        ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):]


def test_adapter_greedy_equals_the_model_with_the_adapter(tiny):
    engine = _engine(tiny, max_loras=2)
    prompt = _prompt(1)
    for name in ("x", "z"):
        got = _generate(engine, prompt, name)
        assert got == _model_greedy(tiny, name, prompt), name
        assert got != _generate(engine, prompt, None), f"adapter {name} must change the output"


def test_mixed_batch_gives_each_request_its_tokens_alone(scout, alone):
    engine = _engine(scout, max_loras=3, enable_prefix_caching=False)
    order = ("x", None, "y", "z", None, "x")
    ids = [engine.add_request(_prompt(0), GREEDY, adapter=name) for name in order]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    assert [done[rid] for rid in ids] == [alone[name] for name in order]
    assert engine.stats().lora_adapters_resident == 3


def test_a_step_without_adapter_requests_runs_the_base_model_alone(scout, alone):
    """With adapters resident, a step whose requests all run on the base model computes no LoRA deltas (it gives
    the model no adapter slots), and one that mixes them does."""
    engine = _engine(scout, max_loras=2, enable_prefix_caching=False)
    assert _generate(engine, _prompt(0), "x") == alone["x"]  # x resident from now on
    forward, seen = engine.model.forward, []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("adapter_slots"))
        return forward(*args, **kwargs)

    engine.model.forward = recording
    assert _generate(engine, _prompt(0), None) == alone[None]
    assert seen and all(slots is None for slots in seen)
    seen.clear()
    assert _generate(engine, _prompt(0), "x") == alone["x"]
    assert seen and all(slots is not None for slots in seen)


def test_prefix_cache_never_hits_across_adapters(scout, alone):
    engine = _engine(scout, max_loras=3)
    prompt = _prompt(0)  # 20 tokens: one full block of 16 to share
    for name in ("x", "y", None):
        assert _generate(engine, prompt, name) == alone[name]
        assert engine.stats().prefix_hit_tokens == 0, f"{name} must not reuse another adapter's KV"
    assert _generate(engine, prompt, "x") == alone["x"]
    assert engine.stats().prefix_hit_tokens == 16


def test_lru_loads_and_evicts_and_stays_exact(scout, alone):
    engine = _engine(scout, max_loras=2)
    for name in ("x", "y", "z", "x", "z"):
        assert _generate(engine, _prompt(0), name) == alone[name], name
    stats = engine.stats()
    # x, y load; z evicts x (least recent); x evicts y; z is resident.
    assert (stats.lora_adapter_loads, stats.lora_adapter_evictions, stats.lora_adapters_resident) == (4, 2, 2)


def test_a_slot_held_by_a_running_sequence_is_never_evicted(scout, alone):
    engine = _engine(scout, max_loras=2, enable_prefix_caching=False)
    short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    rids = {name: engine.add_request(_prompt(0), short if name == "x" else GREEDY, adapter=name) for name in NAMES}
    first_token_step: dict[str, int] = {}
    finished_step: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished():
        step += 1
        for out in engine.step():
            first_token_step.setdefault(out.request_id, step)
            if out.finished:
                finished_step[out.request_id] = step
                tokens[out.request_id] = out.token_ids
        if step == 1:
            assert engine.stats().waiting == 1 and engine.stats().lora_adapter_evictions == 0
    assert first_token_step[rids["z"]] > finished_step[rids["x"]], "z must wait for x's slot"
    assert tokens[rids["z"]] == alone["z"] and tokens[rids["y"]] == alone["y"]
    assert tokens[rids["x"]] == alone["x"][:3]
    assert (engine.stats().lora_adapter_loads, engine.stats().lora_adapter_evictions) == (3, 1)


def test_errors(scout, tmp_path):
    engine = LLMEngine.from_pretrained(scout["model"], EngineConfig(**SMALL, max_loras=1, max_lora_rank=8))
    engine.add_adapter("x", scout["x"])
    engine.add_adapter("z", scout["z"])
    assert engine.adapters() == ["x", "z"]
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.add_request(_prompt(0), GREEDY, adapter="nope")
    with pytest.raises(ValueError, match="already registered"):
        engine.add_adapter("x", scout["x"])
    with pytest.raises(AdapterError, match="rank 16"):  # over max_lora_rank
        engine.add_adapter("wide", scout["y"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError):
        engine.add_adapter("broken", broken)
    assert "wide" not in engine.adapters() and "broken" not in engine.adapters()
    rid = engine.add_request(_prompt(0), GREEDY, adapter="x")
    with pytest.raises(ValueError, match="in use"):
        engine.remove_adapter("x")
    engine.abort(rid)
    engine.step()
    engine.remove_adapter("x")
    assert "x" not in engine.adapters()
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.add_request(_prompt(0), GREEDY, adapter="x")
    off = LLMEngine.from_pretrained(scout["model"], EngineConfig(**SMALL))
    with pytest.raises(ValueError, match="off"):
        off.add_adapter("x", scout["x"])
    with pytest.raises(ValueError, match="off"):
        off.add_request(_prompt(0), GREEDY, adapter="x")
    assert off.adapters() == []


@pytest.mark.parametrize("settings", [dict(static_decode=True), dict(speculative={"method": "ngram"}),
                                      dict(async_scheduling=True)])
def test_refused_combinations(settings):
    with pytest.raises(pydantic.ValidationError, match="max_loras"):
        EngineConfig(max_loras=2, **settings)
    EngineConfig(max_loras=0, **settings)


def test_lora_keeps_cuda_graphs_off_by_default():
    config = EngineConfig(max_loras=1, device="cuda")
    assert not config.use_cuda_graphs and not config.use_static_decode
