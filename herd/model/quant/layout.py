"""How int4 and FP8 weights are stored in Herd's modules and checkpoints: buffer names, shapes and dtypes.

Legend: E experts held, H hidden, I expert intermediate, G_x = ceil(x / group) int4 groups.

Routed experts (buffers of herd.model.moe.Experts, same names in Herd's checkpoints):
- int4: gate_up_proj_packed uint8 [E, H/2, 2I], gate_up_proj_scale bfloat16 [E, G_H, 2I],
        down_proj_packed uint8 [E, I/2, H], down_proj_scale bfloat16 [E, G_I, H]  (input-major, packed on input);
- fp8:  gate_up_proj e4m3 [E, 2I, H], gate_up_proj_scale float32 [E, 2I, 1],
        down_proj e4m3 [E, H, I], down_proj_scale float32 [E, H, 1]  (output-major, nn.Linear's way, so one
        expert's matrix is column-major for the FP8 GEMM and the published per-expert tensors stack as stored).
Linear layers (herd.model.quant.linear.QuantizedLinear; the shared expert and the dense MLPs):
- int4: weight_packed uint8 [ceil(in/2), out], weight_scale bfloat16 [G_in, out];
- fp8:  weight e4m3 [out, in], weight_scale float32 [out, 1] (compressed-tensors' names and layout).

The modules keep these dtypes through `.to(dtype)`: a cast of the model changes its activations' dtype,
never the stored format (see keep_storage_dtypes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from herd.kernels import QuantizedTensor
from herd.kernels.fp8 import E4M3

Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


def expert_storage(scheme: str, count: int, hidden: int, inter: int, group: int) -> Shapes:
    """Buffer name -> (shape, dtype) of `count` routed experts in `scheme`."""
    if scheme == "int4":
        return {
            "gate_up_proj_packed": ((count, -(-hidden // 2), 2 * inter), torch.uint8),
            "gate_up_proj_scale": ((count, -(-hidden // group), 2 * inter), torch.bfloat16),
            "down_proj_packed": ((count, -(-inter // 2), hidden), torch.uint8),
            "down_proj_scale": ((count, -(-inter // group), hidden), torch.bfloat16),
        }
    if scheme == "fp8":
        return {
            "gate_up_proj": ((count, 2 * inter, hidden), E4M3),
            "gate_up_proj_scale": ((count, 2 * inter, 1), torch.float32),
            "down_proj": ((count, hidden, inter), E4M3),
            "down_proj_scale": ((count, hidden, 1), torch.float32),
        }
    raise ValueError(f"unknown quantisation scheme {scheme!r}")


def expert_weights(scheme: str, tensors: dict[str, torch.Tensor], hidden: int, inter: int,
                   group: int) -> tuple[QuantizedTensor, QuantizedTensor]:
    """(gate_up [E, H, 2I], down [E, I, H]) as QuantizedTensors over stored tensors (no copy)."""
    if scheme == "int4":
        return (QuantizedTensor("int4", tensors["gate_up_proj_packed"], tensors["gate_up_proj_scale"], hidden, group),
                QuantizedTensor("int4", tensors["down_proj_packed"], tensors["down_proj_scale"], inter, group))
    return (QuantizedTensor("fp8", tensors["gate_up_proj"].transpose(1, 2),
                            tensors["gate_up_proj_scale"].transpose(1, 2), hidden),
            QuantizedTensor("fp8", tensors["down_proj"].transpose(1, 2), tensors["down_proj_scale"].transpose(1, 2),
                            inter))


def linear_storage(scheme: str, d_in: int, d_out: int, group: int) -> Shapes:
    """Buffer name -> (shape, dtype) of one linear layer's weight in `scheme`."""
    if scheme == "int4":
        return {"weight_packed": ((-(-d_in // 2), d_out), torch.uint8),
                "weight_scale": ((-(-d_in // group), d_out), torch.bfloat16)}
    if scheme == "fp8":
        return {"weight": ((d_out, d_in), E4M3), "weight_scale": ((d_out, 1), torch.float32)}
    raise ValueError(f"unknown quantisation scheme {scheme!r}")


def keep_storage_dtypes(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """nn.Module._apply for modules holding only quantised buffers: `fn` (a move, an empty_like, a cast)
    sees each buffer through an integer view of the same width, so it moves them but never converts them."""
    for name, buf in module._buffers.items():
        if buf is not None:
            module._buffers[name] = fn(buf.view(_BITS[buf.element_size()])).view(buf.dtype)
    return module


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
