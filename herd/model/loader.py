"""Build a Llama 4 model from a checkpoint directory, reading each tensor once, straight into place.

The model is built on the meta device (no memory, no random init), materialised empty on the target
device, and filled tensor by tensor from the memory-mapped safetensors files, so peak memory is the
model plus one tensor. With `experts=`, MoE layers hold only those experts and read only their rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from herd.model.checkpoint import Checkpoint, CheckpointError, copy_checked
from herd.model.config import ModelConfig, TextConfig, load_config
from herd.model.llama4 import Llama4Model

log = logging.getLogger(__name__)

_EXPERT_PARAMS = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")
_IGNORED_PREFIXES = ("vision_model.", "multi_modal_projector.")


@dataclass(frozen=True)
class ExpertWeights:
    """One MoE layer's slice of experts, ascending by id: gate_up [e, H, 2I], down [e, I, H]."""

    expert_ids: tuple[int, ...]
    gate_up: torch.Tensor
    down: torch.Tensor


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    experts: Iterable[int] | None = None,
    progress: bool = True,
) -> Llama4Model:
    """Load the text model of a Llama 4 checkpoint (either HF layout), optionally a subset of experts.

    `experts=()` loads the trunk alone (attention, routers, shared experts, dense layers): routed
    experts then live elsewhere and an experts executor must be set before running.
    """
    config = load_config(path)
    checkpoint = Checkpoint(path)
    expert_ids = None if experts is None else _expert_ids(experts, config.text)
    with torch.device("meta"):
        model = Llama4Model(config.text, expert_ids=expert_ids).to(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    _warn_unused(checkpoint, model)
    params = dict(model.named_parameters())  # tied weights appear once
    total = sum(_stored_bytes(checkpoint, name, model) for name in params)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", delay=0.5, disable=not progress) as bar:
        for name, param in params.items():
            stored = _read(checkpoint, name, model)
            copy_checked(param, stored, directory=checkpoint.directory, name=name)
            bar.update(stored.numel() * stored.element_size())
    return model.eval()


def load_experts(
    path: str | Path,
    experts: Iterable[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[int, ExpertWeights]:
    """The given experts of every MoE layer, and nothing else: what an expert shard holds, by layer."""
    config: ModelConfig = load_config(path)
    checkpoint = Checkpoint(path)
    ids = _expert_ids(experts, config.text)
    layers: dict[int, ExpertWeights] = {}
    for layer in config.text.moe_layers:
        gate_up, down = (
            checkpoint.expert_rows(f"model.layers.{layer}.{p}", ids).to(device=device, dtype=dtype)
            for p in _EXPERT_PARAMS
        )
        layers[layer] = ExpertWeights(expert_ids=ids, gate_up=gate_up, down=down)
    return layers


def _read(checkpoint: Checkpoint, name: str, model: Llama4Model) -> torch.Tensor:
    if name.endswith(_EXPERT_PARAMS):
        held = _held_experts(model, name)
        if held != tuple(range(model.config.num_local_experts)):
            return checkpoint.expert_rows(name, held)
    if name == "lm_head.weight" and name not in checkpoint:
        raise CheckpointError(
            f"checkpoint {checkpoint.directory} has no lm_head.weight and config.json does not tie it "
            f"to the embeddings (tie_word_embeddings is false)"
        )
    return checkpoint.tensor(name)


def _stored_bytes(checkpoint: Checkpoint, name: str, model: Llama4Model) -> int:
    if name not in checkpoint:
        return 0
    full = checkpoint.nbytes(name)
    if name.endswith(_EXPERT_PARAMS):
        return full * len(_held_experts(model, name)) // model.config.num_local_experts
    return full


def _held_experts(model: Llama4Model, param_name: str) -> tuple[int, ...]:
    experts = model.get_submodule(param_name.rsplit(".", 1)[0])
    return experts.expert_ids  # type: ignore[no-any-return]


def _expert_ids(experts: Iterable[int], config: TextConfig) -> tuple[int, ...]:
    ids = list(experts)
    count = config.num_local_experts
    bad = [e for e in ids if not isinstance(e, int) or not 0 <= e < count]
    if bad:
        raise ValueError(f"experts {bad} are outside 0..{count - 1}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"experts lists an expert twice: {ids}")
    return tuple(sorted(ids))


def _warn_unused(checkpoint: Checkpoint, model: Llama4Model) -> None:
    wanted = set(dict(model.named_parameters(remove_duplicate=False)))
    unused = sorted(
        n for n in checkpoint.names() - wanted
        if not n.startswith(_IGNORED_PREFIXES) and not n.endswith("rotary_emb.inv_freq")
    )
    if unused:
        log.warning("checkpoint %s has %d tensors the config does not use, e.g. %s",
                    checkpoint.directory, len(unused), unused[:3])
