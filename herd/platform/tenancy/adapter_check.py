"""Whether a LoRA adapter can run on a served model: the check made when it is registered, so that a malformed or
mismatched adapter is refused then (with the reason), never at request time.

The adapter is read as a replica reads it (herd.model.lora.load_adapter: PEFT's config and safetensors, every
factor's shape against the model's) and fitted to an adapter bank of the model's settings on the meta device
(rank at most engine.max_lora_rank, routed-expert factors only on float experts), which allocates nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from herd.model.config import load_config
from herd.model.lora import load_adapter
from herd.model.lora_bank import AdapterBank
from herd.platform.tenancy.adapter_registry import AdapterCheck
from herd.platform.tenancy.store import NotFound


@dataclass(frozen=True)
class AdapterModel:
    """What the check needs of a served model: its checkpoint and its engine's LoRA settings."""

    checkpoint: Path
    max_loras: int
    max_lora_rank: int


def model_checker(models: Mapping[str, AdapterModel]) -> AdapterCheck:
    """The registration check over the models this server serves."""

    def check(model: str, path: str) -> tuple[str, int, list[str]]:
        served = models.get(model)
        if served is None:
            raise NotFound(f"no model {model!r} is served here (models: {sorted(models)})")
        if served.max_loras < 1:
            raise ValueError(f"model {model} serves no LoRA adapters (its engine.max_loras is 0)")
        directory = Path(path).expanduser().resolve()
        config = load_config(served.checkpoint)
        adapter = load_adapter(directory, config.text)
        bank = AdapterBank(config.text, slots=1, max_rank=served.max_lora_rank, dtype=torch.float32, device="meta",
                           quantized_experts=config.quantization is not None)
        bank.check_fits(adapter)
        return str(directory), adapter.rank, sorted({name for _, name in adapter.modules})

    return check


__all__ = ["AdapterModel", "model_checker"]
