"""Write tensors as a sharded safetensors checkpoint: `model-0000i-of-0000N.safetensors` and their index.

The one writer of `herd make-tiny` and `herd quantize`. Tensors come one at a time and each shard is saved
as soon as it is full, so memory stays near one shard whatever the checkpoint's size; shards get their
final names once their count is known.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from herd.model.checkpoint import INDEX_FILE


def write_sharded(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], *, shard_bytes: int) -> None:
    """Save (name, tensor) pairs, in the order given, into shards of at most `shard_bytes` (a tensor larger than
    that gets a shard of its own) and write the index. An earlier checkpoint's shards there are removed first."""
    for old in directory.glob("model*.safetensors"):
        old.unlink()
    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            save_file(current, str(directory / _part(len(shards))), metadata={"format": "pt"})
            shards.append(list(current))
            current, size = {}, 0

    for name, tensor in tensors:
        if current and size + tensor.nbytes > shard_bytes:
            flush()
        current[name] = tensor.contiguous()
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (directory / _part(i)).rename(directory / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _part(i: int) -> str:
    """A shard's name while the count is not yet known."""
    return f"part-{i:05d}.safetensors"
