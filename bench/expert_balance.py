"""Live expert balancing: the slowest shard's rows per MoE layer step, static ranges against a rebalanced placement.

A layer step waits for its slowest expert shard, so its critical path is the most rows any shard computes.
Routing is skewed: each layer draws T tokens x top-k experts from its own distribution over E experts
("zipf": weight 1/rank^s over a random order of the experts; "hot": a few experts with `--hot-weight` times
the weight of the rest). The placement is one for all layers (as herd's dispatcher uses it), so with several
layers it balances their sum; rebalance judges the gain layer by layer (the mean of each layer's slowest
shard), so it declines a plan that would leave the layers worse off (try --layers 4 --top-k 2).

For each E, shard count and slots per shard (ceil(E/S) + spare):
- static: herd.workers.placement.place_experts, today's contiguous ranges;
- balanced: herd.workers.balance.rebalance, planned from the counts of `--warmup-steps` steps (static when
  rebalance declines), then measured on `--steps` later steps drawn fresh from the same distributions.
Rows per shard are herd.workers.balance.shard_rows, the dispatcher's exact split of a replicated expert.
Cells are medians over measured (step, layer) pairs of the max over shards; ideal is T*k / S. Nothing is
timed: this measures the placement, not the transport.

    .venv/bin/python bench/expert_balance.py [--experts 16 128] [--shards 2 4 8] [--spare-slots 1]
        [--tokens 4096] [--top-k 1] [--layers 1] [--warmup-steps 20] [--steps 50] [--loads zipf hot]
        [--min-gain 0.1] [--seed 0] [--smoke]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common from a checkout

from bench.common import parse_args_with_smoke, print_command
from herd.workers.balance import rebalance, shard_rows, transfers
from herd.workers.placement import Placement, place_experts

HEADER = ("| load | experts | shards | slots | static max rows | balanced max rows | ideal | balanced / static | "
          "copies moved |")


def routing_weights(kind: str, experts: int, rng: np.random.Generator, *, zipf_s: float, hot: int,
                    hot_weight: float) -> np.ndarray:
    """[E] routing probabilities of one layer, with its hot experts at random ids."""
    if kind == "zipf":
        weights = 1.0 / np.arange(1, experts + 1) ** zipf_s
    elif kind == "hot":
        weights = np.ones(experts)
        weights[: min(hot, experts)] = hot_weight
    else:
        raise ValueError(f"unknown load {kind!r}: zipf or hot")
    return rng.permutation(weights) / weights.sum()


def draw(weights: np.ndarray, tokens: int, top_k: int, rng: np.random.Generator) -> list[int]:
    """Rows routed to each expert when `tokens` tokens each pick top_k distinct experts by the weights."""
    if top_k == 1:
        return rng.multinomial(tokens, weights).tolist()
    keys = np.log(weights) + rng.gumbel(size=(tokens, len(weights)))  # [T, E]; top-k of these samples w/o replacement
    chosen = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
    return np.bincount(chosen.ravel(), minlength=len(weights)).tolist()


def max_rows(placement: Placement, steps: list[list[list[int]]]) -> float:
    """Median over (step, layer) of the most rows any shard computes."""
    return statistics.median(max(shard_rows(placement, rows)) for step in steps for rows in step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--spare-slots", type=int, nargs="+", default=[1],
                        help="slots per shard beyond ceil(E/S), for replicas")
    parser.add_argument("--tokens", type=int, default=4096, help="T, tokens per layer step")
    parser.add_argument("--top-k", type=int, default=1, help="experts per token (Llama 4: 1)")
    parser.add_argument("--layers", type=int, default=1, help="MoE layers, each with its own routing distribution")
    parser.add_argument("--warmup-steps", type=int, default=20, help="steps whose counts the plan is made from")
    parser.add_argument("--steps", type=int, default=50, help="later steps the placements are measured on")
    parser.add_argument("--loads", nargs="+", default=["zipf", "hot"], choices=["zipf", "hot"])
    parser.add_argument("--zipf-s", type=float, default=1.0, help="zipf exponent")
    parser.add_argument("--hot", type=int, default=4, help="hot experts in the 'hot' load")
    parser.add_argument("--hot-weight", type=float, default=8.0, help="a hot expert's weight over a cold one's")
    parser.add_argument("--min-gain", type=float, default=0.1,
                        help="rebalance's threshold: the fraction the slowest shard's expected rows must drop")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args_with_smoke(parser, argv, experts=[16], shards=[2, 4], tokens=256, warmup_steps=2, steps=3)
    print_command("expert_balance.py")
    print(f"T={args.tokens} top-{args.top_k}, {args.layers} layer(s), plan from {args.warmup_steps} steps, "
          f"measured on {args.steps}; zipf s={args.zipf_s}, hot: {args.hot} experts x{args.hot_weight}; "
          f"min gain {args.min_gain}, seed {args.seed}")
    print(HEADER)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(args.seed)
    for kind in args.loads:
        for experts in args.experts:
            layers = [routing_weights(kind, experts, rng, zipf_s=args.zipf_s, hot=args.hot,
                                      hot_weight=args.hot_weight) for _ in range(args.layers)]
            warmup = [[draw(w, args.tokens, args.top_k, rng) for w in layers] for _ in range(args.warmup_steps)]
            later = [[draw(w, args.tokens, args.top_k, rng) for w in layers] for _ in range(args.steps)]
            per_layer = [[float(sum(step[layer][e] for step in warmup)) for e in range(experts)]
                         for layer in range(args.layers)]
            load = [sum(layer[e] for layer in per_layer) for e in range(experts)]
            for shards in (s for s in args.shards if s <= experts):
                static = place_experts(experts, shards)
                for spare in args.spare_slots:
                    slots = math.ceil(experts / shards) + spare
                    balanced = rebalance(load, static, slots_per_shard=slots, min_gain=args.min_gain,
                                         layer_loads=per_layer) or static
                    before, after = max_rows(static, later), max_rows(balanced, later)
                    ideal = args.tokens * args.top_k / shards
                    print(f"| {kind} | {experts} | {shards} | {slots} | {before:.0f} | {after:.0f} | {ideal:.0f} | "
                          f"{after / before:.2f} | {len(transfers(static, balanced))} |", flush=True)


if __name__ == "__main__":
    main()
