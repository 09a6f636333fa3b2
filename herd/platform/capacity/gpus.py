"""GPU types the planner knows: memory as CUDA reports it (nvidia-smi's MiB), not the marketing figure."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class GpuType:
    name: str
    memory_bytes: int
    """Total device memory, as torch.cuda.mem_get_info reports it."""


GPUS: dict[str, GpuType] = {g.name: g for g in (
    GpuType("h100", 81559 * MIB),       # H100 80GB (SXM and PCIe)
    GpuType("h200", 143771 * MIB),      # H200 141GB
    GpuType("b200", 183359 * MIB),      # B200 180GB
    GpuType("a100-80gb", 81920 * MIB),
    GpuType("a100-40gb", 40960 * MIB),
    GpuType("l40s", 46068 * MIB),
)}


def gpu_type(name: str, *, memory_gib: float | None = None) -> GpuType:
    """A known GPU by name, or any GPU given its memory in GiB."""
    if memory_gib is not None:
        if memory_gib <= 0:
            raise ValueError(f"GPU memory must be positive, got {memory_gib} GiB")
        return GpuType(name or "custom", int(memory_gib * 2**30))
    if name.lower() not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose one of {sorted(GPUS)} or give its memory in GiB")
    return GPUS[name.lower()]
