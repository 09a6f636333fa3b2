"""Build a Llama 4 model from a checkpoint directory, reading each tensor once, straight into place.

The model is built on the meta device (no memory, no random init), materialised empty on the target
device, and filled tensor by tensor from the memory-mapped safetensors files, so peak memory is the
model plus one tensor. With `experts=`, MoE layers hold only those experts and read only their rows.
An int4 or FP8 checkpoint (config.json's quantization_config) fills Herd's quantised modules instead,
as herd.model.quant.reader reads them, whatever its expert layout.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from herd.kernels import QuantizedTensor
from herd.model.checkpoint import Checkpoint, CheckpointError, copy_checked
from herd.model.config import ModelConfig, TextConfig, load_config
from herd.model.llama4 import Llama4Model
from herd.model.moe import Experts
from herd.model.quant.layout import expert_storage, expert_weights
from herd.model.quant.linear import QuantizedLinear
from herd.model.quant.reader import (
    dequantized_weight,
    expert_tensor_names,
    read_experts,
    read_fp8_linear,
    read_int4_linear,
)
from herd.model.quant.swap import experts_quantized, quantize_modules

log = logging.getLogger(__name__)

_EXPERT_PARAMS = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")
_IGNORED_PREFIXES = ("vision_model.", "multi_modal_projector.")


@dataclass(frozen=True)
class ExpertWeights:
    """One MoE layer's slice of experts, ascending by id: gate_up [e, H, 2I], down [e, I, H].

    Tensors in the compute dtype, or QuantizedTensors for an int4 / FP8 checkpoint.
    """

    expert_ids: tuple[int, ...]
    gate_up: torch.Tensor | QuantizedTensor
    down: torch.Tensor | QuantizedTensor

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


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
    experts then live elsewhere and an experts executor must be set before running. An int4 or FP8
    checkpoint keeps its feed-forward weights quantised; `dtype` is then the activations' dtype.
    """
    config = load_config(path)
    checkpoint = Checkpoint(path)
    expert_ids = None if experts is None else _expert_ids(experts, config.text)
    with torch.device("meta"):
        model = Llama4Model(config.text, expert_ids=expert_ids)
        if config.quantization is not None:
            quantize_modules(model, config.quantization)
        model = model.to(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    _warn_unused(checkpoint, model)
    targets = dict(model.named_parameters()) | dict(model.named_buffers())  # tied weights appear once
    quantized = {name: m for name, m in model.named_modules()
                 if isinstance(m, QuantizedLinear) or (isinstance(m, Experts) and m.scheme)}
    total = sum(_stored_bytes(checkpoint, name, model) for name in targets if name.rsplit(".", 1)[0] not in quantized)
    total += sum(_stored_quantized_bytes(checkpoint, prefix, m) for prefix, m in quantized.items())
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", delay=0.5, disable=not progress) as bar:
        for prefix, module in quantized.items():
            for name, stored in _read_quantized(checkpoint, prefix, module).items():
                copy_checked(targets.pop(f"{prefix}.{name}"), stored, directory=checkpoint.directory,
                             name=f"{prefix}.{name}")
                bar.update(stored.numel() * stored.element_size())
            for name in [n for n in targets if n.startswith(f"{prefix}.")]:  # no experts held: empty buffers
                targets.pop(name)
        for name, target in targets.items():
            stored = _read(checkpoint, name, model)
            copy_checked(target, stored, directory=checkpoint.directory, name=name)
            bar.update(stored.numel() * stored.element_size())
    return model.eval()


def load_experts(
    path: str | Path,
    experts: Iterable[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[int, ExpertWeights]:
    """The given experts of every MoE layer, and nothing else: what an expert shard holds, by layer.

    An int4 or FP8 checkpoint's experts stay quantised (QuantizedTensors); others are cast to `dtype`.
    """
    config: ModelConfig = load_config(path)
    checkpoint = Checkpoint(path)
    ids = _expert_ids(experts, config.text)
    text, quantization = config.text, config.quantization
    layers: dict[int, ExpertWeights] = {}
    for layer in text.moe_layers:
        prefix = f"model.layers.{layer}.feed_forward.experts"
        gate_up: torch.Tensor | QuantizedTensor
        down: torch.Tensor | QuantizedTensor
        if quantization is not None and experts_quantized(prefix, text.num_local_experts, quantization) and ids:
            stored = read_experts(checkpoint, quantization.scheme, prefix, ids)
            shapes = expert_storage(quantization.scheme, len(ids), text.hidden_size, text.intermediate_size,
                                    quantization.group_size)
            for name, (shape, _) in shapes.items():
                if tuple(stored[name].shape) != shape:
                    raise CheckpointError(f"{checkpoint.directory}: {prefix}.{name} has shape "
                                          f"{tuple(stored[name].shape)}, config.json implies {shape}")
            moved = {name: t.to(device) for name, t in stored.items()}
            gate_up, down = expert_weights(quantization.scheme, moved, text.hidden_size, text.intermediate_size,
                                           quantization.group_size)
        else:
            gate_up, down = (
                _read_rows(checkpoint, f"{prefix}.{p.rsplit('.', 1)[1]}", ids).to(device=device, dtype=dtype)
                for p in _EXPERT_PARAMS
            )
        layers[layer] = ExpertWeights(expert_ids=ids, gate_up=gate_up, down=down)
    return layers


def _read(checkpoint: Checkpoint, name: str, model: Llama4Model) -> torch.Tensor:
    if name.endswith(_EXPERT_PARAMS):
        return _read_rows(checkpoint, name, _held_experts(model, name))
    if name == "lm_head.weight" and name not in checkpoint:
        raise CheckpointError(
            f"checkpoint {checkpoint.directory} has no lm_head.weight and config.json does not tie it "
            f"to the embeddings (tie_word_embeddings is false)"
        )
    dequantized = dequantized_weight(checkpoint, name)
    if dequantized is not None:  # an FP8 tensor of a module Herd runs in float (attention, say)
        log.info("%s: %s is FP8 in the checkpoint; dequantised to run in float", checkpoint.directory, name)
        return dequantized
    return checkpoint.tensor(name)


def _read_rows(checkpoint: Checkpoint, name: str, held: Sequence[int]) -> torch.Tensor:
    """Rows of a bf16 fused expert tensor; an FP8 one (a quantised layer the config ignores) dequantised."""
    rows = checkpoint.expert_rows(name, held)
    scale = f"{name}_scale"
    if scale in checkpoint:
        return rows.float() * checkpoint.expert_rows(scale, held).float()
    return rows


def _stored_bytes(checkpoint: Checkpoint, name: str, model: Llama4Model) -> int:
    if name not in checkpoint:
        return 0
    full = checkpoint.nbytes(name)
    if name.endswith(_EXPERT_PARAMS):
        return full * len(_held_experts(model, name)) // model.config.num_local_experts
    return full


def _read_quantized(checkpoint: Checkpoint, prefix: str, module: QuantizedLinear | Experts) -> dict[str, torch.Tensor]:
    """A quantised module's buffers from the checkpoint, in their stored dtypes (checked)."""
    if isinstance(module, Experts):
        return read_experts(checkpoint, module.scheme or "", prefix, module.expert_ids)
    if module.scheme == "fp8":
        return read_fp8_linear(checkpoint, prefix)
    return read_int4_linear(checkpoint, prefix)


def _stored_quantized_bytes(checkpoint: Checkpoint, prefix: str, module: QuantizedLinear | Experts) -> int:
    if isinstance(module, QuantizedLinear):
        return sum(checkpoint.nbytes(f"{prefix}.{n}") for n in dict(module.named_buffers())
                   if f"{prefix}.{n}" in checkpoint)
    names = expert_tensor_names(checkpoint, module.scheme or "", prefix, module.num_experts)
    full = sum(checkpoint.nbytes(n) for n in names if n in checkpoint)
    return full * len(module.expert_ids) // module.num_experts


def _held_experts(model: Llama4Model, param_name: str) -> tuple[int, ...]:
    experts = model.get_submodule(param_name.rsplit(".", 1)[0])
    if not isinstance(experts, Experts):  # only the fused expert parameters come here
        raise TypeError(f"{param_name} is not a parameter of an Experts module")
    return experts.expert_ids


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
    wanted = set(dict(model.named_parameters(remove_duplicate=False))) | set(dict(model.named_buffers()))
    for prefix, module in model.named_modules():
        if isinstance(module, Experts) and module.scheme:
            wanted |= expert_tensor_names(checkpoint, module.scheme, prefix, module.num_experts)
    wanted |= {f"{n}_scale" for n in wanted}  # FP8 weights of modules run in float carry a scale
    unused = sorted(
        n for n in checkpoint.names() - wanted
        if not n.startswith(_IGNORED_PREFIXES) and not n.endswith("rotary_emb.inv_freq")
    )
    if unused:
        log.warning("checkpoint %s has %d tensors the config does not use, e.g. %s",
                    checkpoint.directory, len(unused), unused[:3])
