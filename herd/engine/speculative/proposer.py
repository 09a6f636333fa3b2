"""What a draft proposer is given and gives back.

Legend: N tokens in the step, A auxiliary layers, H hidden size.

After every step the engine hands its proposer what the step computed (StepRows): the chunks, how many tokens of
each are now part of their sequence (a verifying chunk's rejected drafts are not), and, when the proposer asks
for them (aux_layers), the target's hidden states entering those layers for every row of the step. The proposer
takes that in (EAGLE-3 keeps its draft layer's KV in step with the target's) and drafts up to k tokens for each
sequence the engine wants drafts for: tokens that might follow the sequence's known tokens.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

import torch

from herd.engine.scheduler import ScheduledChunk
from herd.engine.sequence import Sequence


@dataclass(frozen=True)
class StepRows:
    """One step as a proposer sees it, after its tokens are recorded."""

    chunks: Seq[ScheduledChunk] = ()
    """The step's chunks in row order (a chunk's rows are its positions start..start + num_tokens - 1)."""
    kept: Seq[int] = ()
    """Per chunk: its tokens now part of the sequence (its KV valid): num_tokens less its rejected drafts."""
    aux_hidden: torch.Tensor | None = None
    """[N, A*H]: the hidden states entering each of the proposer's aux_layers (low to high), per row of the step;
    None when the proposer asks for none or the step ran nothing."""
    finished: frozenset[str] = field(default_factory=frozenset)
    """Request ids that finished in the step (nothing more to keep for them)."""


class Proposer(Protocol):
    """Drafts tokens for sequences between steps."""

    aux_layers: tuple[int, ...]
    """Target layers whose entering hidden states the proposer reads (empty: none, the runner skips them)."""

    def propose(self, step: StepRows, wanted: Seq[tuple[Sequence, int]]) -> list[list[int]]:
        """Take in the step; then for each (sequence, k) up to k draft tokens to follow its known tokens (fewer,
        or none, where the proposer has nothing good)."""
        ...

    def forget(self, seq: Sequence) -> None:
        """The sequence left the engine (finished, aborted): drop what is kept for it."""
        ...
