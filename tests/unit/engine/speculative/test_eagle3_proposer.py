"""Eagle3Proposer on the tiny targets: the paged, incremental head (catch-up over prompts in chunks, verifying steps
that keep only part of their drafts, chained drafts batched over sequences) drafts what a plain dense reference
written here drafts: the head over each whole sequence at once, full causal attention, no cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from herd.engine import EngineConfig
from herd.engine.kv_cache_manager import CHUNKED, KVCacheManager, KVLayout
from herd.engine.paged_attention import PagedAttention
from herd.engine.paged_kv import PagedKVCache
from herd.engine.sampling_params import SamplingParams
from herd.engine.scheduler import ScheduledChunk
from herd.engine.sequence import Sequence, Status
from herd.engine.speculative.eagle3 import Eagle3Proposer
from herd.engine.speculative.proposer import StepRows
from herd.model import load_model
from herd.model.eagle3 import Eagle3Head
from herd.model.rope import inv_frequencies
from herd.model.tiny import make_tiny
from herd.model.tiny_eagle3 import make_tiny_eagle3

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["scout", "maverick"])
def tiny(request, tmp_path_factory):
    target = make_tiny(tmp_path_factory.mktemp(request.param), preset=request.param, seed=5)
    return load_model(target, progress=False), make_tiny_eagle3(target, seed=5)


def _proposer(model, head_dir, *, prefix_caching: bool = False) -> tuple[Eagle3Proposer, KVCacheManager, PagedKVCache]:
    layout = EngineConfig(kv_cache_mb=8, max_num_seqs=8).kv_layout(model.config)
    kv = KVCacheManager(layout, enable_prefix_caching=prefix_caching)
    cache = PagedKVCache(model.config, layout, dtype=torch.float32, device=CPU)
    return Eagle3Proposer.from_path(head_dir, model, kv, cache), kv, cache


def _sequence(kv: KVCacheManager, name: str, length: int, seed: int, vocab: int) -> Sequence:
    g = torch.Generator().manual_seed(seed)
    seq = Sequence(request_id=name, prompt_ids=torch.randint(0, vocab, (length,), generator=g).tolist(),
                   params=SamplingParams(max_tokens=64, temperature=0))
    kv.admit(seq)
    seq.status = Status.RUNNING
    return seq


def _step(model, kv, cache, aux_layers, plan: list[tuple[Sequence, int, tuple[int, ...]]]) -> StepRows:
    """One engine step done by hand: each (seq, known tokens, drafts) chunk through the target's paged forward;
    greedy verification of the drafts; the sampled tokens recorded; what the proposer is handed."""
    chunks, ids = [], []
    for seq, n, drafts in plan:
        known = seq.token_ids()
        assert kv.allocate(seq, n + len(drafts))
        samples = seq.num_computed + n == len(known)
        chunks.append(ScheduledChunk(seq, seq.num_computed, n + len(drafts), samples, drafts))
        ids += known[seq.num_computed : seq.num_computed + n] + list(drafts)
    positions = torch.cat([torch.arange(c.start, c.start + c.num_tokens) for c in chunks])
    paged = PagedAttention.for_step(chunks, kv, cache, CPU)
    logits, aux = model.forward_with_aux(torch.tensor(ids), positions, paged, aux_layers=aux_layers)
    kept, row = [], 0
    for chunk in chunks:
        seq, n = chunk.seq, chunk.num_known
        accepted = 0
        if chunk.samples:
            greedy = logits[row + n - 1 : row + chunk.num_tokens].argmax(-1).tolist()
            while accepted < len(chunk.drafts) and greedy[accepted] == chunk.drafts[accepted]:
                accepted += 1
            seq.output_ids += [*chunk.drafts[:accepted], greedy[accepted]]
        kept.append(n + accepted)
        seq.num_computed += n + accepted
        kv.on_computed(seq)
        row += chunk.num_tokens
    return StepRows(chunks=chunks, kept=kept, aux_hidden=aux)


# --- the dense reference: Llama 3 arithmetic written out, the head's weights, no cache -----------------------------
def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """HF Llama's RoPE: x [R, heads, D] at angles [R, D/2]."""
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _interleaved(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Llama 4's RoPE (pairs 2i, 2i+1): the wrong one for an EAGLE-3 head, for the control."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)


def _dense_rows(head: Eagle3Head, tokens: torch.Tensor, hidden: torch.Tensor, rope=_rotate_half) -> torch.Tensor:
    """The head's outputs [R, H] for rows (token p + 1, hidden p) at positions 0..R-1, full causal attention."""
    layer, eps, c = head.midlayer, head.config.rms_norm_eps, head.config
    attn = layer.self_attn
    x = torch.cat([_rms(head.embed_tokens(tokens), layer.input_layernorm.weight, eps),
                   _rms(hidden, layer.hidden_norm.weight, eps)], -1)
    rows = x.shape[0]
    angles = torch.arange(rows).float()[:, None] * inv_frequencies(c.rope, c.head_dim)[None]
    q = rope((x @ attn.q_proj.weight.T).view(rows, c.num_attention_heads, c.head_dim), angles)
    k = rope((x @ attn.k_proj.weight.T).view(rows, c.num_key_value_heads, c.head_dim), angles)
    v = (x @ attn.v_proj.weight.T).view(rows, c.num_key_value_heads, c.head_dim)
    groups = c.num_attention_heads // c.num_key_value_heads
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(c.head_dim)
    scores = scores.masked_fill(torch.ones(rows, rows, dtype=torch.bool).triu(1), float("-inf"))
    attended = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(rows, -1)
    h = hidden + attended @ attn.o_proj.weight.T
    n = _rms(h, layer.post_attention_layernorm.weight, eps)
    mlp = layer.mlp
    return h + (F.silu(n @ mlp.gate_proj.weight.T) * (n @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


@torch.inference_mode()
def _reference(model, head: Eagle3Head, known: list[int], k: int, *, rope=_rotate_half, aux_shift: int = 0,
               ) -> tuple[list[int], torch.Tensor]:
    """k greedy drafts after `known`, and their draft logits [k, Vd], from the whole sequence at once."""
    _, aux = model.forward_with_aux(torch.tensor(known), aux_layers=head.aux_layers)  # [L, A*H], no cache
    length = len(known)
    tokens = list(known[1:])
    hidden = aux[aux_shift : aux_shift + length - 1] @ head.fc.weight.T  # rows 0..L-2
    drafts, scores = [], []
    for _ in range(k):
        out = _dense_rows(head, torch.tensor(tokens), hidden, rope)
        score = _rms(out[-1], head.norm.weight, head.config.rms_norm_eps) @ head.lm_head.weight.T
        draft = int(score.argmax())
        drafts.append(draft + int(head.d2t[draft]))
        scores.append(score)
        tokens.append(drafts[-1])
        hidden = torch.cat([hidden, out[-1:]])
    return drafts, torch.stack(scores)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).norm() / b.norm()) < 1e-4


def test_paged_incremental_drafts_equal_the_dense_reference(tiny):
    model, head_dir = tiny
    proposer, kv, cache = _proposer(model, head_dir)
    head, vocab = proposer.head, model.config.vocab_size
    a, b = _sequence(kv, "a", 13, 1, vocab), _sequence(kv, "b", 22, 2, vocab)
    # The prompts in chunks (b's over three steps, crossing a block), then a decodes while b's prompt ends.
    assert proposer.propose(_step(model, kv, cache, proposer.aux_layers, [(a, 8, ()), (b, 8, ())]), []) == []
    proposer.propose(_step(model, kv, cache, proposer.aux_layers, [(a, 5, ()), (b, 8, ())]), [])
    step = _step(model, kv, cache, proposer.aux_layers, [(a, 1, ()), (b, 6, ())])
    wanted = [(a, 3), (b, 3)]
    drafted = proposer.draft(step, wanted)
    checked = 0
    for (seq, k), tokens, logits in zip(wanted, drafted.tokens, drafted.logits, strict=True):
        assert seq.num_computed == len(seq.token_ids()) - 1
        expected, expected_logits = _reference(model, head, seq.token_ids(), k)
        assert tokens == expected and logits.shape == (3, 64) and _close(logits, expected_logits)
        checked += 1
    # A verifying step: a's drafts as proposed (likely rejected), b's with the target's own next token first (kept),
    # so the chunks keep fewer rows than they ran and the proposer catches up on the kept ones only.
    greedy_b = int(model.logits(torch.tensor(b.token_ids()))[-1].argmax())
    step = _step(model, kv, cache, proposer.aux_layers,
                 [(a, 1, tuple(drafted.tokens[0])), (b, 1, (greedy_b, *drafted.tokens[1][1:]))])
    assert step.kept[1] >= 2 and b.output_ids[1] == greedy_b
    drafted = proposer.draft(step, [(b, 2), (a, 3)])
    for (seq, k), tokens, logits in zip([(b, 2), (a, 3)], drafted.tokens, drafted.logits, strict=True):
        expected, expected_logits = _reference(model, head, seq.token_ids(), k)
        assert tokens == expected and _close(logits, expected_logits)
        checked += 1
    assert checked == 4


def test_a_cached_prefix_carries_the_heads_kv(tiny):
    """b starts from the block a's prompt left in the prefix cache (its tokens past the block are a's too, so the
    head's key at the block's last slot is the one b would compute): b computes only its tail, and drafts exactly
    what the dense reference drafts over its whole sequence."""
    model, head_dir = tiny
    proposer, kv, cache = _proposer(model, head_dir, prefix_caching=True)
    vocab = model.config.vocab_size
    a = _sequence(kv, "a", 20, 6, vocab)
    proposer.propose(_step(model, kv, cache, proposer.aux_layers, [(a, 20, ())]), [])
    b = Sequence(request_id="b", prompt_ids=[*a.prompt_ids[:18], 3, 4, 5, 6, 7],
                 params=SamplingParams(max_tokens=8, temperature=0))
    kv.admit(b)
    assert b.num_computed == 16
    step = _step(model, kv, cache, proposer.aux_layers, [(b, 7, ())])
    drafted = proposer.draft(step, [(b, 3)])
    expected, expected_logits = _reference(model, proposer.head, b.token_ids(), 3)
    assert drafted.tokens == [expected] and _close(drafted.logits[0], expected_logits)


def test_the_comparison_can_fail(tiny):
    """The reference is sensitive to what the proposer could get wrong: the aux row of another position, or
    Llama 4's interleaved RoPE instead of the head's rotate-half, changes the draft logits well past tolerance."""
    model, head_dir = tiny
    proposer, kv, cache = _proposer(model, head_dir)
    seq = _sequence(kv, "c", 20, 3, model.config.vocab_size)
    step = _step(model, kv, cache, proposer.aux_layers, [(seq, 20, ())])
    drafted = proposer.draft(step, [(seq, 3)])
    _, right = _reference(model, proposer.head, seq.token_ids(), 3)
    _, shifted = _reference(model, proposer.head, seq.token_ids()[:-1], 3, aux_shift=1)
    _, interleaved = _reference(model, proposer.head, seq.token_ids(), 3, rope=_interleaved)
    assert _close(drafted.logits[0], right)
    assert not _close(drafted.logits[0][0], shifted[0]) and not _close(drafted.logits[0], interleaved)


def test_finished_sequences_and_sequences_not_caught_up_get_no_drafts(tiny):
    model, head_dir = tiny
    proposer, kv, cache = _proposer(model, head_dir)
    vocab = model.config.vocab_size
    a, b = _sequence(kv, "a", 9, 4, vocab), _sequence(kv, "b", 30, 5, vocab)
    step = _step(model, kv, cache, proposer.aux_layers, [(a, 9, ()), (b, 10, ())])
    finished = StepRows(chunks=step.chunks, kept=step.kept, aux_hidden=step.aux_hidden, finished=frozenset({"a"}))
    # a finished in the step (its blocks may be gone); b's prompt is not all computed: neither drafts.
    assert proposer.propose(finished, [(a, 3), (b, 3)]) == [[], []]
    assert len(proposer.propose(step, [(a, 3), (b, 0)])[0]) == 3


def test_the_draft_kv_is_a_full_group_layer_of_the_targets_cache(tiny):
    model, head_dir = tiny
    layers = len(PagedKVCache(model.config, EngineConfig(kv_cache_mb=8).kv_layout(model.config), dtype=torch.float32,
                              device=CPU).groups)
    proposer, _, cache = _proposer(model, head_dir)
    assert proposer.layer == layers and cache.groups[-1] == "full"
    assert cache.k[proposer.layer].shape[2:] == (proposer.head.num_kv_heads, proposer.head.head_dim)
    assert proposer.head.embed_tokens is model.model.embed_tokens  # the tiny head shares the target's


def test_a_target_without_full_attention_is_refused(tiny):
    model, head_dir = tiny
    layout = KVLayout(block_size=16, chunk_size=16, num_blocks={CHUNKED: 8}, bytes_per_block={CHUNKED: 1})
    with pytest.raises(ValueError, match="no full-attention layers"):
        Eagle3Proposer.from_path(head_dir, model, KVCacheManager(layout), cache=None)  # type: ignore[arg-type]
