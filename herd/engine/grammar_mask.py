"""A step's token masks for its constrained rows: filled in one batched call (llguidance's executor, in parallel
and without the GIL) while the step's forward runs, then applied to the logits in the sampler.

Legend: G constrained rows, W = ceil(vocab / 32) words of the bitmask, V the model's vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import llguidance
import llguidance.torch
import torch

from herd.engine.grammar import Grammar

_BITS = torch.arange(32, dtype=torch.int32)


@dataclass(frozen=True)
class GrammarMask:
    """rows: the step's sampling rows that are constrained; bits: their allowed tokens, bit t % 32 of word
    t // 32 set when token t may come next [G, W] int32 (on the host)."""

    rows: list[int]
    bits: torch.Tensor


class MaskFiller:
    """Fills the masks of a step's constrained rows (one executor per engine)."""

    def __init__(self, vocab_size: int, num_threads: int = 2) -> None:
        self.words = (vocab_size + 31) // 32
        self._executor = llguidance.LLExecutor(num_threads)

    def fill(self, grammars: Sequence[Grammar | None],
             drafts: Sequence[Sequence[int]] | None = None) -> GrammarMask | None:
        """The mask of every row with a Grammar (None when there is none), read from the grammars' states now.
        With drafts (speculative decoding), sequence i has 1 + len(drafts[i]) rows, one after each of its drafts
        in turn (the grammar is advanced through them and rolled back); the rows are numbered over all of them."""
        if drafts is None:
            constrained = [row for row, grammar in enumerate(grammars) if grammar is not None]
            if not constrained:
                return None
            bits = torch.zeros(len(constrained), self.words, dtype=torch.int32)  # [G, W]
            matchers = [(grammar.matcher, index) for index, grammar in enumerate(g for g in grammars if g is not None)]
            llguidance.torch.fill_next_token_bitmask_par(self._executor, matchers, bits)
            return GrammarMask(rows=constrained, bits=bits)
        rows: list[int] = []
        plain: list[tuple[llguidance.LLMatcher, int]] = []
        with_drafts: list[tuple[llguidance.LLMatcher, int, list[int]]] = []
        first = 0
        for grammar, verified in zip(grammars, drafts, strict=True):
            if grammar is not None:
                if verified:
                    with_drafts.append((grammar.matcher, len(rows), list(verified)))
                else:
                    plain.append((grammar.matcher, len(rows)))
                rows += range(first, first + len(verified) + 1)
            first += len(verified) + 1
        if not rows:
            return None
        bits = torch.zeros(len(rows), self.words, dtype=torch.int32)  # [G, W], G counting every draft's row
        if plain:
            llguidance.torch.fill_next_token_bitmask_par(self._executor, plain, bits)
        if with_drafts:
            llguidance.torch.fill_next_token_bitmask_par_with_draft_tokens(self._executor, with_drafts, bits)
        return GrammarMask(rows=rows, bits=bits)


def allowed(bits: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """Boolean [G, V] from a bitmask [G, W]; tokens past the mask's 32 * W are not allowed."""
    words = bits.to(device)
    unpacked = ((words[:, :, None] >> _BITS.to(device)) & 1).bool().flatten(1)  # [G, 32 W]
    if unpacked.shape[1] >= vocab:
        return unpacked[:, :vocab]
    pad = torch.zeros(unpacked.shape[0], vocab - unpacked.shape[1], dtype=torch.bool, device=device)
    return torch.cat([unpacked, pad], dim=1)
