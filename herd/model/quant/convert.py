"""`herd quantize`: write an int4 or FP8 copy of a bf16 / fp32 Llama 4 checkpoint that Herd loads.

Legend: E experts, H hidden, I expert intermediate.

The feed-forward weights (routed experts, shared expert, dense MLPs) are quantised; everything else is
copied as stored, and the tokenizer and other files are copied beside it. Formats written:
- int4: Herd's fused layout (herd.model.quant.layout), `quant_method` "herd";
- fp8: the published compressed-tensors layout: per-expert `experts.{e}.{gate,up,down}_proj.weight`
  e4m3 [out, in] with float32 `weight_scale` [out, 1], and the same for the linear layers.
Tensor names keep the source's spelling (a multimodal checkpoint's `language_model.` prefix stays).
Tensors are read one at a time from the memory-mapped source, experts one expert at a time, and written
into safetensors shards of at most `shard_bytes` (herd.model.checkpoint_writer), so memory stays near
one shard.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from herd.kernels.fp8 import quantize_fp8
from herd.kernels.int4 import quantize_int4
from herd.kernels.schemes import SCHEMES
from herd.model.checkpoint import INDEX_FILE, Checkpoint
from herd.model.checkpoint_writer import write_sharded
from herd.model.config import read_config_json
from herd.model.quant.config import QuantizationConfig

KEPT = ("re:.*self_attn.*", r"re:.*feed_forward\.router$", r"re:.*embed_tokens$", "lm_head",
        "re:vision_model.*", "re:multi_modal_projector.*")
"""The ignore list written: every module but the feed-forward ones stays as stored."""
_EXPERTS = re.compile(r"model\.layers\.\d+\.feed_forward\.experts\.(gate_up_proj|down_proj)$")
_LINEAR = re.compile(r"model\.layers\.\d+\.feed_forward\.(shared_expert\.)?(gate|up|down)_proj\.weight$")
_SHARD_BYTES = 4 << 30


def quantize_checkpoint(source: str | Path, dest: str | Path, scheme: str, *, shard_bytes: int = _SHARD_BYTES,
                        progress: bool = True) -> Path:
    """Write `source` quantised to `scheme` (int4 or fp8) into the new directory `dest`; returns `dest`."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {tuple(SCHEMES)}, got {scheme!r}")
    source, dest = Path(source), Path(dest)
    raw_config, where = read_config_json(source)
    if raw_config.get("quantization_config") is not None:
        raise ValueError(f"{where} is already quantised; herd quantize reads a bf16 or float32 checkpoint")
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"{dest} exists and is not empty; herd quantize writes a new directory")
    checkpoint = Checkpoint(source)
    config = QuantizationConfig(scheme=scheme, ignore=KEPT)
    dest.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name not in (INDEX_FILE, "config.json"):
            shutil.copy2(file, dest / file.name)
    (dest / "config.json").write_text(json.dumps({**raw_config, "quantization_config": config.to_hf()}, indent=2))
    names = sorted(checkpoint.names())
    with tqdm(total=sum(checkpoint.nbytes(n) for n in names), unit="B", unit_scale=True, desc=f"quantising {scheme}",
              delay=0.5, disable=not progress) as bar:
        write_sharded(dest, _converted(checkpoint, names, scheme, bar), shard_bytes=shard_bytes)
    return dest


def _converted(checkpoint: Checkpoint, names: list[str], scheme: str, bar: tqdm[Any]
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name as the source spells it, tensor) for everything the quantised checkpoint holds."""
    for name in names:
        raw = checkpoint.raw_name(name)
        if _EXPERTS.fullmatch(name):
            count = checkpoint.shape(name)[0]
            yield from _experts(raw, (checkpoint.expert_rows(name, [e])[0] for e in range(count)), scheme)
        elif _LINEAR.fullmatch(name):
            yield from _linear(raw.removesuffix(".weight"), checkpoint.tensor(name), scheme)
        else:
            yield raw, checkpoint.tensor(name)
        bar.update(checkpoint.nbytes(name))


def _experts(raw: str, experts: Iterator[torch.Tensor], scheme: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A fused experts tensor (gate_up [E, H, 2I] or down [E, I, H]), given one expert [in, out] at a time."""
    if scheme == "int4":
        parts = [quantize_int4(expert) for expert in experts]
        yield f"{raw}_packed", torch.stack([p for p, _ in parts])
        yield f"{raw}_scale", torch.stack([s for _, s in parts])
        return
    prefix, which = raw.rsplit(".", 1)
    for e, expert in enumerate(experts):
        inter = expert.shape[1] // 2
        if which == "gate_up_proj":
            pieces = {"gate_proj": expert[:, :inter], "up_proj": expert[:, inter:]}
        else:
            pieces = {"down_proj": expert}
        for proj, weight in pieces.items():  # [in, out]
            yield from _linear(f"{prefix}.{e}.{proj}", weight.t(), scheme)


def _linear(module: str, weight: torch.Tensor, scheme: str) -> Iterator[tuple[str, torch.Tensor]]:
    """An nn.Linear weight [out, in] of `module` in `scheme`'s linear layout."""
    if scheme == "int4":
        packed, scales = quantize_int4(weight.t())  # quantised along the input
        yield f"{module}.weight_packed", packed.contiguous()
        yield f"{module}.weight_scale", scales.contiguous()
        return
    values, scales = quantize_fp8(weight.t())  # [in, out], [1, out]
    yield f"{module}.weight", values.t().contiguous()
    yield f"{module}.weight_scale", scales.t().contiguous()


__all__ = ["quantize_checkpoint"]
