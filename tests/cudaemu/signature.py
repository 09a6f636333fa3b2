"""The C signatures of a CUDA source's `extern "C" __global__` kernels, as the launchers and the emulator need them."""

from __future__ import annotations

import re
from dataclasses import dataclass

_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
_KERNEL = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)')
_QUALIFIERS_DROPPED = {"__restrict__", "__restrict", "restrict"}


@dataclass(frozen=True)
class Param:
    """One kernel parameter: its name and C type as written, normalised ("const float*", "long long")."""

    name: str
    type: str

    @property
    def is_pointer(self) -> bool:
        return "*" in self.type

    @property
    def element(self) -> str:
        """The pointee without const ("float", "unsigned short"), or the scalar type itself."""
        base = self.type[: self.type.rindex("*")] if self.is_pointer else self.type
        return " ".join(word for word in base.split() if word != "const")


def kernel_signatures(source: str) -> dict[str, list[Param]]:
    """Every `extern "C" __global__ void name(...)` of `source` (comments ignored), parameters in order."""
    text = _COMMENT.sub(" ", source)
    return {match.group(1): _params(match.group(1), match.group(2)) for match in _KERNEL.finditer(text)}


def _params(kernel: str, text: str) -> list[Param]:
    pieces = [piece.strip() for piece in text.split(",")]
    if pieces == [""] or pieces == ["void"]:
        return []
    return [_param(kernel, piece) for piece in pieces]


def _param(kernel: str, text: str) -> Param:
    spaced = re.sub(r"\*", " * ", text)
    words = [word for word in spaced.split() if word not in _QUALIFIERS_DROPPED]
    if len(words) < 2 or not re.fullmatch(r"[A-Za-z_]\w*", words[-1]):
        raise ValueError(f"kernel {kernel}: cannot read the parameter {text!r} as a C type and a name")
    return Param(name=words[-1], type=re.sub(r" \*", "*", " ".join(words[:-1])))
