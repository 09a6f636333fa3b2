"""The CUDA backend: route, permute, combine and int4 (herd/kernels/cuda/) run through CuPy; `CupyBackend`.

Legend: T tokens, k experts per token, E experts, G groups, H hidden, R = T*k rows, Din / Dout a weight's
inputs / outputs.

Imported only by herd.kernels.backend, when a CUDA tensor first reaches herd.kernels (so CuPy is needed
only there). Inputs were checked by herd.kernels.api. Outputs are allocated by torch and handed to CuPy
through DLPack, so no tensor is copied, and kernels run on torch's current stream, in order with the
surrounding torch work. bfloat16 crosses as its raw 16 bits (CuPy has no bfloat16 dtype); the kernels
convert in registers. The expert GEMMs stay torch's (cuBLAS), FP8 too (torch._scaled_mm).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import cupy
import numpy as np
import torch

from herd.kernels.backend import Backend
from herd.kernels.cuda_sources import COMPILE_OPTIONS, source
from herd.kernels.int4 import gemv_splits
from herd.kernels.permutation import Permutation
from herd.kernels.schemes import Int4

if TYPE_CHECKING:
    from herd.kernels.quantized import QuantizedTensor

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_THREADS = 256
_WARPS_PER_ROUTE_BLOCK = 4

poison_outputs = False
"""When set (CupyBackend.poisoned, for `make gpu-check`), outputs start as NaN / -1 so a value a kernel forgot
to write shows."""


class CupyInt4(Int4):
    """int4 with the CuPy kernels: a matrix dequantised by cuda/int4.cu; up to GEMV_MAX_ROWS rows an expert
    (decode) multiplied with the weight dequantised inside the GEMM, reading each packed byte once; more rows
    dequantise into a workspace and run cuBLAS. Stacked weights [E, Din, Dout] dequantise with torch."""

    def dequantize(self, weight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        if weight.values.dim() != 2 or dtype not in _SUFFIX:
            return super().dequantize(weight, dtype)
        return dequantize_int4(weight, dtype)

    def matmul(self, x: torch.Tensor, weight: QuantizedTensor) -> torch.Tensor:
        out = int4_matmul(x, weight)
        return out if out is not None else super().matmul(x, weight)


class CupyBackend(Backend):
    """CuPy kernels for route, permute, combine and int4; torch (cuBLAS) for the expert GEMMs and FP8."""

    name = "cupy"

    def __init__(self) -> None:
        super().__init__({CupyInt4.name: CupyInt4()})

    def route(self, router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return route(router_logits, k)

    def permute(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_scores: torch.Tensor, expert_order: torch.Tensor
    ) -> tuple[torch.Tensor, Permutation]:
        return permute(x, topk_ids, topk_scores, expert_order)

    def combine(self, out_rows: torch.Tensor, permutation: Permutation, num_tokens: int) -> torch.Tensor:
        return combine(out_rows, permutation, num_tokens)

    def poisoned(self) -> AbstractContextManager[None]:
        return _poisoned()


@contextmanager
def _poisoned() -> Iterator[None]:
    global poison_outputs
    poison_outputs = True
    try:
        yield
    finally:
        poison_outputs = False


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused top-k + sigmoid: [T, E] -> ids [T, k] int32, scores [T, k]."""
    tokens, experts = router_logits.shape
    ids = _empty((tokens, k), torch.int32, router_logits.device)
    scores = _empty((tokens, k), router_logits.dtype, router_logits.device)
    if tokens:
        blocks = (tokens + _WARPS_PER_ROUTE_BLOCK - 1) // _WARPS_PER_ROUTE_BLOCK
        with _on(router_logits.device):
            _kernel("gating", f"route_topk_sigmoid_{_SUFFIX[router_logits.dtype]}")(
                (blocks,), (32 * _WARPS_PER_ROUTE_BLOCK,),
                (_cp(router_logits), np.int32(tokens), np.int32(experts), np.int32(k), _cp(ids), _cp(scores)),
            )
    return ids, scores


def permute(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_scores: torch.Tensor, expert_order: torch.Tensor
) -> tuple[torch.Tensor, Permutation]:
    """Histogram, prefix sum, stable positions, then gather-and-scale: rows [R, H] grouped in expert_order."""
    device = x.device
    tokens, hidden = x.shape
    k = topk_ids.shape[1]
    rows_count, groups = tokens * k, expert_order.shape[0]
    rank = torch.empty_like(expert_order)
    rank[expert_order] = torch.arange(groups, device=device)  # [E] int64: group of each expert
    counts = torch.zeros(groups, dtype=torch.int32, device=device)
    offsets = _empty((groups + 1,), torch.int64, device)
    row_source = _empty((rows_count,), torch.int32, device)
    source_row = _empty((rows_count,), torch.int32, device)
    rows = _empty((rows_count, hidden), x.dtype, device)
    if not rows_count:  # nothing to group: every group is empty
        offsets.zero_()
        return rows, Permutation(offsets, expert_order, row_source, source_row, k)
    with _on(device):
        ids = _cp(topk_ids)
        _kernel("permute", "moe_histogram")(
            ((rows_count + _THREADS - 1) // _THREADS,), (_THREADS,), (ids, np.int32(rows_count), _cp(rank), _cp(counts))
        )
        _kernel("permute", "moe_offsets")((1,), (1024,), (_cp(counts), np.int32(groups), _cp(offsets)))
        _kernel("permute", "moe_positions")(
            (groups,), (_THREADS,),
            (ids, np.int32(rows_count), _cp(rank), _cp(offsets), _cp(row_source), _cp(source_row)),
        )
        if hidden:  # H = 0: no columns to gather (a grid of zero blocks is no launch at all)
            _kernel("permute", f"moe_gather_scale_{_SUFFIX[x.dtype]}")(
                (rows_count, _column_blocks(hidden)), (_THREADS,),
                (_cp(x), _cp(topk_scores), _cp(row_source), np.int32(rows_count), np.int32(k), np.int32(hidden),
                 _cp(rows)),
            )
    permutation = Permutation(
        expert_offsets=offsets, group_experts=expert_order, row_source=row_source, source_row=source_row, top_k=k
    )
    return rows, permutation


def combine(out_rows: torch.Tensor, permutation: Permutation, num_tokens: int) -> torch.Tensor:
    """Gather each token's k rows and sum them in float: [R, H] -> [T, H]."""
    hidden = out_rows.shape[1]
    out = _empty((num_tokens, hidden), out_rows.dtype, out_rows.device)
    source_row = permutation.source_row.to(device=out_rows.device, dtype=torch.int32)
    if num_tokens and hidden:  # nothing to sum into [T, 0] (a zero-block grid is no launch at all)
        with _on(out_rows.device):
            _kernel("combine", f"moe_combine_{_SUFFIX[out_rows.dtype]}")(
                (num_tokens, _column_blocks(hidden)), (_THREADS,),
                (_cp(out_rows), _cp(source_row), np.int32(num_tokens), np.int32(permutation.top_k),
                 np.int32(hidden), _cp(out)),
            )
    return out


def dequantize_int4(weight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """One int4 matrix (a QuantizedTensor [Din, Dout]) -> floats [Din, Dout] in `dtype` (float32 or bfloat16)."""
    d_in, d_out = weight.shape
    out = _empty((d_in, d_out), dtype, weight.device)
    total = weight.values.numel()
    if total:
        with _on(weight.device):
            _kernel("int4", f"int4_dequantize_{_SUFFIX[dtype]}")(
                (min((total + _THREADS - 1) // _THREADS, 65535 * 4),), (_THREADS,),
                (_cp(weight.values.contiguous()), _cp(weight.scales.contiguous()), np.int32(d_in), np.int32(d_out),
                 np.int32(weight.group), _cp(out)),
            )
    return out


_GEMV_THREADS = 128


def int4_matmul(x: torch.Tensor, weight: QuantizedTensor) -> torch.Tensor | None:
    """x [R, Din] @ an int4 QuantizedTensor [Din, Dout] -> [R, Dout] in x's dtype, dequantising inside the GEMM.

    None where the kernel does not apply (more than GEMV_MAX_ROWS rows, Dout not a multiple of 4, or a slice
    of x too wide for shared memory): the caller then dequantises and runs cuBLAS.
    """
    rows, d_in = x.shape
    d_out = weight.shape[-1]
    if x.dtype not in _SUFFIX:
        return None
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    plan = gemv_splits(rows, d_in, d_out, weight.group, sms, threads=_GEMV_THREADS)
    if plan is None:
        return None
    splits, split_inputs = plan
    col_blocks = -(-(d_out // 4) // _GEMV_THREADS)
    x = x.contiguous()
    partials = _empty((splits, rows, d_out), torch.float32, x.device)
    out = _empty((rows, d_out), x.dtype, x.device)
    with _on(x.device):
        _kernel("int4", f"int4_gemv_partial_{_SUFFIX[x.dtype]}")(
            (col_blocks, splits), (_GEMV_THREADS,),
            (_cp(x), _cp(weight.values.contiguous().view(torch.int32)), _cp(weight.scales.contiguous()),
             np.int32(rows), np.int32(d_in), np.int32(d_out), np.int32(weight.group), np.int32(split_inputs),
             _cp(partials)),
            shared_mem=rows * split_inputs * 4,
        )
        count = rows * d_out
        _kernel("int4", f"int4_gemv_reduce_{_SUFFIX[x.dtype]}")(
            (min(-(-count // _THREADS), 65535),), (_THREADS,), (_cp(partials), np.int32(splits), np.int64(count),
                                                              _cp(out)),
        )
    return out


@functools.cache
def _module(name: str) -> cupy.RawModule:
    return cupy.RawModule(code=source(name), options=COMPILE_OPTIONS)


def _kernel(module: str, function: str) -> cupy.RawKernel:
    """A kernel of `module`.cu, loaded on the current CuPy device (call inside _on)."""
    return _module(module).get_function(function)


def _cp(t: torch.Tensor) -> cupy.ndarray:
    """The same memory as a CuPy array (bfloat16 as int16 bits), through DLPack."""
    return cupy.from_dlpack(t.view(torch.int16) if t.dtype == torch.bfloat16 else t)


@contextmanager
def _on(device: torch.device) -> Iterator[None]:
    """Launch on `device`, on torch's current stream there."""
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream, device.index):
        yield


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if poison_outputs:
        t.fill_(float("nan") if dtype.is_floating_point else -1)
    return t


def _column_blocks(hidden: int) -> int:
    """Blocks along H for row-wise kernels: enough to cover H once, capped by the grid's y limit."""
    return min((hidden + _THREADS - 1) // _THREADS, 65535)
