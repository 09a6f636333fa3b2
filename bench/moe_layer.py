"""One MoE layer: Herd's sparse route -> permute -> experts -> combine against transformers' dense MoE.

Baseline: transformers 5.24 `Llama4TextMoe`, which runs every token through every expert (scaled by a
zero score where not chosen). Herd computes only the chosen experts. Both include the router and the
shared expert. Reports medians (torch.utils.benchmark, blocked_autorange) and their ratio.

    .venv/bin/python bench/moe_layer.py [--hidden 512] [--inter 1024] [--tokens 1 16 128 512] [--experts 16 128]
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch.utils import benchmark
from transformers import Llama4TextConfig
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

from herd.model.config import ModelConfig
from herd.model.moe import MoE


def build(hidden: int, inter: int, experts: int) -> tuple[Llama4TextMoe, MoE]:
    hf_config = Llama4TextConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                                 num_experts_per_tok=1)
    reference = Llama4TextMoe(hf_config).eval()
    with torch.no_grad():  # a bare Llama4TextMoe starts with zero gate_up_proj; fill every weight
        for p in reference.parameters():
            p.normal_(0, p.shape[-2] ** -0.5 if p.dim() == 3 else p.shape[-1] ** -0.5)
    raw = {"model_type": "llama4_text", "vocab_size": 8, "hidden_size": hidden, "intermediate_size": inter,
           "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8,
           "num_local_experts": experts}
    ours = MoE(ModelConfig.from_hf(raw).text, 0, range(experts)).eval()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def median_ms(fn, x: torch.Tensor) -> float:
    timer = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x})
    return timer.blocked_autorange(min_run_time=1.0).median * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=1024)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512])
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 128])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# MoE layer, H={args.hidden} I={args.inter} top-1, float32, CPU ({platform.processor() or 'cpu'}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    print("| experts | tokens | transformers dense (ms) | herd sparse (ms) | speed-up | rel. error |")
    print("|---:|---:|---:|---:|---:|---:|")
    for experts in args.experts:
        reference, ours = build(args.hidden, args.inter, experts)
        for tokens in args.tokens:
            x = torch.randn(tokens, args.hidden)
            with torch.inference_mode():
                expected, got = reference(x)[0], ours(x)
                error = float((got - expected).norm() / expected.norm())
                dense = median_ms(lambda v, ref=reference: ref(v)[0], x)
                sparse = median_ms(ours, x)
            print(f"| {experts} | {tokens} | {dense:.3f} | {sparse:.3f} | {dense / sparse:.1f}x | {error:.1e} |")


if __name__ == "__main__":
    main()
