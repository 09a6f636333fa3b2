"""A LoRA adapter's `adapter_config.json` (PEFT's format), read and checked before any weight is.

Herd serves plain LoRA: y = W x + scaling * B (A x), scaling = lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora), on the modules of herd.model.lora_sites. Every option that changes that formula (DoRA, LoRA
biases, per-module rank or alpha patterns, trained copies of whole modules, ...) is refused with an
AdapterError naming the file and the option, so that an adapter is refused at registration, never served
wrongly. Options that only matter for training (dropout, init) are ignored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"
MAX_RANK = 64

# Options that change the adapter's math: (key, the value that leaves plain LoRA, what it is).
_UNSUPPORTED: tuple[tuple[str, object, str], ...] = (
    ("use_dora", False, "DoRA (weight-decomposed LoRA)"),
    ("bias", "none", "trained biases"),
    ("lora_bias", False, "a bias on lora_B"),
    ("fan_in_fan_out", False, "Conv1D-style transposed weights"),
    ("use_qalora", False, "QA-LoRA pooling"),
)
_EMPTY_WHEN_SUPPORTED = ("modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication",
                         "trainable_token_indices", "alora_invocation_tokens", "megatron_config",
                         "velora_config", "kasa_config", "arrow_config")


class AdapterError(ValueError):
    """An adapter that Herd cannot serve as it claims to be; the message names the file and the key or module."""


@dataclass(frozen=True)
class AdapterConfig:
    """The options of a plain LoRA adapter that decide its math and what it adapts."""

    rank: int  # r: inner width of every A/B pair
    lora_alpha: float  # numerator of the scaling
    use_rslora: bool  # scaling lora_alpha / sqrt(r) instead of lora_alpha / r
    target_modules: tuple[str, ...] | str  # module-name suffixes, or one regex PEFT matches in full
    target_parameters: tuple[str, ...]  # parameter paths (routed experts' fused weights)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def targets_module(self, module_path: str) -> bool:
        """Whether target_modules selects `module_path` (PEFT's rule: a listed suffix, or a full regex match)."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_path) is not None
        return any(module_path == t or module_path.endswith(f".{t}") for t in self.target_modules)

    def targets_parameter(self, parameter_path: str) -> bool:
        """Whether target_parameters selects `parameter_path` (a listed path or dotted suffix)."""
        return any(parameter_path == t or parameter_path.endswith(f".{t}") for t in self.target_parameters)


def read_adapter_config(directory: Path) -> AdapterConfig:
    """Parse and check `directory`/adapter_config.json; AdapterError names what is wrong."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{directory}: no {CONFIG_FILE} (an adapter in PEFT's format is a directory holding it)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path}: not JSON ({err})") from err
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return parse_adapter_config(raw, source=str(path))


def parse_adapter_config(raw: dict[str, Any], *, source: str) -> AdapterConfig:
    """The checked config of a PEFT adapter_config.json object; AdapterError naming `source` and the key."""
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{source}: peft_type is {peft_type!r}; Herd serves LORA adapters only")
    for key, plain, what in _UNSUPPORTED:
        if raw.get(key, plain) != plain:
            raise AdapterError(f"{source}: {key}={raw[key]!r} ({what}) is not supported; Herd serves plain LoRA")
    for key in _EMPTY_WHEN_SUPPORTED:
        if raw.get(key):
            raise AdapterError(f"{source}: {key}={raw[key]!r} is not supported; Herd serves plain LoRA "
                               "with one rank and one alpha for every module")
    rank = raw.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise AdapterError(f"{source}: r={rank!r}; the rank must be an integer in 1..{MAX_RANK}")
    alpha = raw.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"{source}: lora_alpha={alpha!r}; it must be a positive number")
    rslora = raw.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterError(f"{source}: use_rslora={rslora!r}; it must be true or false")
    return AdapterConfig(rank=rank, lora_alpha=float(alpha), use_rslora=rslora,
                         target_modules=_targets(raw.get("target_modules"), "target_modules", source),
                         target_parameters=_names(raw.get("target_parameters"), "target_parameters", source))


def _targets(value: object, key: str, source: str) -> tuple[str, ...] | str:
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise AdapterError(f"{source}: {key}={value!r} is not a regular expression ({err})") from err
        return value
    return _names(value, key, source)


def _names(value: object, key: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdapterError(f"{source}: {key}={value!r}; expected a list of names")
    return tuple(value)
