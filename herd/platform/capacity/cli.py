"""`herd plan`: will this model fit these GPUs, and with how much context? No GPU is needed to ask."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from herd.model.config import ModelConfig, read_config_json
from herd.model.vision_config import VisionConfig
from herd.platform.capacity.gpus import GPUS, gpu_type
from herd.platform.capacity.memory import KV_DTYPES, Workload
from herd.platform.capacity.plan import plan
from herd.platform.capacity.presets import PRESETS, preset_config
from herd.platform.capacity.report import as_json, as_text, search_json, search_text
from herd.platform.capacity.search import search
from herd.platform.capacity.weights import FORMATS


def add_parser(commands: Any) -> None:
    cmd = commands.add_parser("plan", help="bytes per GPU of one replica, whether it fits, its largest context")
    cmd.add_argument("--model", required=True,
                     help=f"{' or '.join(sorted(PRESETS))} (the published configs), or a config.json / checkpoint")
    cmd.add_argument("--weights", choices=FORMATS, help="weight format of the feed-forward layers (default: a "
                     "config.json's quantization_config, else bf16)")
    cmd.add_argument("--gpu", default="h100", help=f"GPU type: {', '.join(sorted(GPUS))}")
    cmd.add_argument("--gpu-memory-gib", type=float, help="any other GPU: its memory in GiB")
    cmd.add_argument("--gpus", type=int, default=1, help="GPUs per replica")
    cmd.add_argument("--context", type=int, default=8192, help="prompt + output tokens per sequence")
    cmd.add_argument("--sequences", type=int, default=1, help="sequences holding KV at once")
    cmd.add_argument("--kv-dtype", choices=sorted(KV_DTYPES),
                     help="KV cache dtype (fp8: the engine's kv_cache_dtype fp8, e4m3 with a float32 scale per token "
                     "and kv head); default bf16, and --search tries bf16 and fp8 unless this is given")
    layout = cmd.add_mutually_exclusive_group()
    layout.add_argument("--trunks", type=int, help="M: GPUs each holding a copy of the trunk (default 1); the other "
                        "G - M hold the expert shards (a model's `trunks` setting)")
    layout.add_argument("--search", action="store_true", help="try every M from 1 to G - 1, context parallelism "
                        "off and on, and the KV dtypes; print every layout and the best one's table")
    cmd.add_argument("--context-parallel", action="store_true", help="with --trunks M > 1: split each sequence's "
                     "global-layer KV over the M trunks (engine.context_parallel: M)")
    cmd.add_argument("--step-tokens", type=int, default=8192, help="tokens per engine step (max_num_batched_tokens)")
    cmd.add_argument("--memory-utilization", type=float, default=0.90, help="share of each GPU's memory to use")
    cmd.add_argument("--json", action="store_true", help="print JSON instead of the table")
    cmd.set_defaults(run=run)


def load_model_config(model: str) -> tuple[ModelConfig, VisionConfig | None, str]:
    """A preset by name, or a config.json (file or checkpoint directory)."""
    if model.lower() in PRESETS:
        raw, source = preset_config(model.lower()), model.lower()
    else:
        raw, source = read_config_json(Path(model))
    config = ModelConfig.from_hf(raw, source=source)
    vision = VisionConfig.from_hf(raw, source=source) if config.multimodal else None
    return config, vision, source


def run(args: argparse.Namespace) -> int:
    config, vision, source = load_model_config(args.model)
    gpu = gpu_type(args.gpu, memory_gib=args.gpu_memory_gib)
    load = Workload(sequences=args.sequences, context_tokens=args.context, step_tokens=args.step_tokens,
                    kv_dtype=args.kv_dtype or "bf16")
    weights = args.weights or (config.quantization.scheme if config.quantization is not None else "bf16")
    title = (f"{source}, {weights} weights, {args.gpus} x {gpu.name} "
             f"({gpu.memory_bytes / 2**30:.1f} GiB, {args.memory_utilization:.0%} used)")
    if args.search:
        found = search(config.text, vision, weight_format=weights, gpu=gpu, num_gpus=args.gpus, load=load,
                       kv_dtypes=[args.kv_dtype] if args.kv_dtype else ["bf16", "fp8"],
                       memory_utilization=args.memory_utilization)
        print(json.dumps(search_json(found), indent=2) if args.json else search_text(found, title))
        return 0 if found.fits else 1
    result = plan(config.text, vision, weight_format=weights, gpu=gpu, num_gpus=args.gpus, load=load,
                  memory_utilization=args.memory_utilization, trunks=args.trunks or 1,
                  context_parallel=args.context_parallel)
    print(json.dumps(as_json(result), indent=2) if args.json else as_text(result, title))
    return 0 if result.fits else 1
