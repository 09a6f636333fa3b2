"""ModelRunner: a step of prefill chunks and decodes through the model's own forward over the paged cache,
against that same model's plain full-sequence forward."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from herd.engine import EngineConfig
from herd.engine.kv_cache_manager import KVCacheManager
from herd.engine.model_runner import ModelRunner
from herd.engine.paged_kv import PagedKVCache
from herd.engine.sampling_params import SamplingParams
from herd.engine.scheduler import Scheduler
from herd.engine.sequence import Sequence
from herd.model import load_model
from herd.model.tiny import make_tiny

ENGINE = Path(__file__).resolve().parents[3] / "herd" / "engine"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=21), progress=False)


def _runner(model, *, step_tokens: int) -> tuple[ModelRunner, Scheduler]:
    config = EngineConfig(kv_cache_mb=8, max_num_seqs=8, max_num_batched_tokens=step_tokens)
    layout = config.kv_layout(model.config)
    kv = KVCacheManager(layout, enable_prefix_caching=False)
    cache = PagedKVCache(model.config, layout, dtype=torch.float32, device=torch.device("cpu"))
    return ModelRunner(model, kv, cache), Scheduler(config.scheduler(), kv)


def _sequences(model, lengths: list[int], seed: int) -> list[Sequence]:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return [Sequence(request_id=f"r{i}", prompt_ids=torch.randint(0, vocab, (n,), generator=generator).tolist(),
                     params=SamplingParams(max_tokens=100, temperature=0)) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_steps_give_the_full_forwards_logits(model, seed):
    """Chunked prefills (crossing the 16-token attention chunk and one another) and decodes in the same steps;
    each sampled row equals the full causal forward's last row over the same tokens."""
    runner, scheduler = _runner(model, step_tokens=24)
    sequences = _sequences(model, [5, 23, 40, 17], seed)
    for seq in sequences:
        scheduler.add(seq)
    generator = torch.Generator().manual_seed(100 + seed)
    checked, mixed = 0, False
    for _ in range(12):
        out = scheduler.schedule()
        logits = runner.run(out.chunks).sampled
        sampling = [c for c in out.chunks if c.samples]
        assert logits.shape == (len(sampling), model.config.vocab_size) and logits.dtype == torch.float32
        mixed |= any(c.num_tokens == 1 for c in out.chunks) and any(c.num_tokens > 1 for c in out.chunks)
        scheduler.on_step_done(out)
        for row, chunk in enumerate(sampling):
            expected = model.logits(torch.tensor(chunk.seq.token_ids()))[-1]
            assert float((logits[row] - expected).norm() / expected.norm()) < 1e-5
            chunk.seq.output_ids.append(int(torch.randint(0, model.config.vocab_size, (1,), generator=generator)))
            checked += 1
    assert mixed and checked >= 20


def test_a_step_without_sampling_rows_returns_no_logits(model):
    runner, scheduler = _runner(model, step_tokens=16)
    (seq,) = _sequences(model, [40], seed=3)
    scheduler.add(seq)
    out = scheduler.schedule()
    assert [c.samples for c in out.chunks] == [False]  # 16 of 40 prompt tokens
    assert runner.run(out.chunks).sampled.shape == (0, model.config.vocab_size)


def test_the_engine_reaches_into_no_layer() -> None:
    """The runner (and the paged attention it hands the model) lay out a step; the arithmetic is the model's.
    No file of the engine names a decoder layer's sub-modules or the model's own."""
    sub_modules = {"self_attn", "feed_forward", "input_layernorm", "post_attention_layernorm", "q_proj", "k_proj",
                   "v_proj", "o_proj", "project", "embed_tokens", "lm_head", "layers", "experts", "router"}
    for path in sorted(ENGINE.glob("*.py")):
        named = {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}
        assert not named & sub_modules, f"{path.name} reaches into the model: {sorted(named & sub_modules)}"


@pytest.mark.parametrize("seed", [0, 1])
def test_chunks_verifying_drafts_give_a_row_per_draft_equal_to_the_full_forward(model, seed):
    """Decoding sequences verifying drafts (batched into one attention call per layer, across the 16-token
    attention chunk) beside a prefill: each of a verifying chunk's 1 + d rows equals the full causal forward's row
    at that position over the known tokens and the drafts."""
    runner, scheduler = _runner(model, step_tokens=64)
    sequences = _sequences(model, [13, 6, 30, 20], seed)
    for seq in sequences[:3]:
        scheduler.add(seq)
    out = scheduler.schedule()  # the three prompts
    runner.run(out.chunks)
    scheduler.on_step_done(out)
    generator = torch.Generator().manual_seed(200 + seed)
    vocab = model.config.vocab_size
    for seq, count in zip(sequences[:3], (5, 2, 7), strict=True):
        seq.output_ids.append(int(torch.randint(0, vocab, (1,), generator=generator)))
        seq.draft_ids = torch.randint(0, vocab, (count,), generator=generator).tolist()
    scheduler.add(sequences[3])
    out = scheduler.schedule()
    assert [len(c.drafts) for c in out.chunks] == [5, 2, 7, 0]
    logits = runner.run(out.chunks).sampled
    assert logits.shape == (6 + 3 + 8 + 1, vocab)
    row = 0
    for chunk in out.chunks:
        tokens = chunk.seq.prompt_ids + chunk.seq.output_ids + list(chunk.drafts)
        full = model.logits(torch.tensor(tokens))  # [T, V]
        expected = full[len(tokens) - 1 - len(chunk.drafts) :]
        got = logits[row : row + 1 + len(chunk.drafts)]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        row += 1 + len(chunk.drafts)
