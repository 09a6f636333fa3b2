"""What permute did to the rows, so that experts can find their slices and combine can undo it.

Legend: T tokens, k experts per token, G groups (one per expert, in output order), R = T*k rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Permutation:
    """How permute grouped the rows, and what combine needs to undo it."""

    expert_offsets: torch.Tensor  # [G+1] int64: rows of group g are rows[offsets[g]:offsets[g+1]]
    group_experts: torch.Tensor  # [G] int64: the expert each group holds (arange(E) unless ordered)
    row_source: torch.Tensor  # [R] integer: flat (token * k + choice) index each row came from
    source_row: torch.Tensor  # [R] integer: the row that holds each flat (token * k + choice)
    top_k: int

