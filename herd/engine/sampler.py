"""Choosing the next token of every sampling row in one pass over the step's logits: greedy, or temperature
with top-k, top-p and min-p, after the rows' own penalties and logit bias (herd.engine.penalties); plus
log-probabilities when asked.

Legend: B rows that sample this step, R of them drawn (not greedy), F of those filtered (top-k, top-p or
min-p), L rows asking for log-probabilities, N the most alternatives any of them asks for, V vocab.

A seeded request's draw is a pure function of (seed, position): a counter-based hash of the two gives the
uniform that inverse-CDF sampling turns into a token, so the request gets the same tokens whatever else is in
its batch and at whichever row. Unseeded rows take their uniforms from the engine's one generator. The host
sees one copy of the chosen ids per step, and one more of the log-probabilities when some row asked for them.
Log-probabilities are those of the model's distribution (log-softmax of the raw logits), the chosen token's
and the top-n alternatives', whatever the sampling settings; the chosen token's also for the rows of a best_of
request, whose candidates are ranked by their sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from herd.engine.grammar_mask import GrammarMask, allowed
from herd.engine.penalties import History, apply_penalties
from herd.engine.sampling_params import SamplingParams

_LOW32 = 0xFFFFFFFF


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability and the most likely alternatives, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def sample_batch(
    logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int],
    generator: torch.Generator | None, histories: Sequence[History | None] | None = None,
    mask: GrammarMask | None = None,
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Next token of each row of float32 logits [B, V], and its log-probabilities where asked. positions[i] is
    how many tokens row i's request has generated so far; a seeded row's draw depends on nothing else.
    Unseeded rows draw from generator (None: torch's global one), which must be on the logits' device.
    histories[i] is row i's tokens where its params penalise or bias them (herd.engine.penalties): those rows
    choose from the changed logits; their log-probabilities stay the model's. mask holds the constrained rows'
    allowed tokens (herd.engine.grammar_mask): the rest are never chosen, whatever the other settings."""
    if not len(params) == len(positions) == logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits, {len(params)} params, {len(positions)} positions")
    raw = logits
    logits = apply_penalties(logits, params, histories or [None] * len(params))
    if mask is not None:
        logits = _constrain(logits, raw, mask)
    tokens = logits.argmax(dim=-1)  # [B]
    drawn = [row for row, p in enumerate(params) if not p.greedy]
    if drawn:
        rows = _index(drawn, len(params), logits.device)
        tokens[rows] = _draw(logits[rows], [params[r] for r in drawn], [positions[r] for r in drawn], generator)
    ids: list[int] = tokens.tolist()
    return ids, _logprobs(raw, tokens, ids, params)


def _constrain(logits: torch.Tensor, raw: torch.Tensor, mask: GrammarMask) -> torch.Tensor:
    """The logits [B, V] with the constrained rows' disallowed tokens at -inf (a copy; raw is left alone), by one
    add of -inf. A row whose penalties or bias left no allowed token finite chooses among the allowed ones by the
    raw logits; a row whose mask allows nothing (a constraint in error) is left as it was, and the engine ends it."""
    out = logits.clone() if logits is raw else logits
    rows = torch.tensor(mask.rows, dtype=torch.int64, device=logits.device)  # [G]
    ok = allowed(mask.bits, logits.shape[-1], logits.device)  # [G, V]
    usable = ok.any(dim=-1, keepdim=True)  # [G, 1]
    block = torch.zeros(ok.shape, dtype=out.dtype, device=out.device).masked_fill_(~ok & usable, float("-inf"))
    out.index_add_(0, rows, block)
    dead = ~torch.isfinite(out.index_select(0, rows)).any(dim=-1)  # [G]; an unusable row is never dead
    if bool(dead.any()):
        out[rows[dead]] = raw.index_select(0, rows[dead]) + block[dead]
    return out


def filtered_sorted(
    scaled: torch.Tensor, *, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-scaled logits [F, V] sorted best first, with the tokens that top-k [F] (0: all), top-p [F]
    and min-p [F] exclude set to -inf, applied in that order; and the sort's order (vocab ids). Only the best
    `width` W of each row are kept ([F, W] each): V, or the largest top-k when every row has one (a topk
    instead of a full sort; what lies beyond it is dropped by top-k anyway)."""
    if width < scaled.shape[-1]:
        sorted_logits, order = scaled.topk(width, dim=-1)  # [F, W] each
    else:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [F, V] each
    ranks = torch.arange(sorted_logits.shape[-1], device=scaled.device)  # [W]
    drop = (top_k[:, None] > 0) & (ranks >= top_k[:, None])  # [F, V]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Drop a token when the mass before it already reaches top_p; the first token's is 0, so it always stays.
    drop |= ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p < 1.0)[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    drop |= probs < (min_p * probs[:, 0])[:, None]
    return sorted_logits.masked_fill(drop, float("-inf")), order


def seeded_uniforms(seeds: Sequence[int], positions: Sequence[int], device: torch.device) -> torch.Tensor:
    """A float32 uniform in [0, 1) [R] for each (seed < 2**64, position < 2**32): a 32-bit integer hash
    (Wellons' lowbias32, chained over the seed's two halves and the position) in int64 ops that never
    overflow, so it is the same on every device."""
    words = torch.tensor([[s & _LOW32, s >> 32, p & _LOW32] for s, p in zip(seeds, positions, strict=True)],
                         dtype=torch.int64, device=device)  # [R, 3]
    h = _mix32(words[:, 0] ^ 0x9E3779B9)
    h = _mix32(h ^ words[:, 1])
    h = _mix32(h ^ words[:, 2])
    return (h >> 8).to(torch.float32) * 2.0**-24


def _draw(logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int],
          generator: torch.Generator | None) -> torch.Tensor:
    """Sampled token ids [R] from float32 logits [R, V] (no greedy rows)."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)  # [R]
    scaled = logits / temperature[:, None]  # [R, V]
    uniforms = _uniforms(params, positions, generator, device)  # [R]
    filtered = [row for row, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0 or p.min_p > 0.0]
    plain = sorted(set(range(len(params))) - set(filtered))
    out = torch.empty(len(params), dtype=torch.int64, device=device)  # [R]
    if plain:
        rows = _index(plain, len(params), device)
        out[rows] = _inverse_cdf(torch.softmax(scaled[rows], dim=-1), uniforms[rows])
    if filtered:
        rows = _index(filtered, len(params), device)
        # top_k is unbounded; any k >= V keeps everything, as 0 does.
        top_k = [min(params[r].top_k, vocab) or vocab for r in filtered]
        settings = torch.tensor([[params[r].top_p, params[r].min_p, k] for r, k in zip(filtered, top_k, strict=True)],
                                dtype=torch.float64, device=device)  # [F, 3]
        sorted_logits, order = filtered_sorted(
            scaled[rows], top_k=settings[:, 2].to(torch.int64), top_p=settings[:, 0].to(logits.dtype),
            min_p=settings[:, 1].to(logits.dtype), width=max(top_k),
        )
        picked = _inverse_cdf(torch.softmax(sorted_logits, dim=-1), uniforms[rows])  # [F], among the best W
        # The kept tokens are a prefix of the sorted order; stay inside it whatever the cumsum's rounding.
        picked = torch.minimum(picked, (sorted_logits > float("-inf")).sum(-1) - 1)
        out[rows] = order.gather(1, picked[:, None]).squeeze(1)
    return out


def _uniforms(params: Sequence[SamplingParams], positions: Sequence[int], generator: torch.Generator | None,
              device: torch.device) -> torch.Tensor:
    """One uniform in [0, 1) per row [R]: the seeded rows' from their (seed, position), the rest from generator."""
    uniforms = torch.rand(len(params), generator=generator, device=device)
    seeded = [row for row, p in enumerate(params) if p.seed is not None]
    if seeded:
        seeds = [s for s in (params[row].seed for row in seeded) if s is not None]
        rows = _index(seeded, len(params), device)
        uniforms[rows] = seeded_uniforms(seeds, [positions[row] for row in seeded], device)
    return uniforms


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The index [R] where each row of (possibly unnormalised) probabilities [R, V] first exceeds its uniform's
    share of the row's mass; never a zero-probability index."""
    cumulative = probs.cumsum(dim=-1)  # [R, V]
    total = cumulative[:, -1:]  # [R, 1]
    # u * total can round up to total itself; the float just below it still lies inside the last token's step.
    target = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, target, right=True).squeeze(1)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, ids: list[int],
              params: Sequence[SamplingParams]) -> list[TokenLogprobs | None]:
    """Each row's TokenLogprobs where its params ask for them or rank best_of candidates by them (None elsewhere),
    from one copy to the host."""
    asking = [row for row, p in enumerate(params) if p.logprobs is not None or p.ranks_candidates]
    result: list[TokenLogprobs | None] = [None] * len(params)
    if not asking:
        return result
    rows = _index(asking, len(params), logits.device)
    logprobs = torch.log_softmax(logits[rows], dim=-1)  # [L, V]
    counts = [params[row].logprobs or 0 for row in asking]
    top_values, top_ids = torch.topk(logprobs, max(counts))  # [L, N] each
    chosen = logprobs.gather(1, tokens[rows][:, None])  # [L, 1]
    # float32 values and ids below 2**53 are exact in float64, so one table carries both.
    table = torch.cat([chosen.double(), top_values.double(), top_ids.double()], dim=1).tolist()  # [L, 1 + 2N]
    width = max(counts)
    for row, n, line in zip(asking, counts, table, strict=True):
        top = tuple((int(line[1 + width + i]), line[1 + i]) for i in range(n))
        result[row] = TokenLogprobs(token_id=ids[row], logprob=line[0], top=top)
    return result


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of 32-bit values held in int64 [R]."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for 32-bit x in int64, by 16-bit halves so no product passes 2**48."""
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _LOW32


def _index(rows: list[int], total: int, device: torch.device) -> torch.Tensor | slice:
    """An index of the given rows; a plain slice when they are all of them (no gather copy)."""
    if len(rows) == total:
        return slice(None)
    return torch.tensor(rows, dtype=torch.int64, device=device)
