"""One MoE layer step with its experts on 2 and 4 shards: in-process transport versus gRPC on loopback.

Shape of the kernels benchmark (H=1024, I=2048, E=16, top-1, float32). A one-layer checkpoint of
that shape is written to a temporary directory; the gRPC shards are `herd expert-shard` processes
(each with cores/shards threads), the in-process shards are the same expert slices in this process.
Both run the same trunk MoE layer (router, route, permute in placement order, dispatch, combine,
shared expert) on the same inputs. Reported per layer step (medians): total, and the gRPC breakdown:
trunk-side work (router, permute, combine, shared expert), serialise, wire (wait minus the slowest
shard's compute), expert compute (the slowest shard, as it reports), deserialise.
Target (issue "expert parallelism"): gRPC <= 1.25x in-process at 1024 tokens with 2 shards.

    .venv/bin/python bench/expert_dispatch.py [--tokens 64 256 1024 4096] [--shards 2 4] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common and tests' shard processes

from bench.common import parse_args_with_smoke
from herd.model import load_model
from herd.model.config import ModelConfig
from herd.model.tiny import random_weights
from herd.workers.dispatch import ExpertDispatcher
from herd.workers.grpc_transport import GrpcTransport
from herd.workers.placement import place_experts
from herd.workers.shard_experts import ShardExperts
from herd.workers.transport import InProcessTransport, TransportStats
from tests.integration.workers.shard_processes import ShardProcesses


def one_layer_checkpoint(directory: Path, hidden: int, inter: int, experts: int) -> Path:
    raw = {"model_type": "llama4_text", "vocab_size": 64, "hidden_size": hidden, "intermediate_size": inter,
           "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": hidden // 8,
           "num_local_experts": experts, "num_experts_per_tok": 1, "attention_chunk_size": 8192}
    (directory / "config.json").write_text(json.dumps(raw))
    weights = random_weights(ModelConfig.from_hf(raw), seed=0)
    save_file({k: v.float() for k, v in weights.items()}, str(directory / "model.safetensors"))
    return directory


def time_layer(layer: torch.nn.Module, x: torch.Tensor, stats: TransportStats, runs: int) -> dict[str, float]:
    layer(x)  # warm-up (and the first stream opening)
    totals, parts = [], []
    for _ in range(runs):
        before = TransportStats(**vars(stats))
        start = time.perf_counter()
        layer(x)
        totals.append(time.perf_counter() - start)
        parts.append({k: getattr(stats, k) - getattr(before, k) for k in ("serialize_s", "wait_s", "deserialize_s",
                                                                          "compute_s")})
    median = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    median["total_s"] = statistics.median(totals)
    return median


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--runs", type=int, default=7)
    args = parse_args_with_smoke(parser, argv, hidden=64, inter=128, experts=4, tokens=[8], shards=[2], runs=2)
    cores = os.cpu_count() or 1
    print(f"MoE layer step, H={args.hidden} I={args.inter} E={args.experts} top-1, float32, loopback, "
          f"{cores} cores, torch {torch.__version__}")
    print("| shards | T | in-process (ms) | gRPC (ms) | gRPC / in-process | trunk | serialise | wire | "
          "expert compute | deserialise |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    target = None
    with tempfile.TemporaryDirectory() as tmp:
        path = one_layer_checkpoint(Path(tmp), args.hidden, args.inter, args.experts)
        for shards in args.shards:
            placement = place_experts(args.experts, shards)
            specs = [f"{owned[0]}:{owned[-1] + 1}" for owned in placement.shard_experts]
            os.environ["OMP_NUM_THREADS"] = str(max(1, cores // shards))  # the shard processes share the cores
            with ShardProcesses(path, specs) as processes:
                del os.environ["OMP_NUM_THREADS"]
                local_model = load_model(path, experts=(), progress=False)
                local = InProcessTransport([ShardExperts.load(path, owned) for owned in placement.shard_experts])
                ExpertDispatcher(placement, local).attach(local_model)
                remote_model = load_model(path, experts=(), progress=False)
                remote = GrpcTransport(processes.addresses)
                ExpertDispatcher(placement, remote).attach(remote_model)
                for tokens in args.tokens:
                    x = torch.randn(tokens, args.hidden)
                    with torch.inference_mode():
                        mine = local_model.model.layers[0].feed_forward
                        theirs = remote_model.model.layers[0].feed_forward
                        torch.testing.assert_close(mine(x), theirs(x), rtol=1e-5, atol=1e-5)
                        a = time_layer(mine, x, local.stats, args.runs)
                        b = time_layer(theirs, x, remote.stats, args.runs)
                    ratio = b["total_s"] / a["total_s"]
                    trunk = b["total_s"] - b["serialize_s"] - b["wait_s"] - b["deserialize_s"]
                    wire = b["wait_s"] - b["compute_s"]
                    ms = [x * 1e3 for x in (trunk, b["serialize_s"], wire, b["compute_s"], b["deserialize_s"])]
                    cells = [f"{a['total_s'] * 1e3:.1f}", f"{b['total_s'] * 1e3:.1f}", f"{ratio:.2f}"]
                    cells += [f"{m:.1f}" for m in ms]
                    print(f"| {shards} | {tokens} | " + " | ".join(cells) + " |", flush=True)
                    if shards == 2 and tokens == 1024:
                        target = ratio
                remote.close()
    if target is not None:
        verdict = "met" if target <= 1.25 else "MISSED"
        print(f"\ntarget gRPC <= 1.25x in-process at T=1024, 2 shards: {target:.2f}x ({verdict})")


if __name__ == "__main__":
    main()
