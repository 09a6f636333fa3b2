"""The kernels one kind of device runs, as one object: the MoE stages and the quantised matmuls.

Legend: T tokens, k experts per token, E experts, G groups in output order, H hidden, I expert intermediate,
R = T*k rows, Din / Dout a weight's inputs / outputs.

`backend_for(device)` picks it once per device type and keeps it: torch (`Backend`, herd.kernels.torch_moe)
on the CPU; on CUDA the CuPy kernels (`CupyBackend`, herd.kernels.cupy_moe) for route, permute, combine and
int4, cuBLAS through torch for the expert GEMMs, or torch alone where CuPy is not importable (said once, in
the log). This is the only place CuPy is imported. Quantised weights run the backend's own kernels for their
method where it has them, else the registered torch code (herd.kernels.schemes). Inputs were checked by
herd.kernels.api.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch

from herd.kernels import torch_moe
from herd.kernels.lora import ExpertsLoRA
from herd.kernels.permutation import Permutation
from herd.kernels.schemes import Scheme, get_scheme

if TYPE_CHECKING:
    from herd.kernels.quantized import QuantizedTensor

log = logging.getLogger(__name__)


class Backend:
    """torch's kernels, which run on any device; a subclass replaces the stages it has kernels for.

    `schemes`: this backend's own kernels for quantisation methods, by name; a method not listed runs the
    registered one.
    """

    name = "torch"

    def __init__(self, schemes: Mapping[str, Scheme] | None = None) -> None:
        self._schemes = dict(schemes or {})

    def route(self, router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k + sigmoid: [T, E] -> ids [T, k] int32, scores [T, k]."""
        return torch_moe.route(router_logits, k)

    def permute(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_scores: torch.Tensor, expert_order: torch.Tensor
    ) -> tuple[torch.Tensor, Permutation]:
        """Rows [R, H] grouped in expert_order, stable in token order, scaled by their scores."""
        return torch_moe.permute(x, topk_ids, topk_scores, expert_order)

    def combine(self, out_rows: torch.Tensor, permutation: Permutation, num_tokens: int) -> torch.Tensor:
        """Each token's k rows summed back into place: [R, H] -> [T, H]."""
        return torch_moe.combine(out_rows, permutation, num_tokens)

    def experts(
        self, rows: torch.Tensor, expert_offsets: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
        lora: ExpertsLoRA | None = None,
    ) -> torch.Tensor:
        """SwiGLU per expert over its slice of rows, float weights gate_up [E, H, 2I], down [E, I, H]; with
        `lora`, each row's adapter deltas added (herd.kernels.lora)."""
        return torch_moe.experts(rows, expert_offsets, gate_up, down, lora)

    def quantized_experts(
        self, rows: torch.Tensor, expert_offsets: torch.Tensor, gate_up: QuantizedTensor, down: QuantizedTensor
    ) -> torch.Tensor:
        """The same with quantised weights, one expert at a time; experts with no rows are not touched.

        The host reads the offsets to slice each expert's rows: one host sync per call (per MoE layer), kept
        until a grouped quantised GEMM reads them from device memory as torch._grouped_mm does for floats.
        """
        inter = down.d_in
        out = torch.empty_like(rows)
        bounds = expert_offsets.tolist()  # a host sync (see the docstring)
        for e in range(gate_up.shape[0]):
            start, end = bounds[e], bounds[e + 1]
            if end > start:
                gate_up_out = self.quantized_matmul(rows[start:end], gate_up[e])  # [n, 2I]
                act = torch_moe.swiglu(gate_up_out[:, :inter], gate_up_out[:, inter:])  # [n, I]
                out[start:end] = self.quantized_matmul(act, down[e])
        return out

    def scheme(self, name: str) -> Scheme:
        """The kernels this backend runs for the quantisation method `name`."""
        return self._schemes.get(name) or get_scheme(name)

    def dequantize(self, weight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        """A quantised weight as floats [..., Din, Dout] in `dtype`."""
        return self.scheme(weight.scheme).dequantize(weight, dtype)

    def quantized_matmul(self, x: torch.Tensor, weight: QuantizedTensor) -> torch.Tensor:
        """x [R, Din] @ weight [Din, Dout] -> [R, Dout] in x's dtype."""
        return self.scheme(weight.scheme).matmul(x, weight)

    def poisoned(self) -> AbstractContextManager[None]:
        """Inside it, outputs start as NaN / -1, so an element a kernel forgets to write shows (gpu-check).

        torch writes whole tensors: nothing to poison here.
        """
        return nullcontext()


def backend_for(device: torch.device) -> Backend:
    """The backend of `device`'s type, chosen on first use and kept."""
    return _backend_of_type(device.type)


@functools.cache
def _backend_of_type(device_type: str) -> Backend:
    if device_type != "cuda":
        return Backend()
    try:
        from herd.kernels.cupy_moe import CupyBackend
    except ImportError as err:
        log.warning("CuPy is not importable (%s); the MoE stages and int4 weights run with torch on the GPU", err)
        return Backend()
    return CupyBackend()
