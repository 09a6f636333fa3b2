"""Read int4 and FP8 tensors out of a checkpoint into Herd's storage layout (herd.model.quant.layout).

Legend: E experts, e held experts, H hidden, I expert intermediate.

Routed experts come in three layouts, told apart by their names:
- Herd int4 (herd quantize --int4): `experts.gate_up_proj_packed` and friends, already Herd's layout;
- FP8 fused: `experts.gate_up_proj` e4m3 [E, H, 2I] with `experts.gate_up_proj_scale` [E, 1, 2I], and
  down_proj [E, I, H] / [E, 1, H] (the bf16 checkpoint's layout, quantised per output channel);
- FP8 per expert, the published compressed-tensors layout: `experts.{e}.{gate,up,down}_proj.weight`
  e4m3 [out, in] with `weight_scale` [out, 1] (or [out]); gate and up are stacked into gate_up.
Only the held experts' bytes are read, in every layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from herd.kernels.fp8 import E4M3
from herd.model.checkpoint import Checkpoint, CheckpointError


def read_experts(checkpoint: Checkpoint, scheme: str, prefix: str, ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """The experts `ids` of the layer whose experts module is `prefix`, as Herd's buffers (name -> tensor);
    nothing for no ids."""
    if not ids:
        return {}
    if scheme == "int4":
        tensors = {name: checkpoint.expert_rows(f"{prefix}.{name}", ids)
                   for name in ("gate_up_proj_packed", "gate_up_proj_scale", "down_proj_packed", "down_proj_scale")}
        _check_dtype(checkpoint, f"{prefix}.gate_up_proj_packed", tensors["gate_up_proj_packed"], torch.uint8)
        _check_dtype(checkpoint, f"{prefix}.down_proj_packed", tensors["down_proj_packed"], torch.uint8)
        return tensors
    if f"{prefix}.gate_up_proj" in checkpoint:
        tensors = {}
        for name in ("gate_up_proj", "down_proj"):
            values = checkpoint.expert_rows(f"{prefix}.{name}", ids)
            _check_dtype(checkpoint, f"{prefix}.{name}", values, E4M3)
            tensors[name] = values.transpose(1, 2).contiguous()  # [e, in, out] -> output-major [e, out, in]
            tensors[f"{name}_scale"] = checkpoint.expert_rows(f"{prefix}.{name}_scale", ids).float().transpose(1, 2)
        return tensors
    gate_up, gate_up_scale, down, down_scale = [], [], [], []
    for e in ids:
        gate, gate_s = _linear(checkpoint, f"{prefix}.{e}.gate_proj")
        up, up_s = _linear(checkpoint, f"{prefix}.{e}.up_proj")
        d, d_s = _linear(checkpoint, f"{prefix}.{e}.down_proj")
        gate_up.append(torch.cat([gate, up]))
        gate_up_scale.append(torch.cat([gate_s, up_s]))
        down.append(d)
        down_scale.append(d_s)
    return {"gate_up_proj": torch.stack(gate_up), "gate_up_proj_scale": torch.stack(gate_up_scale),
            "down_proj": torch.stack(down), "down_proj_scale": torch.stack(down_scale)}


def expert_tensor_names(checkpoint: Checkpoint, scheme: str, prefix: str, num_experts: int) -> set[str]:
    """Every checkpoint name the experts of one layer are stored under, in the layout this checkpoint uses."""
    if scheme == "int4":
        return {f"{prefix}.{n}" for n in ("gate_up_proj_packed", "gate_up_proj_scale", "down_proj_packed",
                                          "down_proj_scale")}
    if f"{prefix}.gate_up_proj" in checkpoint:
        return {f"{prefix}.{n}" for n in ("gate_up_proj", "gate_up_proj_scale", "down_proj", "down_proj_scale")}
    return {f"{prefix}.{e}.{proj}.{part}" for e in range(num_experts) for proj in ("gate_proj", "up_proj", "down_proj")
            for part in ("weight", "weight_scale")}


def read_fp8_linear(checkpoint: Checkpoint, module: str) -> dict[str, torch.Tensor]:
    """An FP8 linear layer's `weight` e4m3 [out, in] and `weight_scale` float32 [out, 1]."""
    weight, scale = _linear(checkpoint, module)
    return {"weight": weight, "weight_scale": scale}


def read_int4_linear(checkpoint: Checkpoint, module: str) -> dict[str, torch.Tensor]:
    """An int4 linear layer's `weight_packed` uint8 [ceil(in/2), out] and `weight_scale` bfloat16 [G, out]."""
    packed = checkpoint.tensor(f"{module}.weight_packed")
    _check_dtype(checkpoint, f"{module}.weight_packed", packed, torch.uint8)
    return {"weight_packed": packed, "weight_scale": checkpoint.tensor(f"{module}.weight_scale")}


def dequantized_weight(checkpoint: Checkpoint, name: str) -> torch.Tensor | None:
    """A weight the checkpoint stores in FP8 (with `<name>_scale`) as float32, or None if it is not FP8."""
    scale_name = f"{name}_scale"
    if not name.endswith(".weight") or scale_name not in checkpoint or name not in checkpoint:
        return None
    module = name.removesuffix(".weight")
    weight, scale = _linear(checkpoint, module)
    return weight.float() * scale


def _linear(checkpoint: Checkpoint, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    weight = checkpoint.tensor(f"{module}.weight")
    _check_dtype(checkpoint, f"{module}.weight", weight, E4M3)
    if weight.dim() != 2:
        raise CheckpointError(f"{checkpoint.directory}: {module}.weight must be [out, in], got {tuple(weight.shape)}")
    scale = checkpoint.tensor(f"{module}.weight_scale")
    if scale.numel() != weight.shape[0] or not scale.dtype.is_floating_point:
        raise CheckpointError(f"{checkpoint.directory}: {module}.weight_scale {scale.dtype} {tuple(scale.shape)} is "
                              f"not one scale per output channel of weight {tuple(weight.shape)}")
    return weight, scale.float().reshape(-1, 1)


def _check_dtype(checkpoint: Checkpoint, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    if tensor.dtype != dtype:
        raise CheckpointError(f"{checkpoint.directory}: {name} is {tensor.dtype}; config.json's "
                              f"quantization_config implies {dtype}")
