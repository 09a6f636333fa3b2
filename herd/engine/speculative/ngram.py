"""Prompt lookup (n-gram) drafting: no draft model. The last n tokens of a sequence (its prompt and output so far)
are looked up among its earlier tokens, and what followed their most recent earlier occurrence is proposed. The
longest n from prompt_lookup_max down to prompt_lookup_min that has an occurrence wins; a continuation that runs into
the end of the sequence carries on copying itself (a repeating output drafts the repetition). Copy-heavy work
(editing, rewriting, code, quoting the prompt) drafts well; free text drafts rarely, and then nothing is proposed.

Each sequence keeps an index of its n-grams (n-gram -> where its most recent occurrence ended), extended by the
tokens added since the last look, so a lookup costs O(prompt_lookup_max) however long the context.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from herd.engine.sequence import Sequence
from herd.engine.speculative.proposer import StepRows


class NgramIndex:
    """One sequence's tokens and, per n, the end of each n-gram's most recent occurrence that is not the suffix."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.sizes = range(max_n, min_n - 1, -1)  # longest first
        self.tokens: list[int] = []
        self._ends: dict[tuple[int, ...], int] = {}  # an n-gram -> the end (exclusive) of its latest occurrence
        self._indexed = 0  # n-grams ending at or before this are in _ends

    def catch_up(self, prompt: Seq[int], output: Seq[int]) -> None:
        """Take in the sequence's tokens added since the last call (prompt then output; neither shrinks)."""
        have = len(self.tokens)
        if have < len(prompt):
            self.tokens.extend(prompt[have:])
        self.tokens.extend(output[max(0, have - len(prompt)):])
        # Index every n-gram that ends before the last token: the suffix itself must not find itself.
        for end in range(self._indexed + 1, len(self.tokens)):
            for n in self.sizes:
                if end >= n:
                    self._ends[tuple(self.tokens[end - n:end])] = end
        self._indexed = max(self._indexed, len(self.tokens) - 1)

    def lookup(self, k: int) -> list[int]:
        """k tokens that followed the latest earlier occurrence of the longest suffix found; [] if none.

        A continuation that reaches the last token goes on with the tokens it has just proposed (an overlapping
        copy, as LZ77's): the suffix recurring p tokens back means a cycle of p tokens, and the draft carries the
        cycle on rather than stopping after p tokens (an output repeating one token drafts k of it, not one)."""
        tokens = self.tokens
        for n in self.sizes:
            if len(tokens) <= n:
                continue
            end = self._ends.get(tuple(tokens[-n:]))
            if end is not None:
                draft = tokens[end:end + k]
                while len(draft) < k:  # end < len(tokens), so the copied position is always proposed already
                    draft.append(draft[end + len(draft) - len(tokens)])
                return draft
        return []


class NgramProposer:
    """The Proposer of prompt lookup: reads no hidden states."""

    aux_layers: tuple[int, ...] = ()

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self._indices: dict[str, NgramIndex] = {}

    def propose(self, step: StepRows, wanted: Seq[tuple[Sequence, int]]) -> list[list[int]]:
        drafts = []
        for seq, k in wanted:
            index = self._indices.get(seq.request_id)
            if index is None:
                index = self._indices[seq.request_id] = NgramIndex(self.min_n, self.max_n)
            index.catch_up(seq.prompt_ids, seq.output_ids)
            drafts.append(index.lookup(k))
        return drafts

    def forget(self, seq: Sequence) -> None:
        self._indices.pop(seq.request_id, None)
