"""Tensors of a safetensors checkpoint, by name, read lazily from memory-mapped files.

A checkpoint directory holds `model.safetensors`, or shards listed by `model.safetensors.index.json`.
Names are canonical: the `language_model.` prefix of Llama4ForConditionalGeneration checkpoints is
dropped, so `model.layers.0.self_attn.q_proj.weight` means the same tensor in either layout.
Nothing is read until asked for, and expert slices read only their own bytes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_TEXT_PREFIX = "language_model."


class _TensorSlice(Protocol):
    """What Herd reads through a safetensors slice (the library gives the type no public name)."""

    def get_shape(self) -> list[int]: ...

    def get_dtype(self) -> str: ...  # safetensors' code: "BF16", "F8_E4M3", ...

    def __getitem__(self, index: slice) -> torch.Tensor: ...


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it claims to be; the message names the file."""


def copy_checked(param: torch.Tensor, stored: torch.Tensor, *, directory: Path, name: str) -> None:
    """Load `stored` into the parameter `param`, refusing a tensor whose shape config.json contradicts."""
    if stored.shape != param.shape:
        raise CheckpointError(
            f"{directory}: tensor {name!r} has shape {tuple(stored.shape)}, config.json implies {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(stored)


class Checkpoint:
    """Lazy, read-only view of one safetensors checkpoint directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        files_by_raw_name = self._find_files()
        self._handles = {file: _open(file) for file in sorted(set(files_by_raw_name.values()))}
        self._where: dict[str, tuple[Path, str]] = {}  # canonical name -> (file, name in file)
        for raw, file in files_by_raw_name.items():
            if raw not in self._handles[file].keys():  # noqa: SIM118 - a handle is not a dict
                raise CheckpointError(f"{file} lacks tensor {raw!r}, which {INDEX_FILE} places there")
            self._where[canonical_name(raw)] = (file, raw)

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint, canonical form."""
        return set(self._where)

    def raw_name(self, name: str) -> str:
        """The name a canonical tensor name is stored under (with `language_model.` where the file has it)."""
        return self._locate(name)[1]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a stored tensor, read from the header only."""
        return tuple(self._slice(name).get_shape())

    def nbytes(self, name: str) -> int:
        """Bytes a stored tensor takes on disk."""
        return int(torch.Size(self.shape(name)).numel()) * _DTYPE_BYTES[self._slice(name).get_dtype()]

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor, in its stored dtype."""
        file, raw = self._locate(name)
        try:
            tensor: torch.Tensor = self._handles[file].get_tensor(raw)
        except SafetensorError as err:
            raise CheckpointError(f"{file}: cannot read {raw!r}: {err}") from err
        return tensor

    def expert_rows(self, name: str, experts: Sequence[int]) -> torch.Tensor:
        """Rows `experts` of a tensor stacked by expert on dim 0, reading only those rows from disk."""
        file, raw = self._locate(name)
        count = self.shape(name)[0]
        bad = [e for e in experts if not 0 <= e < count]
        if bad:
            raise ValueError(f"experts {bad} are outside 0..{count - 1} of {raw!r} in {file}")
        parts = [self._slice(name)[start:stop] for start, stop in _runs(experts)]
        if not parts:  # no experts: an empty stack of the right trailing shape, nothing read
            return self._slice(name)[0:0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _locate(self, name: str) -> tuple[Path, str]:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.directory} has no tensor {name!r}") from None

    def _slice(self, name: str) -> _TensorSlice:
        file, raw = self._locate(name)
        handle: _TensorSlice = self._handles[file].get_slice(raw)
        return handle

    def _find_files(self) -> dict[str, Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from err
            files = {raw: self.directory / shard for raw, shard in weight_map.items()}
            missing = sorted({str(f) for f in files.values() if not f.is_file()})
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return files
        single = self.directory / SINGLE_FILE
        candidates = [single] if single.is_file() else sorted(self.directory.glob("*.safetensors"))
        if len(candidates) != 1:
            raise CheckpointError(
                f"{self.directory}: expected {SINGLE_FILE} or {INDEX_FILE}, found "
                f"{[c.name for c in candidates] or 'no safetensors files'}"
            )
        return {raw: candidates[0] for raw in _open(candidates[0]).keys()}  # noqa: SIM118


def canonical_name(raw: str) -> str:
    """Drop the multimodal wrapper's `language_model.` prefix; other names stay as stored."""
    return raw[len(_TEXT_PREFIX) :] if raw.startswith(_TEXT_PREFIX) else raw


def _open(file: Path) -> safe_open:
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err


def _runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs [start, stop) of ids, in the order given: [0, 1, 2, 7] -> [(0, 3), (7, 8)]."""
    runs: list[tuple[int, int]] = []
    for e in ids:
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
