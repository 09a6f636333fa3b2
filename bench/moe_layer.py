"""One Llama 4 MoE layer (router + routed experts + shared expert), three ways, same weights and inputs.

- herd: `herd.model.moe.MoE`, i.e. route -> permute -> experts -> combine through `herd.kernels`.
- transformers: 5.24's `Llama4TextMoe`, which runs every token through every expert (unchosen ones
  scaled by zero): the baseline a naive port would ship.
- ideal: only the dense GEMMs top-1 routing needs, on rows already grouped by expert (each expert's
  rows x its gate_up and down, plus the shared expert's three projections), timed with torch on the
  same machine; the faster of per-expert matmuls and one torch._grouped_mm per projection.

Targets (issue "MoE dispatch kernels"): herd >= 0.8 of the ideal's speed at T >= 512, and >= 8x
faster than transformers at E=16, T >= 1024. Times are medians; ratios are what to read.

    .venv/bin/python bench/moe_layer.py [--hidden 1024] [--inter 2048] [--experts 16 128]
                                        [--tokens 64 256 512 1024 2048 4096] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Llama4TextConfig
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common from a checkout

from bench.common import interleaved_medians, median_seconds, parse_args_with_smoke
from herd import kernels
from herd.model.config import ModelConfig
from herd.model.moe import MoE

DENSE_ROWS_LIMIT = 16 * 4096  # transformers' dense MoE multiplies E*T rows: skip it beyond this


def build(hidden: int, inter: int, experts: int) -> tuple[Llama4TextMoe, MoE]:
    """The transformers layer with every weight filled (a bare one has zero gate_up), and Herd's copy."""
    config = Llama4TextConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                              num_experts_per_tok=1)
    reference = Llama4TextMoe(config).eval().requires_grad_(False)
    for p in reference.parameters():
        fan_in = p.shape[-2] if p.dim() == 3 else p.shape[-1]
        p.normal_(0, fan_in**-0.5)
    raw = {"model_type": "llama4_text", "vocab_size": 8, "hidden_size": hidden, "intermediate_size": inter,
           "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8,
           "num_local_experts": experts}
    herd_layer = MoE(ModelConfig.from_hf(raw).text, 0, range(experts)).eval().requires_grad_(False)
    herd_layer.load_state_dict(reference.state_dict())
    return reference, herd_layer


def ideal_gemms(layer: MoE, x: torch.Tensor) -> Callable[[], None]:
    """The GEMMs alone, on rows grouped beforehand: the floor any top-1 implementation pays."""
    ids, scores = kernels.route(layer.router(x), 1)
    rows, permutation = kernels.permute(x, ids, scores, layer.num_experts)
    bounds = permutation.expert_offsets.tolist()
    ends = permutation.expert_offsets[1:].to(torch.int32)
    gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
    inter = down.shape[1]
    act = torch.randn(rows.shape[0], inter)
    shared = layer.shared_expert
    shared_act = torch.randn(x.shape[0], shared.gate_proj.out_features)

    def shared_gemms() -> None:
        torch.mm(x, shared.gate_proj.weight.t())
        torch.mm(x, shared.up_proj.weight.t())
        torch.mm(shared_act, shared.down_proj.weight.t())

    def looped() -> None:
        for e in range(len(bounds) - 1):
            if bounds[e + 1] > bounds[e]:
                torch.mm(rows[bounds[e] : bounds[e + 1]], gate_up[e])
                torch.mm(act[bounds[e] : bounds[e + 1]], down[e])
        shared_gemms()

    def grouped() -> None:
        torch._grouped_mm(rows, gate_up, offs=ends)
        torch._grouped_mm(act, down, offs=ends)
        shared_gemms()

    return min((looped, grouped), key=lambda fn: median_seconds(fn, budget_s=0.5))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 512, 1024, 2048, 4096])
    args = parse_args_with_smoke(parser, argv, hidden=64, inter=128, experts=[4, 8], tokens=[16])
    torch.manual_seed(0)
    print(f"MoE layer, H={args.hidden} I={args.inter} top-1 + shared expert, float32, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| E | T | ideal GEMMs (ms) | herd (ms) | transformers (ms) | herd / ideal speed "
          "| herd vs transformers | rel. err |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    misses = []
    with torch.inference_mode():
        for experts in args.experts:
            reference, layer = build(args.hidden, args.inter, experts)
            for tokens in args.tokens:
                x = torch.randn(tokens, args.hidden)
                timed = [ideal_gemms(layer, x), lambda layer=layer, x=x: layer(x)]
                runs_dense = experts * tokens <= DENSE_ROWS_LIMIT
                if runs_dense:
                    timed.append(lambda ref=reference, x=x: ref(x))
                ideal, ours, *rest = interleaved_medians(timed)
                dense = rest[0] if rest else None
                error = float("nan")
                if runs_dense:
                    expected = reference(x)[0]
                    error = float((layer(x) - expected).norm() / expected.norm())
                speed = ideal / ours
                row = f"| {experts} | {tokens} | {ideal * 1e3:.1f} | {ours * 1e3:.1f} | "
                row += f"{dense * 1e3:.1f} | " if dense else "skipped | "
                row += f"{speed:.2f} | " + (f"{dense / ours:.1f}x" if dense else "-") + f" | {error:.1e} |"
                print(row, flush=True)
                if tokens >= 512 and speed < 0.8:
                    misses.append(f"E={experts} T={tokens}: herd at {speed:.2f} of the ideal's speed (< 0.8)")
                if experts == 16 and tokens >= 1024 and dense and dense / ours < 8:
                    misses.append(f"E=16 T={tokens}: {dense / ours:.1f}x faster than transformers (< 8x)")
    print("\ntargets: " + ("all met" if not misses else "MISSED\n  " + "\n  ".join(misses)))


if __name__ == "__main__":
    main()
