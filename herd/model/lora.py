"""A LoRA adapter in PEFT's format, read from a local directory and checked against the model it is for.

Legend: r rank, E routed experts, Din / Dout the adapted weight's inputs / outputs (y = W x).

The directory holds `adapter_config.json` (herd.model.lora_config) and `adapter_model.safetensors`, keyed as
PEFT saves them: `base_model.model.[language_model.]model.layers.{i}.{module}.lora_{A,B}.weight`, A [r, Din] and
B [Dout, r] for a linear (herd.model.lora_sites names the modules).

Routed experts use PEFT's `target_parameters` on the fused `feed_forward.experts.gate_up_proj` [E, H, 2I] and
`down_proj` [E, I, H]: one pair per parameter holds every expert's factors, lora_A [E*r, Dout] (expert-major
rows) and lora_B [Din, r*E] (columns rank-major, expert-minor), so expert e adds scaling * x B_e A_e. When both
parameters of a layer are targeted, PEFT nests its wrappers in the module's parameter order, so gate_up_proj's
pair is stored under `experts.base_layer.lora_*` and down_proj's under `experts.lora_*`; with one of them, its
pair is under `experts.lora_*`. An adapter may cover any layers and either or both expert weights; an expert it
leaves untouched in a covered layer has zero factors there (and so a delta of exactly zero).

Every way an adapter can fail to fit (a key for a module or layer the model lacks, a module target_modules does
not select, a target selecting nothing, a shape or rank that does not fit) raises AdapterError naming the file
and the key, when the adapter is loaded, never while serving.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from herd.model.config import TextConfig
from herd.model.lora_config import CONFIG_FILE, AdapterConfig, AdapterError, read_adapter_config
from herd.model.lora_sites import EXPERTS, MLP, Site, SiteShape, layer_sites

WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(?P<prefix>(?:language_model\.)?model\.)layers\.(?P<layer>\d+)\."
                  r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
_EXPERTS_MODULE = re.compile(r"feed_forward\.experts((?:\.base_layer)*)")
_SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", *MLP)


@dataclass(frozen=True)
class LoRAFactors:
    """One adapted weight's factors, in Herd's orientation: delta(x) = scaling * b @ (a @ x)."""

    a: torch.Tensor  # [r, Din], or [E, r, Din] for routed experts
    b: torch.Tensor  # [Dout, r], or [E, Dout, r]


@dataclass(frozen=True)
class LoRAAdapter:
    """A checked adapter: its factors by site, one rank and one scaling for all of them."""

    path: Path
    rank: int
    scaling: float
    modules: dict[Site, LoRAFactors]


def load_adapter(path: str | Path, config: TextConfig) -> LoRAAdapter:
    """Read the adapter at `path` for a model of `config`; AdapterError names what does not fit."""
    directory = Path(path)
    adapter = read_adapter_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{directory}: no {WEIGHTS_FILE} (Herd reads adapter weights from safetensors only)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{weights}: not a readable safetensors file ({err})") from err
    if not tensors:
        raise AdapterError(f"{weights}: holds no tensors")
    _check_target_names(adapter, str(directory / CONFIG_FILE))
    pairs = _pairs(tensors, str(weights))
    modules: dict[Site, LoRAFactors] = {}
    for (prefix, layer, module), (a, b) in sorted(pairs.items()):
        where = f"{weights}: {prefix}layers.{layer}.{module}"
        if not 0 <= layer < config.num_hidden_layers:
            raise AdapterError(f"{where}: the model has layers 0..{config.num_hidden_layers - 1}")
        shapes = layer_sites(config, layer)
        experts = _EXPERTS_MODULE.fullmatch(module)
        if experts is None:
            _check_linear(adapter, shapes, prefix, layer, module, where)
            modules[(layer, module)] = _linear_factors(a, b, shapes[module], adapter.rank, where)
    for (prefix, layer), depths in _expert_depths(pairs).items():
        shapes = layer_sites(config, layer)
        for name, depth_module in _expert_parameters(adapter, shapes, prefix, layer, depths, str(weights)).items():
            a, b = pairs[(prefix, layer, depth_module)]
            where = f"{weights}: {prefix}layers.{layer}.{depth_module} ({name})"
            modules[(layer, name)] = _expert_factors(a, b, shapes[name], adapter.rank, where)
    _check_targets_present(adapter, modules, str(directory))
    return LoRAAdapter(path=directory, rank=adapter.rank, scaling=adapter.scaling, modules=modules)


_Pairs = dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]]  # (prefix, layer, module) -> (A, B)


def _pairs(tensors: dict[str, torch.Tensor], source: str) -> _Pairs:
    """(prefix, layer, module) -> (lora_A, lora_B) as stored; AdapterError for any other key or a lone half."""
    halves: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"{source}: key {key!r} is not a LoRA weight of a decoder layer's module "
                               "(expected base_model.model.[language_model.]model.layers.N.<module>.lora_A/B.weight)")
        if not tensor.dtype.is_floating_point:
            raise AdapterError(f"{source}: {key!r} has dtype {tensor.dtype}; LoRA factors are floating point")
        site = (match["prefix"], int(match["layer"]), match["module"])
        halves.setdefault(site, {})[match["part"]] = tensor
    pairs = {}
    for (prefix, layer, module), parts in halves.items():
        if set(parts) != {"A", "B"}:
            lacking = "lora_B" if "A" in parts else "lora_A"
            raise AdapterError(f"{source}: {prefix}layers.{layer}.{module} has no {lacking}.weight")
        pairs[(prefix, layer, module)] = (parts["A"], parts["B"])
    return pairs


def _check_linear(adapter: AdapterConfig, shapes: dict[str, SiteShape], prefix: str, layer: int, module: str,
                  where: str) -> None:
    if module not in shapes or shapes[module].experts:
        kind = "an MoE layer" if any(s.experts for s in shapes.values()) else "a dense layer"
        raise AdapterError(f"{where}: no such module to adapt in layer {layer} ({kind}); adaptable there: "
                           f"{sorted(n for n, s in shapes.items() if not s.experts)}")
    if not adapter.targets_module(f"{prefix}layers.{layer}.{module}"):
        raise AdapterError(f"{where}: target_modules {adapter.target_modules!r} does not select this module")


def _linear_factors(a: torch.Tensor, b: torch.Tensor, shape: SiteShape, rank: int, where: str) -> LoRAFactors:
    if tuple(a.shape) != (rank, shape.d_in) or tuple(b.shape) != (shape.d_out, rank):
        raise AdapterError(f"{where}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit: r={rank} and "
                           f"the module's weight (in {shape.d_in}, out {shape.d_out}) need A [{rank}, {shape.d_in}] "
                           f"and B [{shape.d_out}, {rank}]")
    return LoRAFactors(a=a.float(), b=b.float())


def _expert_depths(pairs: _Pairs) -> dict[tuple[str, int], dict[int, str]]:
    """(prefix, layer) -> {nesting depth: stored module name} for the routed experts' pairs."""
    depths: dict[tuple[str, int], dict[int, str]] = {}
    for prefix, layer, module in pairs:
        match = _EXPERTS_MODULE.fullmatch(module)
        if match is not None:
            depths.setdefault((prefix, layer), {})[match[1].count(".base_layer")] = module
    return depths


def _expert_parameters(adapter: AdapterConfig, shapes: dict[str, SiteShape], prefix: str, layer: int,
                       depths: dict[int, str], source: str) -> dict[str, str]:
    """Which expert weight each stored pair adapts: {site name: stored module name}, by PEFT's nesting order."""
    where = f"{source}: {prefix}layers.{layer}.feed_forward.experts"
    if EXPERTS[0] not in shapes:
        raise AdapterError(f"{where}: layer {layer} is dense; it has no routed experts")
    targeted = [name for name in EXPERTS if adapter.targets_parameter(f"{prefix}layers.{layer}.{name}")]
    if not targeted:
        raise AdapterError(f"{where}: target_parameters {list(adapter.target_parameters)} selects no expert weight "
                           "of this layer, yet the file holds factors for it")
    if sorted(depths) != list(range(len(targeted))):
        raise AdapterError(f"{where}: target_parameters selects {targeted} here, so PEFT would store "
                           f"{len(targeted)} nested pair(s); the file holds {sorted(depths.values())}")
    # PEFT wraps the parameters in the module's order, each around the last: the first is the deepest.
    return {name: depths[len(targeted) - 1 - j] for j, name in enumerate(targeted)}


def _expert_factors(a: torch.Tensor, b: torch.Tensor, shape: SiteShape, rank: int, where: str) -> LoRAFactors:
    experts, rows = shape.experts, rank * shape.experts
    if tuple(a.shape) != (rows, shape.d_out) or tuple(b.shape) != (shape.d_in, rows):
        raise AdapterError(f"{where}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit: r={rank}, "
                           f"{experts} experts and the weight (in {shape.d_in}, out {shape.d_out} per expert) need "
                           f"lora_A [{rows}, {shape.d_out}] and lora_B [{shape.d_in}, {rows}]")
    # Stored: lora_B columns (rank, expert), lora_A rows (expert, rank); expert e adds x @ B_e @ A_e.
    down_proj = b.float().reshape(shape.d_in, rank, experts).permute(2, 1, 0)  # [E, r, Din]
    up_proj = a.float().reshape(experts, rank, shape.d_out).transpose(1, 2)  # [E, Dout, r]
    return LoRAFactors(a=down_proj.contiguous(), b=up_proj.contiguous())


def _check_target_names(adapter: AdapterConfig, source: str) -> None:
    """Every listed target must name something Herd adapts."""
    if isinstance(adapter.target_modules, tuple):
        for target in adapter.target_modules:
            if target.rsplit(".", 1)[-1] not in _SUPPORTED_TARGETS:
                raise AdapterError(f"{source}: target_modules names {target!r}; Herd adapts {list(_SUPPORTED_TARGETS)}"
                                   " (attention, shared expert and dense MLP projections) and the routed experts")
    for target in adapter.target_parameters:
        if not _expert_names(target):
            raise AdapterError(f"{source}: target_parameters names {target!r}; Herd adapts {list(EXPERTS)}")


def _check_targets_present(adapter: AdapterConfig, modules: dict[Site, LoRAFactors], source: str) -> None:
    """Every listed target must select at least one module the file has factors for."""
    covered = {name for _, name in modules}
    if isinstance(adapter.target_modules, tuple):
        for target in adapter.target_modules:
            if not any(name == target or name.endswith(f".{target}") or target.endswith(f".{name}")
                       for name in covered):
                raise AdapterError(f"{source}: target_modules names {target!r}, but {WEIGHTS_FILE} holds no factors "
                                   "for it")
    for target in adapter.target_parameters:
        if not covered.intersection(_expert_names(target)):
            raise AdapterError(f"{source}: target_parameters names {target!r}, but {WEIGHTS_FILE} holds no factors "
                               "for it")


def _expert_names(target: str) -> list[str]:
    """The routed-expert weights a target_parameters entry selects (PEFT: the path, or a dotted suffix of it)."""
    return [name for name in EXPERTS if name == target or name.endswith(f".{target}") or target.endswith(f".{name}")]
