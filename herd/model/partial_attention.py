"""Attention over part of the keys, and the exact merge of such parts: what lets one sequence's keys live in
several places (context parallelism, herd.engine.context_parallel) and still attend as if they were in one.

Legend: T query tokens, S key tokens (of this part), N query heads, K key/value heads, D head dim, P parts.

The invariant: softmax attention over keys A ∪ B is a weighted mean of the attention over A and over B, each
weighted by its softmax mass, exp(lse). So every part returns its normalised output and its log-sum-exp, and the
merge weights part i by exp(lse_i - max_j lse_j), which never overflows. A query that sees no key of a part (its
mask row is empty there) gets lse = -inf and output 0 from that part: weight 0 in the merge. Masks and scale are
causal_attention.attend's, so a merge over a split of the keys equals attend over all of them (to float32
rounding: the sums run in another order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from herd.model.causal_attention import attention_mask


def attend_partial(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA attention of q [T, N, D] over this part's k/v [S, K, D] -> (out [T, N, D], lse [T, N]), both float32.

    `out` is normalised over this part's visible keys only; rows that see none here: out 0, lse -inf."""
    return attend_partial_masked(q, k, v, attention_mask(q_positions, k_positions, chunk_size))


def attend_partial_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """attend_partial with the mask given: `visible` [T, S] bool, which keys each query sees (several sequences'
    queries and keys in one call: each sees its own)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not share {kv_heads} key/value heads evenly")
    group = heads // kv_heads
    keys = k.float().repeat_interleave(group, dim=1)  # [S, N, D]: head n reads kv head n // group, as SDPA's GQA
    values = v.float().repeat_interleave(group, dim=1)  # [S, N, D]
    scores = torch.einsum("tnd,snd->nts", q.float(), keys) * q.shape[-1] ** -0.5  # [N, T, S]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [N, T]; -inf where a row sees nothing (or S is 0)
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # keeps empty rows at exp(-inf) = 0
    weights = torch.exp(scores - shift[..., None])  # [N, T, S]
    out = torch.einsum("nts,snd->tnd", weights, values).contiguous()  # [T, N, D]
    return out, lse.transpose(0, 1).contiguous()


def merge_partials(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine parts' (out [T, N, D], lse [T, N]) over disjoint key sets -> the attention over their union
    [T, N, D] float32 (0 for rows no part has a key for)."""
    return combine_partials(parts)[0]


def combine_partials(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """merge_partials, and the union's log-sum-exp [T, N] (-inf for rows no part has a key for): itself a part."""
    if not parts:
        raise ValueError("merge_partials needs at least one part")
    outs = torch.stack([out.float() for out, _ in parts])  # [P, T, N, D]
    lses = torch.stack([lse.float() for _, lse in parts])  # [P, T, N]
    top = lses.max(dim=0).values  # [T, N]
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lses - top)  # [P, T, N]; a part with lse -inf weighs 0
    total = weights.sum(dim=0)  # [T, N]
    merged = (weights[..., None] * outs).sum(dim=0)  # [T, N, D]
    out = torch.where(total[..., None] > 0, merged / total.clamp_min(torch.finfo(total.dtype).tiny)[..., None],
                      torch.zeros_like(merged))
    return out, top + torch.log(total)  # log(0) = -inf where nothing was seen
