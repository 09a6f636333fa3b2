"""Context parallelism on gloo: two trunks (threads of this process, each with its own copy of the tiny model) step
in lockstep; part of each one's sequence's global-layer KV is held by the other. Every logit of the prefill chunks
and of greedy decoding equals the single-process model's over a contiguous cache; the held rows are really at the
peer; and a peer that answers with a wrong log-sum-exp makes the comparison fail."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch

from herd.model import load_model
from herd.model.tiny import make_tiny
from herd.workers.collective import CollectiveGroup, open_rendezvous
from herd.workers.context_parallel import ContextParallelKV

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # float32; the split runs the sums in another order (seen: ~1.5e-6)
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Step:
    """One lockstep forward of one trunk: a prefill chunk [start, end), a decode (start None), or idle."""

    holder: int | None = None  # where this forward's global-layer k/v go; None: idle (no tokens of its own)
    start: int | None = None
    end: int | None = None


# Tiny config: 4 layers, layer 3 global (NoPE), attention_chunk_size 16. Trunk 0's 70 tokens span 5 chunks; its
# prefill chunks 0:24 and 50:70 keep their global-layer KV at trunk 1, 24:50 and the decode steps at trunk 0.
# Trunk 1's 20 tokens: 0:12 held by trunk 0, the rest by itself; it idles while trunk 0 prefills and at the end.
PLANS = {
    0: [Step(1, 0, 24), Step(0, 24, 50), Step(1, 50, 70)] + [Step(0)] * 6,
    1: [Step(0, 0, 12), Step(1, 12, 20), Step()] + [Step(1)] * 4 + [Step()] * 2,
}
# Three trunks: trunk 0's prefill chunks go to trunks 1, 2 and itself, its decodes to trunk 2; trunk 1's sequence
# starts a step late, half at trunk 2; trunk 2 owns nothing and only holds.
PLANS_3 = {
    0: [Step(1, 0, 24), Step(2, 24, 50), Step(0, 50, 70)] + [Step(2)] * 3,
    1: [Step(), Step(2, 0, 10), Step(1, 10, 20)] + [Step(1)] * 3,
    2: [Step()] * 6,
}
GLOBAL = 3


def _prompt(model, rank, seed, plan):
    tokens = max((step.end for step in plan if step.end is not None), default=0)
    g = torch.Generator().manual_seed(100 * seed + rank)
    return torch.randint(0, model.config.vocab_size, (tokens,), generator=g)


def _run(prompt, step_forward, plan):
    """Every step's logits [T, V] (None when idle) and the greedy tokens, driving `step_forward(ids, positions,
    holder)` (ids None: idle)."""
    logits_per_step, tokens, prompt_end = [], [], 0
    for step in plan:
        if step.holder is None:
            step_forward(None, None, None)
            logits_per_step.append(None)
            continue
        if step.start is not None:
            ids, positions = prompt[step.start:step.end], torch.arange(step.start, step.end)
            prompt_end = step.end
        else:
            ids, positions = torch.tensor([tokens[-1]]), torch.tensor([prompt_end + len(tokens) - 1])
        logits = step_forward(ids, positions, step.holder).float()
        logits_per_step.append(logits)
        if step.end is None or step.end == prompt.shape[0]:
            tokens.append(int(logits[-1].argmax()))
    return logits_per_step, tokens


def _reference(path, rank, seed, plans=PLANS):
    model = load_model(path, progress=False)
    cache = model.new_cache()
    return _run(_prompt(model, rank, seed, plans[rank]),
                lambda ids, positions, _: None if ids is None else model(ids, positions, cache), plans[rank])


def _trunk(path, rank, rendezvous, store, seed, plan, context):
    group = CollectiveGroup(rendezvous, rank, store=store if rank == 0 else None)
    model = load_model(path, progress=False)
    kv = context(group, model.config, dtype=torch.float32, timeout_s=TIMEOUT_S)
    kv.start_sequence()

    def forward(ids, positions, holder):
        if ids is None:
            return kv.idle()
        kv.place(holder)
        return model(ids, positions, kv)

    logits, tokens = _run(_prompt(model, rank, seed, plan), forward, plan)
    return logits, tokens, kv, group


def _trunks(path, seed, plans=PLANS, contexts=None):
    """Each rank of `plans` a thread with its own model and context; their (logits, tokens, context, group)."""
    ranks = range(len(plans))
    contexts = contexts or [ContextParallelKV] * len(plans)
    store, rendezvous = open_rendezvous("127.0.0.1", len(plans), backend="gloo", timeout_s=TIMEOUT_S)
    with ThreadPoolExecutor(len(plans)) as pool:
        futures = [pool.submit(_trunk, path, r, rendezvous, store, seed, plans[r], contexts[r]) for r in ranks]
        results = [f.result(timeout=120) for f in futures]
    for *_, group in results:
        group.close()
    return results


def _assert_same_logits(got, expected):
    assert len(got) == len(expected)
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert (g is None) == (e is None), f"step {step}"
        if g is not None:
            torch.testing.assert_close(g, e, **TOLERANCE, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("preset", ["scout", "maverick"])
@pytest.mark.parametrize("seed", [0, 1])
def test_split_global_kv_is_exact_and_held_by_the_peer(tmp_path, preset, seed):
    path = make_tiny(tmp_path / preset, preset=preset, seed=seed)
    assert load_model(path, progress=False).config.chunk_size(GLOBAL) is None
    trunks = _trunks(path, seed)
    for rank, (logits, tokens, _, _) in enumerate(trunks):
        expected_logits, expected_tokens = _reference(path, rank, seed)
        _assert_same_logits(logits, expected_logits)
        assert tokens == expected_tokens and len(tokens) == {0: 7, 1: 5}[rank]

    kv0, kv1 = trunks[0][2], trunks[1][2]
    # Trunk 0 kept 24:50 and its 6 decode positions of the global layer; trunk 1 holds 0:24 and 50:70 for it.
    assert kv0.own[GLOBAL].positions.tolist() == list(range(24, 50)) + list(range(70, 76))
    assert kv1.held[0][GLOBAL].positions.tolist() == list(range(0, 24)) + list(range(50, 70))
    assert kv1.held[0][GLOBAL].k.shape[0] == 44 and kv0.own[GLOBAL].k.shape[0] == 32
    # The other way: trunk 0 holds 0:12 of trunk 1's sequence, trunk 1 kept 12:20 and its 4 decodes.
    assert kv0.held[1][GLOBAL].positions.tolist() == list(range(0, 12))
    assert kv1.own[GLOBAL].positions.tolist() == list(range(12, 24))
    # Chunked layers never leave the owner.
    assert len(kv0.own[0]) == 76 and len(kv1.own[0]) == 24
    assert kv0.remote == {1} and kv1.remote == {0}


def test_three_trunks_one_of_them_only_holding(tmp_path):
    path = make_tiny(tmp_path / "maverick", preset="maverick", seed=3)
    trunks = _trunks(path, 3, PLANS_3)
    for rank in (0, 1):
        expected_logits, expected_tokens = _reference(path, rank, 3, PLANS_3)
        _assert_same_logits(trunks[rank][0], expected_logits)
        assert trunks[rank][1] == expected_tokens
    kv0, kv1, kv2 = (kv for _, _, kv, _ in trunks)
    assert kv1.held[0][GLOBAL].positions.tolist() == list(range(0, 24))
    assert kv2.held[0][GLOBAL].positions.tolist() == list(range(24, 50)) + list(range(70, 73))
    assert kv0.own[GLOBAL].positions.tolist() == list(range(50, 70))
    assert kv2.held[1][GLOBAL].positions.tolist() == list(range(0, 10))
    assert kv1.own[GLOBAL].positions.tolist() == list(range(10, 23))
    assert len(kv2.own[0]) == 0 and kv0.remote == {1, 2} and kv1.remote == {2}


class WrongLse(ContextParallelKV):
    """A holder whose answers weigh its part e times too much."""

    def _answer(self, peer, layer, request):
        out, lse = super()._answer(peer, layer, request)
        return out, lse + 1.0


class NoRemote(ContextParallelKV):
    """An owner that attends only to the keys it kept (still exchanging, so its peer does not block)."""

    def _exchange_answers(self, layer, answers, asked):
        replies = super()._exchange_answers(layer, answers, asked)
        return {p: (out, torch.full_like(lse, float("-inf"))) for p, (out, lse) in replies.items()}


@pytest.mark.parametrize("contexts", [[ContextParallelKV, WrongLse], [NoRemote, ContextParallelKV]],
                         ids=["holder-answers-wrong-lse", "owner-skips-remote-part"])
def test_a_wrong_or_missing_remote_part_breaks_the_comparison(tmp_path, contexts):
    path = make_tiny(tmp_path / "scout", preset="scout", seed=0)
    logits, _, _, _ = _trunks(path, 0, contexts=contexts)[0]
    expected, _ = _reference(path, 0, 0)
    # Chunk 24:50 sees keys both here and at trunk 1: its logits must be off.
    assert (logits[1] - expected[1]).abs().max() > 1e-2
