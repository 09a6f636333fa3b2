"""Routed experts with int4 and FP8 weights on the CPU, beside the float experts they replace, same inputs.

- float32 / bfloat16: `herd.kernels.experts` on float weights (torch._grouped_mm): the baseline.
- int4: dequantise each expert that has rows into the activations' dtype, then matmul (W4A16).
- fp8: per-token activation rounding to e4m3 and dequantised weights, emulated in float32 (W8A8; the
  CPU has no FP8 GEMM).
The quantised paths read 4x / 2x fewer weight bytes than bf16 but spend compute unpacking them; on a
CPU that is the price of holding a model that would not fit otherwise. Rows are top-1 spread evenly
over the experts. Times are medians of repeated runs; the ratios are what to read.

    .venv/bin/python bench/quantized_experts.py [--hidden 1024] [--inter 512] [--experts 16]
                                                [--tokens 1 16 128 512] [--smoke]

`--smoke`: the smallest run of the whole script (two int4 groups, few rows, one repeat), for the tests.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from herd import kernels


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


SMOKE = {"hidden": 256, "inter": 64, "experts": 4, "tokens": [1, 8], "repeats": 1}
"""--smoke's sizes: H of two int4 groups, and more experts than the smaller batch has rows."""


def main(argv: list[str] | None = None) -> None:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help=f"the smallest run of the whole script: {SMOKE}")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    torch.manual_seed(0)
    h, i, e = args.hidden, args.inter, args.experts
    gate_up, down = torch.randn(e, h, 2 * i) / h**0.5, torch.randn(e, i, h) / i**0.5
    weights: dict[str, tuple[torch.Tensor | kernels.QuantizedTensor, torch.Tensor | kernels.QuantizedTensor,
                             torch.dtype]] = {
        "float32": (gate_up, down, torch.float32),
        "bfloat16": (gate_up.bfloat16(), down.bfloat16(), torch.bfloat16),
        "int4 (bf16 rows)": (kernels.quantize(gate_up, "int4"), kernels.quantize(down, "int4"), torch.bfloat16),
        "fp8 (bf16 rows)": (kernels.quantize(gate_up, "fp8"), kernels.quantize(down, "fp8"), torch.bfloat16),
    }
    print(f"# quantised experts on the CPU ({torch.get_num_threads()} threads), H={h} I={i} E={e}, top-1\n")
    print("| weights | weight MiB | " + " | ".join(f"T={t} ms" for t in args.tokens) + " | "
          + " | ".join(f"T={t} vs bf16" for t in args.tokens) + " |")
    print("|---|---:|" + "---:|" * (2 * len(args.tokens)))
    baseline: dict[int, float] = {}
    for name, (w_gate_up, w_down, dtype) in weights.items():
        cells: list[float] = []
        for t in args.tokens:
            rows = torch.randn(t, h).to(dtype)
            counts = torch.bincount(torch.arange(t) % e, minlength=e)
            offsets = torch.zeros(e + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(counts, 0)
            cells.append(median_ms(functools.partial(kernels.experts, rows, offsets, w_gate_up, w_down), args.repeats))
        if name == "bfloat16":
            baseline = dict(zip(args.tokens, cells, strict=True))
        mib = (w_gate_up.nbytes + w_down.nbytes) / 2**20
        ratios = [f"{baseline[t] / c:.2f}x" if baseline else "-" for t, c in zip(args.tokens, cells, strict=True)]
        print(f"| {name} | {mib:.1f} | " + " | ".join(f"{c:.2f}" for c in cells) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
