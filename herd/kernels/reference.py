"""The plain MoE that every fast path is checked against: ~20 lines, no permutation, no cleverness.

Legend: T tokens, k experts per token, E experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_reference(
    x: torch.Tensor, router_logits: torch.Tensor, k: int, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Routed-expert output [T, H] for x [T, H], logits [T, E], gate_up [E, H, 2I], down [E, I, H]."""
    top_logits, top_ids = torch.topk(router_logits, k, dim=1)  # [T, k]
    scores = torch.sigmoid(top_logits.float()).to(x.dtype)  # [T, k]
    out = torch.zeros_like(x)
    for slot in range(k):
        for e in torch.unique(top_ids[:, slot]).tolist():
            tokens = (top_ids[:, slot] == e).nonzero().squeeze(1)  # tokens whose slot-th choice is e
            xin = x[tokens] * scores[tokens, slot, None]  # Llama 4 scales the expert input
            gate, up = (xin @ gate_up[e]).chunk(2, dim=-1)
            out.index_add_(0, tokens, (up * F.silu(gate)) @ down[e])
    return out
