"""The static decode path (herd.engine.decode_graphs) run eagerly on the CPU against the eager unpadded one: the same
greedy tokens, the same logits up to float32 rounding, the same KV blocks, persistent buffers reused; and the
settings that turn it (and CUDA graphs) on."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
from pydantic import ValidationError

from herd.engine import EngineConfig, LLMEngine, SamplingParams, decode_graphs
from herd.engine.decode_graphs import StaticDecode, key_bucket
from herd.engine.kv_cache_manager import KVCacheManager
from herd.engine.model_runner import ModelRunner
from herd.engine.paged_kv import PagedKVCache
from herd.engine.scheduler import Scheduler
from herd.engine.sequence import Sequence
from herd.kernels.host_syncs import HostSyncGuard
from herd.model import load_model
from herd.model.tiny import make_tiny
from herd.model.tokenizer import Tokenizer

BUCKETS = [1, 2, 4, 8, 32]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=5)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, progress=False)


@dataclass
class Engine:
    runner: ModelRunner
    scheduler: Scheduler
    cache: PagedKVCache


def _engine(model, *, static: bool, buckets: list[int] = BUCKETS) -> Engine:
    config = EngineConfig(kv_cache_mb=8, max_num_seqs=32, max_num_batched_tokens=64, static_decode=static,
                          decode_buckets=buckets)
    layout = config.kv_layout(model.config)
    kv = KVCacheManager(layout, enable_prefix_caching=True)
    cache = PagedKVCache(model.config, layout, dtype=torch.float32, device=torch.device("cpu"))
    return Engine(ModelRunner(model, kv, cache, config=config), Scheduler(config.scheduler(), kv), cache)


def _prompts(model, count: int, seed: int) -> list[list[int]]:
    """`count` prompts of 2 to 46 tokens (the first 40: windows of 1 to 3 blocks, crossing the 16-token attention
    chunk), then two that start with the first one's 33 and 20 tokens (added later, they hit the prefix cache)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [40] + [2 + (i * 7 + seed) % 45 for i in range(1, count)] + [4, 7]
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    prompts[-2], prompts[-1] = prompts[0][:33] + prompts[-2], prompts[0][:20] + prompts[-1]
    return prompts


def _add(engine: Engine, prompts: list[list[int]], first: int) -> None:
    for i, ids in enumerate(prompts, start=first):
        engine.scheduler.add(Sequence(request_id=f"r{i}", prompt_ids=list(ids),
                                      params=SamplingParams(max_tokens=1000, temperature=0)))


def _step(engine: Engine) -> tuple[list[tuple[str, int, int]], torch.Tensor]:
    """One greedy step: (the chunks scheduled, the logits of its sampling rows); each sampling sequence gets its
    argmax token."""
    out = engine.scheduler.schedule()
    logits = engine.runner.run(out.chunks).sampled
    engine.scheduler.on_step_done(out)
    sampling = [c for c in out.chunks if c.samples]
    for row, chunk in enumerate(sampling):
        chunk.seq.output_ids.append(int(logits[row].argmax()))
    return [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks], logits


@pytest.mark.parametrize("count", [3, 5, 17])
def test_padded_static_decodes_give_the_unpadded_tokens_logits_and_kv(model, count):
    padded, plain = _engine(model, static=True), _engine(model, static=False)
    prompts = _prompts(model, count, seed=count)
    for engine in (padded, plain):
        _add(engine, prompts[:count], 0)
    static = padded.runner.static
    assert static is not None and plain.runner.static is None
    runs = 0
    packed: dict[tuple[int, tuple[int, ...]], int] = {}
    original_prepare = static.prepare

    def counted(chunks):
        nonlocal runs
        runs += 1
        return original_prepare(chunks)

    static.prepare = counted  # type: ignore[method-assign]
    for step in range(40):
        if step == 6:  # two late arrivals sharing earlier prompts' prefixes: prefill steps amid the decodes
            for engine in (padded, plain):
                _add(engine, prompts[count:], count)
        chunks, logits = _step(padded)
        plain_chunks, plain_logits = _step(plain)
        assert chunks == plain_chunks, f"step {step}: the schedules part"
        assert logits.shape == plain_logits.shape and logits.dtype == torch.float32
        scale = float(plain_logits.abs().max())
        assert float((logits - plain_logits).abs().max()) <= 1e-5 * scale, f"step {step}"
        for key, inputs in static.inputs.items():
            assert packed.setdefault(key, inputs.packed.data_ptr()) == inputs.packed.data_ptr(), "buffers reused"
    tokens = {s.request_id: s.output_ids for s in padded.scheduler.running}
    assert tokens == {s.request_id: s.output_ids for s in plain.scheduler.running}
    assert len(tokens) == count + 2 and all(len(t) >= 30 for t in tokens.values())
    assert runs >= 25, "most steps were pure decodes on the static path"
    assert padded.runner.kv.prefix_hit_tokens > 0, "the late arrivals started from cached blocks"
    rows = {key[0] for key in static.inputs}
    assert rows <= set(BUCKETS) and min(rows) >= count, f"batches padded to buckets, not run at {count}: {rows}"
    assert len(static.inputs) <= 6, "a few buckets cover every step"
    _assert_same_real_blocks(padded.cache, plain.cache)


def test_the_engine_generates_the_same_tokens_on_the_static_path(checkpoint, model):
    """Through LLMEngine.generate (its sampler, finish checks and outputs): greedy requests of several lengths and
    max_tokens, so the batch shrinks through buckets as they finish, give the unpadded engine's tokens."""
    prompts = _prompts(model, 6, seed=11)
    params = [SamplingParams(temperature=0, max_tokens=8 + 5 * i, ignore_eos=True) for i in range(len(prompts))]
    tokens = {}
    for static in (False, True):
        config = EngineConfig(kv_cache_mb=8, max_num_seqs=16, static_decode=static, decode_buckets=[1, 2, 4, 8, 16])
        engine = LLMEngine(model, Tokenizer.from_pretrained(checkpoint), config)
        # Built here with this config, so the test does not depend on how LLMEngine builds its runner.
        engine.runner = ModelRunner(model, engine.kv, engine.runner.cache, config=config)
        tokens[static] = [out.token_ids for out in engine.generate(prompts, params)]
        assert (engine.runner.static is not None) == static
        if static:
            assert {key[0] for key in engine.runner.static.inputs} >= {8, 4, 2, 1}, "the batch shrank through buckets"
    assert tokens[True] == tokens[False]
    assert [len(t) for t in tokens[True]] == [p.max_tokens for p in params]


def _assert_same_real_blocks(padded: PagedKVCache, plain: PagedKVCache) -> None:
    """Every block a sequence can hold has the unpadded run's keys and values (so no padding row wrote there); the
    padding rows wrote to the scratch block, which the unpadded run never touches."""
    wrote_scratch = False
    for layer, group in enumerate(padded.groups):
        scratch = padded.scratch_block[group]
        for ours, theirs in ((padded.k[layer], plain.k[layer]), (padded.v[layer], plain.v[layer])):
            torch.testing.assert_close(ours[:scratch], theirs[:scratch], rtol=1e-5, atol=1e-5)
            assert not theirs[scratch].any()
            wrote_scratch |= bool(ours[scratch].any())
    assert wrote_scratch


def test_a_batch_beyond_the_largest_bucket_and_mixed_steps_run_unpadded(model):
    engine = _engine(model, static=True, buckets=[1, 2])
    _add(engine, _prompts(model, 3, seed=1)[:3], 0)
    for _ in range(8):
        _step(engine)
    assert engine.runner.static is not None and not engine.runner.static.inputs


def test_the_padded_forward_has_no_host_sync(model):
    """What a CUDA graph cannot hold: no value read on the host in what a graph captures (the plans built from the
    buffers and the model's forward; the CPU proxy of herd.kernels.host_syncs)."""
    engine = _engine(model, static=True)
    _add(engine, _prompts(model, 5, seed=2)[:5], 0)
    _step(engine)  # the prefills, and the first call's one-time grouped_mm probe
    static = engine.runner.static
    assert static is not None
    captured = static._forward
    per_forward: list[list[str]] = []

    def guarded(inputs):
        with HostSyncGuard() as guard:
            out = captured(inputs)
        per_forward.append(guard.syncs)
        return out

    static._forward = guarded  # type: ignore[method-assign]
    for _ in range(6):
        _step(engine)
    assert len(per_forward) >= 4 and per_forward == [[]] * len(per_forward)


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: replay re-runs the captured forward and writes its output
    tensor in place, so like a real graph it sees only what was copied into the buffers it closed over."""

    def __init__(self, forward, out: torch.Tensor) -> None:
        self.forward, self.out = forward, out

    def replay(self) -> None:
        self.out.copy_(self.forward())


def test_replayed_graphs_read_each_step_from_the_persistent_buffers(model, monkeypatch):
    captured: list[FakeGraph] = []

    def fake_capture(forward, device, pool):
        out = forward()
        captured.append(FakeGraph(forward, out))
        return captured[-1], out

    monkeypatch.setattr(decode_graphs, "capture", fake_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 0))
    padded, plain = _engine(model, static=True), _engine(model, static=False)
    static = padded.runner.static
    assert static is not None
    static.graphs, static.max_graphs = True, 1
    keys: list[tuple[int, tuple[int, ...]]] = []
    original_pack = static._pack

    def pack(chunks):
        key, host = original_pack(chunks)
        keys.append(key)
        return key, host

    static._pack = pack  # type: ignore[method-assign]

    prompts = _prompts(model, 5, seed=9)[:5]
    for engine in (padded, plain):
        _add(engine, prompts, 0)
    for _ in range(30):
        _, logits = _step(padded)
        _, plain_logits = _step(plain)
        torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-5 * float(plain_logits.abs().max()))
    assert [s.output_ids for s in padded.scheduler.running] == [s.output_ids for s in plain.scheduler.running]
    assert len(captured) == 1 == len(static.captured), "captured once per bucket, at most max_graphs"
    assert len(set(keys)) > 1, "the buckets past the limit ran eagerly"
    assert sum(k in static.captured for k in keys) > len(captured), "graphs were replayed on later steps"


def test_a_failed_capture_is_logged_once_and_decodes_run_eagerly(model, monkeypatch, caplog):
    calls = 0

    def failing_capture(forward, device, pool):
        nonlocal calls
        calls += 1
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decode_graphs, "capture", failing_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 0))
    padded, plain = _engine(model, static=True), _engine(model, static=False)
    assert padded.runner.static is not None
    padded.runner.static.graphs = True
    prompts = _prompts(model, 4, seed=4)[:4]
    for engine in (padded, plain):
        _add(engine, prompts, 0)
    with caplog.at_level(logging.WARNING, logger="herd.engine.decode_graphs"):
        for _ in range(20):
            _step(padded)
            _step(plain)
    assert [s.output_ids for s in padded.scheduler.running] == [s.output_ids for s in plain.scheduler.running]
    assert calls == 1 and padded.runner.static.capture_failed and not padded.runner.static.captured
    assert len([r for r in caplog.records if "capture" in r.getMessage()]) == 1


def test_key_buckets_are_powers_of_two():
    assert [key_bucket(w) for w in [1, 2, 3, 4, 5, 8, 9, 33]] == [1, 2, 4, 4, 8, 8, 16, 64]


def test_graphs_are_refused_for_a_model_off_cuda(model):
    config = EngineConfig(kv_cache_mb=8)
    layout = config.kv_layout(model.config)
    kv = KVCacheManager(layout)
    cache = PagedKVCache(model.config, layout, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="cuda device"):
        StaticDecode(model, kv, cache, batch_sizes=[1], graphs=True, max_graphs=1)


# --- settings -------------------------------------------------------------------------------------------------
def test_graphs_and_the_static_path_default_to_on_exactly_on_cuda():
    cpu, cuda = EngineConfig(), EngineConfig(device="cuda:1")
    assert (cpu.use_cuda_graphs, cpu.use_static_decode) == (False, False)
    assert (cuda.use_cuda_graphs, cuda.use_static_decode) == (True, True)
    assert EngineConfig(static_decode=True).use_static_decode and not EngineConfig(static_decode=True).use_cuda_graphs
    off = EngineConfig(device="cuda", cuda_graphs=False)
    assert (off.use_cuda_graphs, off.use_static_decode) == (False, False)
    eager = EngineConfig(device="cuda", cuda_graphs=False, static_decode=True)
    assert (eager.use_cuda_graphs, eager.use_static_decode) == (False, True)


@pytest.mark.parametrize(("settings", "message"), [
    ({"cuda_graphs": True}, "cuda_graphs is true but device is 'cpu'"),
    ({"device": "cuda", "cuda_graphs": True, "static_decode": False}, "static_decode is false"),
    ({"decode_buckets": [1, 4, 2]}, "rise strictly"),
    ({"decode_buckets": [2, 2]}, "rise strictly"),
    ({"decode_buckets": [0, 1]}, "greater than or equal to 1"),
    ({"decode_buckets": []}, "at least 1 item"),
    ({"max_cuda_graphs": 0}, "greater than or equal to 1"),
])
def test_bad_decode_settings_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        EngineConfig(**settings)


@pytest.mark.parametrize(("buckets", "max_seqs", "sizes"), [
    ([1, 2, 4, 8, 16, 32, 64, 128, 256], 20, (1, 2, 4, 8, 16, 20)),
    ([1, 2, 4, 8, 16, 32, 64, 128, 256], 64, (1, 2, 4, 8, 16, 32, 64)),
    ([1, 2], 64, (1, 2)),
    ([8, 16], 4, (4,)),
])
def test_decode_batch_sizes_are_the_buckets_capped_at_max_num_seqs(buckets, max_seqs, sizes):
    assert EngineConfig(decode_buckets=buckets, max_num_seqs=max_seqs).decode_batch_sizes == sizes
