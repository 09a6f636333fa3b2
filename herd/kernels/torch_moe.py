"""The MoE stages in vectorised torch: the CPU backend, the reference for the CUDA one, and the GPU fallback.

Legend: T tokens, k experts per token, E experts, G groups, H hidden, I expert intermediate, R = T*k.

Inputs were checked by herd.kernels.api. No Python loop runs over tokens; the expert GEMMs use
torch._grouped_mm (one call for all experts, no host sync), or one matmul per non-empty expert where
this torch build lacks it for the device and dtype at hand.

Host syncs (issue 20): route, permute, combine and the grouped GEMMs keep counts and offsets on the device
(grouped_mm reads each group's end row from device memory), so none makes the host wait. Two places do:
the per-expert fallback reads the offsets to slice the rows (one sync per call; on CUDA only where this
torch build's grouped_mm refuses the GPU or the dtype), and the first call per device and dtype tries
grouped_mm once and reads the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd.kernels.lora import ExpertsLoRA, lora_delta
from herd.kernels.permutation import Permutation


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] -> ids [T, k] int32, sigmoid scores [T, k] in the logits' dtype (computed in float32)."""
    top_logits, top_ids = torch.topk(router_logits, k, dim=1)
    return top_ids.to(torch.int32), torch.sigmoid(top_logits.float()).to(router_logits.dtype)


def permute(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_scores: torch.Tensor, expert_order: torch.Tensor
) -> tuple[torch.Tensor, Permutation]:
    """Rows grouped in `expert_order` (stable in token order), scaled by their scores: [R, H]."""
    groups = expert_order.shape[0]
    rank = torch.empty_like(expert_order)
    rank[expert_order] = torch.arange(groups, device=x.device)  # group of each expert
    keys = rank[topk_ids.reshape(-1).long()]  # [R]
    row_source = torch.argsort(keys, stable=True)  # [R]
    source_row = torch.empty_like(row_source)
    source_row[row_source] = torch.arange(row_source.shape[0], device=x.device)
    k = topk_ids.shape[1]
    scale = topk_scores.reshape(-1)[row_source]  # [R]
    rows = x.index_select(0, torch.div(row_source, k, rounding_mode="floor")) * scale[:, None]
    # Rows before each group in the sorted keys; bincount would size its output by the keys' max (a sync on CUDA).
    offsets = torch.searchsorted(keys.index_select(0, row_source), torch.arange(groups + 1, device=x.device))  # [G+1]
    permutation = Permutation(
        expert_offsets=offsets, group_experts=expert_order, row_source=row_source, source_row=source_row, top_k=k
    )
    return rows, permutation


def experts(
    rows: torch.Tensor, expert_offsets: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
    lora: ExpertsLoRA | None = None,
) -> torch.Tensor:
    """SwiGLU per expert over its slice of rows: [R, H] -> [R, H].

    With `lora`, each row's adapter delta is added to the gate/up projection before the activation and to the
    down projection after it (herd.kernels.lora).
    """
    if _grouped_mm_works(rows.device, rows.dtype):
        try:
            return _grouped_experts(rows, expert_offsets, gate_up, down, lora)
        except RuntimeError:  # a shape or alignment this build's grouped GEMM refuses: per-expert below
            pass
    return _looped_experts(rows, expert_offsets, gate_up, down, lora)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, written into `gate` when no autograd graph needs it (saves a pass and a buffer).

    The caller must own `gate` (a fresh GEMM output); up is only read.
    """
    if torch.is_inference_mode_enabled() or not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return F.silu(gate, inplace=True).mul_(up)
    return F.silu(gate) * up


def _grouped_experts(
    rows: torch.Tensor, expert_offsets: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
    lora: ExpertsLoRA | None,
) -> torch.Tensor:
    inter = down.shape[1]
    ends = expert_offsets[1:].to(torch.int32)  # grouped_mm takes each group's end row
    gate_up_out = torch._grouped_mm(rows, gate_up, offs=ends)  # [R, 2I]
    if lora is not None and lora.gate_up is not None:
        gate_up_out = gate_up_out + lora_delta(rows, lora.gate_up, lora.row_index)
    act = swiglu(gate_up_out[:, :inter], gate_up_out[:, inter:])  # [R, I], a view into gate_up_out
    out = torch._grouped_mm(act, down, offs=ends)  # [R, H]
    if lora is not None and lora.down is not None:
        out = out + lora_delta(act, lora.down, lora.row_index)
    return out


def _looped_experts(
    rows: torch.Tensor, expert_offsets: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
    lora: ExpertsLoRA | None,
) -> torch.Tensor:
    inter = down.shape[1]
    out = torch.empty_like(rows)
    bounds = expert_offsets.tolist()  # the host slices the rows: a sync, the reason grouped_mm is preferred
    for e in range(gate_up.shape[0]):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            gate_up_out = rows[start:end] @ gate_up[e]  # [n, 2I]
            if lora is not None and lora.gate_up is not None:
                gate_up_out += lora_delta(rows[start:end], lora.gate_up, lora.row_index[start:end])
            act = swiglu(gate_up_out[:, :inter], gate_up_out[:, inter:])  # [n, I]
            torch.mm(act, down[e], out=out[start:end])
            if lora is not None and lora.down is not None:
                out[start:end] += lora_delta(act, lora.down, lora.row_index[start:end])
    return out


def combine(out_rows: torch.Tensor, permutation: Permutation, num_tokens: int) -> torch.Tensor:
    """Gather each token's k rows and sum them (in float32 for bf16): [R, H] -> [T, H]."""
    gathered = out_rows.index_select(0, permutation.source_row)  # [T*k, H], token-major
    if permutation.top_k == 1:
        return gathered
    summed = gathered.view(num_tokens, permutation.top_k, -1).sum(1, dtype=torch.float32)
    return summed.to(out_rows.dtype)


_GROUPED_MM: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs here (CPU builds have it; CUDA needs a recent GPU): tried once."""
    key = (device.type if device.index is None else f"{device.type}:{device.index}", dtype)
    if key not in _GROUPED_MM:
        try:
            a = torch.ones(16, 16, device=device, dtype=dtype)
            b = torch.ones(2, 16, 16, device=device, dtype=dtype)
            out = torch._grouped_mm(a, b, offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
            _GROUPED_MM[key] = bool(out[0, 0] == 16)
        except (AttributeError, RuntimeError, NotImplementedError):
            _GROUPED_MM[key] = False
    return _GROUPED_MM[key]
