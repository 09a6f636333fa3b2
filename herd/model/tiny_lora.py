"""A tiny random LoRA adapter in PEFT's format, for a tiny model: the fixture of the LoRA tests.

Both factors are random and nonzero (PEFT's training init leaves B at zero, which would prove nothing), drawn
so that each adapted module's delta is about `strength` times a unit-scale projection whatever the rank and
alpha. Keys and nesting follow what PEFT's save_pretrained writes (herd.model.lora), so PEFT loads the result.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from herd.model.config import TextConfig
from herd.model.lora import WEIGHTS_FILE
from herd.model.lora_config import CONFIG_FILE
from herd.model.lora_sites import ATTENTION, DENSE_MLP, EXPERTS, SHARED_EXPERT, SiteShape, layer_sites

# Target groups, and the PEFT target names that select exactly them.
TARGETS: dict[str, tuple[str, ...]] = {
    "attention": tuple(name.split(".")[-1] for name in ATTENTION),
    "shared_expert": tuple(name.removeprefix("feed_forward.") for name in SHARED_EXPERT),
    "dense_mlp": DENSE_MLP,
    "experts": EXPERTS,
}
ALL_TARGETS = tuple(TARGETS)


def make_tiny_lora(
    out: str | Path,
    config: TextConfig,
    *,
    rank: int = 8,
    lora_alpha: float = 16.0,
    targets: Collection[str] = ALL_TARGETS,
    use_rslora: bool = False,
    seed: int = 0,
    strength: float = 0.5,
    expert_ids: Sequence[int] | None = None,
    prefix: str = "language_model.model.",
) -> Path:
    """Write an adapter of `rank` on `targets` (keys of TARGETS) for a model of `config` into `out`.

    `expert_ids`: the routed experts given nonzero factors (default all). `prefix`: the text model's path in the
    model PEFT wrapped (`language_model.model.` for Llama4ForConditionalGeneration, `model.` for the causal LM).
    """
    unknown = set(targets) - set(TARGETS)
    if unknown or not targets:
        raise ValueError(f"targets must be a non-empty subset of {list(TARGETS)}, got {sorted(targets)}")
    present = {name for layer in range(config.num_hidden_layers) for name in layer_sites(config, layer)}
    modules = [name for group in ALL_TARGETS if group in targets and group != "experts" for name in TARGETS[group]
               if any(p == name or p.endswith(f".{name}") for p in present)]  # a target must select something
    parameters = list(EXPERTS) if "experts" in targets and config.moe_layers else []
    scaling = lora_alpha / (rank**0.5 if use_rslora else rank)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config.num_hidden_layers):
        base = f"base_model.model.{prefix}layers.{layer}."
        for name, shape in layer_sites(config, layer).items():
            if shape.experts or not any(name == m or name.endswith(f".{m}") for m in modules):
                continue
            a, b = _factors(shape, rank, strength / scaling, generator)
            tensors[f"{base}{name}.lora_A.weight"], tensors[f"{base}{name}.lora_B.weight"] = a, b
        if parameters and config.is_moe(layer):
            tensors.update(_expert_tensors(config, layer, base, rank, strength / scaling, generator, expert_ids))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE))
    adapter_config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": lora_alpha, "use_rslora": use_rslora, "bias": "none",
        "target_modules": modules or None, "target_parameters": parameters or None, "lora_dropout": 0.0,
        "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, "task_type": None,
        "base_model_name_or_path": None, "inference_mode": True,
    }
    (out / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out


def _factors(shape: SiteShape, rank: int, gain: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A [r, Din], lora_B [Dout, r]: B A x about gain times as large as x, entry by entry."""
    a = torch.randn(rank, shape.d_in, generator=generator) * shape.d_in**-0.5
    b = torch.randn(shape.d_out, rank, generator=generator) * rank**-0.5 * gain
    return a, b


def _expert_tensors(config: TextConfig, layer: int, base: str, rank: int, gain: float, generator: torch.Generator,
                    expert_ids: Sequence[int] | None) -> dict[str, torch.Tensor]:
    """Both expert weights' pairs as PEFT stores them: gate_up_proj's nested under base_layer (herd.model.lora)."""
    shapes = layer_sites(config, layer)
    tensors = {}
    for name, module in zip(EXPERTS, ("feed_forward.experts.base_layer", "feed_forward.experts"), strict=True):
        shape = shapes[name]
        pairs = [_factors(shape, rank, gain, generator) for _ in range(shape.experts)]
        a = torch.stack([p[0] for p in pairs])  # [E, r, Din]
        b = torch.stack([p[1] for p in pairs])  # [E, Dout, r]
        if expert_ids is not None:
            keep = torch.zeros(shape.experts, dtype=torch.bool)
            keep[list(expert_ids)] = True
            a, b = a * keep[:, None, None], b * keep[:, None, None]
        # PEFT: lora_B [Din, r*E] with columns (rank, expert); lora_A [E*r, Dout] with rows (expert, rank).
        tensors[f"{base}{module}.lora_B.weight"] = a.permute(2, 1, 0).reshape(shape.d_in, rank * shape.experts)
        tensors[f"{base}{module}.lora_A.weight"] = b.transpose(1, 2).reshape(shape.experts * rank, shape.d_out)
    return tensors
