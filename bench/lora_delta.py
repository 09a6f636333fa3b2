"""Per-row LoRA deltas for a batch mixing adapters: gathered per row (BGMV-style) against grouped by adapter
(SGMV-style), with the base projection the delta rides on for scale.

- gathered: herd.kernels.lora.lora_delta, each row gathers its own A and B (what the model runs).
- grouped: herd.kernels.lora.lora_delta_grouped, one pair of matmuls per adapter present (the host reads
  which adapters are present).
- masked: herd.kernels.lora.lora_delta_masked, every entry's A at once, each row keeping its own columns.
- base: x @ W.T for the same layer, the projection without any adapter.

Rows are spread evenly over the slots (plus some on the base model). Times are medians; read the ratios.

    .venv/bin/python bench/lora_delta.py [--features 2048] [--rank 16] [--slots 1 4 8]
                                         [--tokens 1 8 32 128 512] [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common from a checkout

from bench.common import interleaved_medians, parse_args_with_smoke
from herd.kernels.lora import LoRAStack, lora_delta, lora_delta_grouped, lora_delta_masked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=2048, help="Din = Dout of the adapted projection")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    args = parse_args_with_smoke(parser, argv, features=64, rank=4, slots=[2], tokens=[4])
    generator = torch.Generator().manual_seed(0)
    d = args.features
    weight = torch.randn(d, d, generator=generator) * d**-0.5
    print(f"features {d}, rank {args.rank}, float32, {torch.get_num_threads()} threads; medians in ms\n")
    print("| slots | tokens | base (ms) | gathered (ms) | grouped (ms) | masked (ms) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for slots in args.slots:
        stack = LoRAStack(a=torch.randn(slots + 1, args.rank, d, generator=generator),
                          b=torch.randn(slots + 1, d, args.rank, generator=generator),
                          scaling=torch.ones(slots + 1))
        for tokens in args.tokens:
            x = torch.randn(tokens, d, generator=generator)
            index = torch.arange(tokens) % (slots + 1)  # entry 0: the base model
            runs = [functools.partial(torch.matmul, x, weight.T)]
            runs += [functools.partial(delta, x, stack, index)
                     for delta in (lora_delta, lora_delta_grouped, lora_delta_masked)]
            times = interleaved_medians(runs, budget_s=1.0)
            base, gathered, grouped, masked = (t * 1e3 for t in times)
            print(f"| {slots} | {tokens} | {base:.3f} | {gathered:.3f} | {grouped:.3f} | {masked:.3f} |")


if __name__ == "__main__":
    main()
