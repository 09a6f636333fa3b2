"""Compute dtypes by name: the one mapping between what settings, flags and the wire write ("bfloat16") and
the torch dtype the model computes in."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Every dtype Herd computes and keeps its KV cache in, by the name settings use."""


def to_dtype(value: str | torch.dtype) -> torch.dtype:
    """A dtype name (or a torch dtype) as the torch dtype; ValueError naming the choices otherwise."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The settings name of a torch dtype: torch.bfloat16 -> "bfloat16"."""
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
