"""Tensors on the wire: raw little-endian bytes with dtype and shape (herd.v1.Tensor), both ways."""

from __future__ import annotations

import sys

import torch

from herd.protos.herd.v1 import experts_pb2 as pb

TO_WIRE = {torch.float32: pb.DTYPE_FLOAT32, torch.bfloat16: pb.DTYPE_BFLOAT16, torch.float16: pb.DTYPE_FLOAT16}
FROM_WIRE = {v: k for k, v in TO_WIRE.items()}
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

if sys.byteorder != "little":  # the wire is little-endian; torch's buffers are native
    raise ImportError("herd's tensor wire format assumes a little-endian host")


def to_wire(t: torch.Tensor) -> pb.Tensor:
    """A CPU or GPU tensor as a herd.v1.Tensor (one copy, to host bytes)."""
    if t.dtype not in TO_WIRE:
        raise ValueError(f"cannot send dtype {t.dtype}; the wire carries {list(TO_WIRE)}")
    host = t.detach().contiguous().view(_BITS[t.dtype]).cpu()
    return pb.Tensor(dtype=TO_WIRE[t.dtype], shape=list(t.shape), data=host.numpy().tobytes())


def from_wire(msg: pb.Tensor, *, name: str = "tensor") -> torch.Tensor:
    """The tensor a herd.v1.Tensor describes; ValueError naming `name` if dtype, shape or length is off."""
    if msg.dtype not in FROM_WIRE:
        got = pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else msg.dtype
        raise ValueError(f"{name} has dtype {got}, not one of {[pb.DType.Name(d) for d in FROM_WIRE]}")
    shape = list(msg.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{name} has a negative dimension in shape {shape}")
    dtype = FROM_WIRE[msg.dtype]
    expected = torch.Size(shape).numel() * torch.finfo(dtype).bits // 8
    if len(msg.data) != expected:
        raise ValueError(f"{name} of shape {shape} and dtype {dtype} needs {expected} bytes, got {len(msg.data)}")
    if not expected:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=_BITS[dtype]).view(dtype).view(shape)
