"""The four MoE stages and the quantised matmul behind one API: inputs are checked here, then run by the backend
of the tensors' device (herd.kernels.backend: torch on the CPU; CuPy kernels and cuBLAS on CUDA).

Legend: T tokens, k experts per token, E experts, G = E groups in output order, H hidden,
I expert intermediate, R = T*k rows, Din / Dout a weight's inputs / outputs.

Every check raises ValueError naming the tensor and the values, before anything is launched. Checks of shapes,
dtypes and devices read no values and always run. The checks that read values (permute's ids in range, experts'
offsets rising) make the host wait for the device (a sync), so a caller whose tensors are valid by construction
(the model's MoE layer: route's ids, permute's offsets) passes check_values=False and its forward keeps no sync.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import cast

import torch

from herd.kernels.backend import backend_for
from herd.kernels.lora import ExpertsLoRA, LoRAStack
from herd.kernels.permutation import Permutation
from herd.kernels.quantized import QuantizedTensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16)
MAX_EXPERTS = 1024  # the CUDA gating kernel keeps one bit per expert a lane owns (32 lanes x 32 bits)


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token on the raw logits and the sigmoid of each: ([T, k] int32, [T, k])."""
    check_tensor("router_logits", router_logits, dims=2, dtypes=FLOAT_DTYPES)
    experts = router_logits.shape[1]
    if not 1 <= experts <= MAX_EXPERTS:
        raise ValueError(f"router_logits has {experts} experts; 1..{MAX_EXPERTS} are supported")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts:
        raise ValueError(f"k must be an integer in 1..{experts} (experts), got {k!r}")
    return backend_for(router_logits.device).route(router_logits, k)


def permute(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_scores: torch.Tensor,
    num_experts: int,
    *,
    expert_order: Sequence[int] | torch.Tensor | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, Permutation]:
    """Group the k copies of every token by expert, each scaled by its score: rows [R, H].

    `expert_order` lists the experts in the order their groups should appear (for example shard by
    shard, so each shard's rows are one contiguous slice); by default experts are in id order. Within
    a group rows keep token order, so results do not depend on how a batch was assembled.
    `check_values=False` skips checking that topk_ids are in 0..num_experts-1 (a host sync), for ids
    in range by construction, such as route's.
    """
    check_tensor("x", x, dims=2, dtypes=FLOAT_DTYPES)
    check_tensor("topk_ids", topk_ids, dims=2, dtypes=(torch.int32,), device=x.device)
    check_tensor("topk_scores", topk_scores, dims=2, dtypes=(x.dtype,), device=x.device)
    if topk_ids.shape[0] != x.shape[0] or topk_ids.shape != topk_scores.shape:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_scores {tuple(topk_scores.shape)} must both be "
            f"[{x.shape[0]}, k] for x {tuple(x.shape)}"
        )
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be an integer in 1..{MAX_EXPERTS}, got {num_experts!r}")
    if check_values and topk_ids.numel():
        low, high = (int(v) for v in torch.aminmax(topk_ids))
        if low < 0 or high >= num_experts:
            raise ValueError(f"topk_ids hold experts {low}..{high}, outside 0..{num_experts - 1}")
    order = _expert_order(expert_order, num_experts, x.device)
    return backend_for(x.device).permute(x, topk_ids, topk_scores, order)


def experts(
    rows: torch.Tensor,
    expert_offsets: torch.Tensor,
    gate_up: torch.Tensor | QuantizedTensor,
    down: torch.Tensor | QuantizedTensor,
    *,
    check_values: bool = True,
    lora: ExpertsLoRA | None = None,
) -> torch.Tensor:
    """SwiGLU of each expert over its own rows: [R, H] -> [R, H]; experts with no rows cost nothing.

    gate_up [E', H, 2I] and down [E', I, H] hold exactly the experts that expert_offsets [E'+1]
    describes, in the same order: all of a layer's experts, or the subset a shard owns. Both are tensors
    in the rows' dtype, or both QuantizedTensors of one scheme (int4 or FP8, see herd.kernels.schemes).
    `check_values=False` skips checking that expert_offsets rise from 0 to R (a host sync), for offsets
    valid by construction, such as permute's. Float weights then run with no sync where torch._grouped_mm
    runs (CPU; CUDA bfloat16 on recent GPUs); its per-expert fallback and quantised weights loop over the
    experts on the host, which reads the offsets (one sync per call).
    `lora`: per-row adapter deltas on the gate/up and down projections (herd.kernels.lora), float weights only.
    """
    check_tensor("rows", rows, dims=2, dtypes=FLOAT_DTYPES)
    quantized = isinstance(gate_up, QuantizedTensor) or isinstance(down, QuantizedTensor)
    if quantized:
        _check_quantized(gate_up, down, rows.device)
    else:
        check_tensor("gate_up", gate_up, dims=3, dtypes=(rows.dtype,), device=rows.device)
        check_tensor("down", down, dims=3, dtypes=(rows.dtype,), device=rows.device)
    check_tensor("expert_offsets", expert_offsets, dims=1, dtypes=(torch.int64, torch.int32), device=rows.device)
    count, hidden, inter2 = gate_up.shape
    if down.shape != (count, inter2 // 2, hidden) or inter2 % 2:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not fit together")
    if rows.shape[1] != hidden:
        raise ValueError(f"rows must be [R, {hidden}] for gate_up {tuple(gate_up.shape)}, got {tuple(rows.shape)}")
    if expert_offsets.shape != (count + 1,):
        raise ValueError(
            f"expert_offsets must be [{count + 1}] for {count} experts, got {tuple(expert_offsets.shape)}"
        )
    if check_values:
        bounds = expert_offsets.tolist()  # one device sync, however many experts
        if bounds[0] != 0 or bounds[-1] != rows.shape[0] or any(b < a for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"expert_offsets must rise from 0 to {rows.shape[0]} rows, got {bounds}")
    if lora is not None:
        if quantized:
            raise ValueError("LoRA on routed experts needs float expert weights, not quantised ones")
        _check_experts_lora(lora, rows, hidden, inter2 // 2)
    backend = backend_for(rows.device)
    if quantized:
        return backend.quantized_experts(rows, expert_offsets, cast(QuantizedTensor, gate_up),
                                         cast(QuantizedTensor, down))
    return backend.experts(rows, expert_offsets, cast(torch.Tensor, gate_up), cast(torch.Tensor, down), lora)


def combine(out_rows: torch.Tensor, permutation: Permutation, num_tokens: int) -> torch.Tensor:
    """Sum each token's k expert outputs back into place: [R, H] -> [T, H]."""
    check_tensor("out_rows", out_rows, dims=2, dtypes=FLOAT_DTYPES)
    rows = permutation.source_row.shape[0]
    if out_rows.shape[0] != rows or num_tokens * permutation.top_k != rows:
        raise ValueError(
            f"out_rows has {out_rows.shape[0]} rows; the permutation has {rows} = "
            f"{num_tokens} tokens x k={permutation.top_k}?"
        )
    return backend_for(out_rows.device).combine(out_rows, permutation, num_tokens)


def quantized_matmul(x: torch.Tensor, weight: QuantizedTensor) -> torch.Tensor:
    """x [R, Din] @ weight [Din, Dout] -> [R, Dout] in x's dtype."""
    if weight.values.dim() != 2 or x.dim() != 2 or x.shape[1] != weight.d_in:
        raise ValueError(f"x {tuple(x.shape)} cannot multiply a {weight.scheme} weight of shape {weight.shape}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, the {weight.scheme} weight on {weight.device}")
    return backend_for(x.device).quantized_matmul(x, weight)


def check_tensor(
    name: str,
    t: object,
    *,
    dims: int,
    dtypes: tuple[torch.dtype, ...],
    device: torch.device | None = None,
) -> None:
    """ValueError naming `name` unless t is a contiguous tensor of `dims` dims, one of `dtypes`, on `device`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other inputs on {device}")


def _check_experts_lora(lora: ExpertsLoRA, rows: torch.Tensor, hidden: int, inter: int) -> None:
    check_tensor("lora.row_index", lora.row_index, dims=1, dtypes=(torch.int64,), device=rows.device)
    if lora.row_index.shape[0] != rows.shape[0]:
        raise ValueError(f"lora.row_index must be [{rows.shape[0]}] (one per row), got {tuple(lora.row_index.shape)}")
    for name, stack, d_in, d_out in (("gate_up", lora.gate_up, hidden, 2 * inter), ("down", lora.down, inter, hidden)):
        if stack is not None:
            check_lora_stack(f"lora.{name}", stack, d_in, d_out, rows)


def check_lora_stack(name: str, stack: LoRAStack, d_in: int, d_out: int, x: torch.Tensor) -> None:
    """ValueError naming `name` unless A [S, r, d_in], B [S, d_out, r] and scaling [S] fit x's dtype and device."""
    entries, rank = stack.a.shape[0], stack.a.shape[1]
    for part, t, shape in (("a", stack.a, (entries, rank, d_in)), ("b", stack.b, (entries, d_out, rank)),
                           ("scaling", stack.scaling, (entries,))):
        if not isinstance(t, torch.Tensor) or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name}.{part} must be a {x.dtype} tensor on {x.device}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}.{part} must be {list(shape)}, got {list(t.shape)}")


def _check_quantized(gate_up: object, down: object, device: torch.device) -> None:
    schemes = []
    for name, weight in (("gate_up", gate_up), ("down", down)):
        if not isinstance(weight, QuantizedTensor):
            raise ValueError(f"{name} must be a QuantizedTensor like the other weight, got {type(weight).__name__}")
        if len(weight.shape) != 3:
            raise ValueError(f"{name} must be [experts, in, out], got shape {weight.shape}")
        if weight.device != device:
            raise ValueError(f"{name} is on {weight.device}, the rows on {device}")
        schemes.append(weight.scheme)
    if schemes[0] != schemes[1]:
        raise ValueError(f"gate_up is {schemes[0]} but down is {schemes[1]}")


def _expert_order(order: Sequence[int] | torch.Tensor | None, num_experts: int, device: torch.device) -> torch.Tensor:
    if order is None:
        return torch.arange(num_experts, device=device)
    values = order.tolist() if isinstance(order, torch.Tensor) else list(order)
    if sorted(values) != list(range(num_experts)):
        raise ValueError(f"expert_order must list each of the {num_experts} experts once, got {values}")
    return torch.tensor(values, dtype=torch.int64, device=device)
