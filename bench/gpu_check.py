"""`make gpu-check`: every CuPy MoE kernel, and a whole MoE layer, against torch on a CUDA GPU, then timed.

Runs with PyTorch and CuPy alone (`PYTHONPATH=. python3 bench/gpu_check.py`): the GPU machines have
nothing else installed. `--smoke` (or `--cpu-dry-run`) walks the same script on the CPU with small shapes
and the torch backend standing in for CuPy's, so the script itself is tested where there is no GPU; its
numbers mean nothing. Checks first, with outputs poisoned (NaN / -1) so an element a kernel forgets
to write shows; then CUDA-event timings (median of many runs after warm-up) beside the torch backend on
the same GPU and the measured device-to-device copy bandwidth, the ceiling for these memory-bound
kernels. Then one Scout-dimension and one Maverick-dimension MoE expert layer, random weights made on the
GPU in bf16, FP8 and int4 (quantised one expert at a time, so no full-layer float copy is ever held),
checked against the bf16 weights and against their own dequantised weights, and timed against the
memory-bandwidth floor (the weight bytes a token batch reads over the copy bandwidth); a format that does
not fit the GPU's free memory is reported as skipped. Last, a decode-sized MoE layer as a CUDA graph would hold
it (herd.engine.decode_graphs; the engine itself needs packages the GPU machines lack): no host syncs, captured,
and replayed on new tokens equal to the eager layer, then timed against it. Exits 1 when a check fails, 2 when
there is no GPU or no CuPy (nothing was checked).

Legend: T tokens, E experts, k experts per token, H hidden, I expert intermediate, R = T*k rows.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from herd.kernels import QuantizedTensor
from herd.kernels.backend import Backend, backend_for

Weight = torch.Tensor | QuantizedTensor

# (T, E, k, H): T=1, odd T, k > 1, more experts than rows, Scout- and Maverick-like widths.
KERNEL_CASES = [(1, 16, 1, 5120), (37, 16, 2, 1024), (3, 6, 4, 64), (511, 128, 2, 5120),
                (4096, 16, 1, 5120), (4096, 128, 1, 5120)]
LAYER_CASES = [(4096, 16, 5120, 1024), (4096, 128, 5120, 1024)]  # (T, E, H, I), top-1
DRY_KERNEL_CASES = [(1, 16, 1, 64), (37, 16, 2, 32), (3, 6, 4, 64)]
DRY_LAYER_CASES = [(64, 16, 64, 32)]
# (T, E, H, I), top-1, bf16: decode batches as a captured decode step holds them (herd.engine.decode_graphs).
GRAPH_CASES = [(1, 16, 5120, 1024), (8, 16, 5120, 1024), (64, 128, 5120, 1024), (256, 128, 5120, 1024)]
DRY_GRAPH_CASES = [(1, 16, 64, 32), (8, 16, 64, 32)]
QUANT_LAYERS = [("Scout", 5120, 8192, 16), ("Maverick", 5120, 8192, 128)]  # (name, H, I, E), top-1
DRY_QUANT_LAYERS = [("Scout-like", 256, 128, 4), ("Maverick-like", 256, 128, 8)]
QUANT_TOKENS = (1, 16, 128, 2048)  # T of the timed batches; top-1, so R = T rows over min(T, E) experts
DRY_QUANT_TOKENS = (1, 16, 128)
FORMATS = ("bf16", "fp8", "int4")  # bf16 first: the others' speed-ups are against it
# Relative error of the layer's output against the bf16 weights: the quantisation error of random Gaussian
# weights through two GEMMs, measured on the CPU at the dry run's and at Scout's dimensions alike: int4 0.21,
# FP8 0.066 (with its activation rounding), bf16 4e-3 (its output rounding). Nibbles swapped give 1.4, every
# weight 10% off 0.46 (int4) and 0.36 (FP8). Against the format's own weights dequantised by torch (not by the
# kernel under test) only accumulation order should differ: <5e-3; int4 groups read with a neighbour's
# scales give 0.28 there (0.35 against bf16, too close to that limit to rely on).
VS_BF16_LIMIT = {"bf16": 1e-2, "fp8": 0.1, "int4": 0.3}
VS_DEQUANTISED_LIMIT = 2e-2
CHECK_ROWS = (1, 16, 3, 32)  # rows of the check batch's touched experts, in turn
CHECK_EXPERTS = 8  # experts the check batch touches (spread from the first to the last)
EXPERT_SEED = 1000
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DEVICE = "cuda"


def main(argv: list[str]) -> int:
    if argv in (["--smoke"], ["--cpu-dry-run"]):
        return dry_run()
    if argv:
        print(f"usage: gpu_check.py [--smoke | --cpu-dry-run], got {argv}")
        return 2
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing was checked")
        return 2
    try:
        import cupy
    except ImportError as err:
        print(f"gpu-check: CuPy is not importable ({err}); nothing was checked")
        return 2
    backend = backend_for(torch.device(DEVICE))  # the object herd.kernels runs CUDA tensors with
    if backend.name != "cupy":
        print(f"gpu-check: herd.kernels chose the {backend.name} backend for CUDA (see the log); nothing was checked")
        return 2
    print(f"# gpu-check on {torch.cuda.get_device_name()}, torch {torch.__version__}, CuPy {cupy.__version__}")
    return run(backend, KERNEL_CASES, LAYER_CASES, QUANT_LAYERS, GRAPH_CASES)


def dry_run() -> int:
    """The whole script on the CPU, the torch backend in CuPy's place: proves the script, not the kernels."""
    global DEVICE
    DEVICE = "cpu"
    print("# gpu-check DRY RUN on the CPU: torch backend standing in for CuPy; not a GPU result")
    return run(Backend(), DRY_KERNEL_CASES, DRY_LAYER_CASES, DRY_QUANT_LAYERS, DRY_GRAPH_CASES)


KernelCase = tuple[int, int, int, int]
QuantLayer = tuple[str, int, int, int]


def run(backend: Backend, kernel_cases: list[KernelCase], layer_cases: list[KernelCase],
        quant_layers: list[QuantLayer], graph_cases: list[KernelCase]) -> int:
    ceiling = copy_bandwidth_gbs()
    print(f"device-to-device copy: {ceiling:.0f} GB/s (the ceiling for the memory-bound kernels)\n")
    failures: list[str] = []
    table: list[str] = []
    for dtype in (torch.float32, torch.bfloat16):
        for case in kernel_cases:
            failures += check_kernels(case, dtype, backend)
            table += time_kernels(case, dtype, backend, ceiling)
        for case in layer_cases:
            failures += check_layer(case, dtype)
            table += time_layer(case, dtype)
    print("| kernel | dtype | shape | CuPy (us) | torch backend (us) | speed-up | GB/s | of copy BW |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(table))
    failures += quantized_section(quant_layers, QUANT_TOKENS if DEVICE == "cuda" else DRY_QUANT_TOKENS, ceiling)
    failures += graph_section(backend, graph_cases)
    print("\nchecks: " + ("all passed" if not failures else f"{len(failures)} FAILED\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


def inputs(case: tuple[int, int, int, int], dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    tokens, experts, k, hidden = case
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    # Distinct, bf16-exact logits per row: top-k has no ties, so both backends must pick the same ids.
    ranks = torch.argsort(torch.rand(tokens, experts, generator=g, device=DEVICE), dim=1).float()
    return {
        "x": torch.randn(tokens, hidden, generator=g, device=DEVICE).to(dtype),
        "logits": ((ranks - experts / 2) / 16).to(dtype),
        "out_rows": torch.randn(tokens * k, hidden, generator=g, device=DEVICE).to(dtype),
    }


def check_kernels(case: tuple[int, int, int, int], dtype: torch.dtype, backend: Backend) -> list[str]:
    from herd.kernels import torch_moe

    tokens, experts, k, _ = case
    name = f"{dtype} T={tokens} E={experts} k={k}"
    data = inputs(case, dtype, seed=tokens)
    order = torch.randperm(experts, device=DEVICE)
    with backend.poisoned():
        ids, scores = backend.route(data["logits"], k)
        rows, perm = backend.permute(data["x"], ids, scores, order)
        combined = backend.combine(data["out_rows"], perm, tokens)
    want_ids, want_scores = torch_moe.route(data["logits"], k)
    want_rows, want_perm = torch_moe.permute(data["x"], want_ids, want_scores, order)
    want_combined = torch_moe.combine(data["out_rows"], want_perm, tokens)
    failures = []
    if not torch.equal(ids, want_ids):
        failures.append(f"route ids differ ({name})")
    if rel_error(scores, want_scores) > TOLERANCE[dtype]:
        failures.append(f"route scores: rel err {rel_error(scores, want_scores):.1e} ({name})")
    for field in ("expert_offsets", "row_source", "source_row"):
        if not torch.equal(getattr(perm, field).long(), getattr(want_perm, field).long()):
            failures.append(f"permute {field} differs ({name})")
    if rel_error(rows, want_rows) > TOLERANCE[dtype] or not torch.isfinite(rows).all():
        failures.append(f"permute rows: rel err {rel_error(rows, want_rows):.1e} ({name})")
    if rel_error(combined, want_combined) > TOLERANCE[dtype] or not torch.isfinite(combined).all():
        failures.append(f"combine: rel err {rel_error(combined, want_combined):.1e} ({name})")
    return failures


def time_kernels(case: tuple[int, int, int, int], dtype: torch.dtype, backend: Backend, ceiling: float) -> list[str]:
    from herd.kernels import torch_moe

    tokens, experts, k, hidden = case
    data = inputs(case, dtype)
    order = torch.arange(experts, device=DEVICE)
    ids, scores = backend.route(data["logits"], k)
    _, perm = backend.permute(data["x"], ids, scores, order)
    _, torch_perm = torch_moe.permute(data["x"], ids, scores, order)
    size = data["x"].element_size()
    rows = tokens * k
    kernels: list[tuple[str, Callable[[], object], Callable[[], object], int]] = [
        ("route (top-k+sigmoid)", lambda: backend.route(data["logits"], k), lambda: torch_moe.route(data["logits"], k),
         tokens * experts * size + rows * (4 + size)),
        ("permute (+scale)", lambda: backend.permute(data["x"], ids, scores, order),
         lambda: torch_moe.permute(data["x"], ids, scores, order), 2 * rows * hidden * size),
        ("combine", lambda: backend.combine(data["out_rows"], perm, tokens),
         lambda: torch_moe.combine(data["out_rows"], torch_perm, tokens), (rows + tokens) * hidden * size),
    ]
    lines = []
    for label, ours, theirs, nbytes in kernels:
        ours_us, theirs_us = cuda_time_us(ours), cuda_time_us(theirs)
        gbs = nbytes / ours_us / 1e3
        lines.append(f"| {label} | {_short(dtype)} | T={tokens} E={experts} k={k} H={hidden} | {ours_us:.1f} | "
                     f"{theirs_us:.1f} | {theirs_us / ours_us:.1f}x | {gbs:.0f} | {gbs / ceiling:.0%} |")
    return lines


def layer_weights(case: tuple[int, int, int, int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tokens, experts, hidden, inter = case
    g = torch.Generator(device=DEVICE).manual_seed(7)

    def randn(*shape: int, fan_in: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=DEVICE).mul_(fan_in**-0.5).to(dtype)

    return {
        "x": torch.randn(tokens, hidden, generator=g, device=DEVICE).to(dtype),
        "router": randn(experts, hidden, fan_in=hidden),
        "gate_up": randn(experts, hidden, 2 * inter, fan_in=hidden),
        "down": randn(experts, inter, hidden, fan_in=inter),
        "shared_gate": randn(inter, hidden, fan_in=hidden),
        "shared_up": randn(inter, hidden, fan_in=hidden),
        "shared_down": randn(hidden, inter, fan_in=inter),
    }


def moe_layer(w: dict[str, torch.Tensor], *, backend: str) -> torch.Tensor:
    """Router -> route -> permute -> experts -> combine, plus the shared expert.

    backend "herd": the public herd.kernels API (CuPy kernels on CUDA); "torch": the torch backend's
    functions on the same GPU, for comparison.
    """
    from herd.kernels import api, torch_moe

    x, experts = w["x"], w["router"].shape[0]
    logits = x @ w["router"].t()
    if backend == "herd":
        ids, scores = api.route(logits, 1)
        rows, perm = api.permute(x, ids, scores, experts)
        out_rows = api.experts(rows, perm.expert_offsets, w["gate_up"], w["down"])
        routed = api.combine(out_rows, perm, x.shape[0])
    else:
        ids, scores = torch_moe.route(logits, 1)
        rows, perm = torch_moe.permute(x, ids, scores, torch.arange(experts, device=x.device))
        out_rows = torch_moe.experts(rows, perm.expert_offsets, w["gate_up"], w["down"])
        routed = torch_moe.combine(out_rows, perm, x.shape[0])
    return shared_expert(w) + routed


def shared_expert(w: dict[str, torch.Tensor]) -> torch.Tensor:
    x = w["x"]
    return (F.silu(x @ w["shared_gate"].t()) * (x @ w["shared_up"].t())) @ w["shared_down"].t()


def check_layer(case: tuple[int, int, int, int], dtype: torch.dtype) -> list[str]:
    from herd.kernels.reference import moe_reference

    w = layer_weights(case, dtype)
    got = moe_layer(w, backend="herd")
    f = {name: t.float() for name, t in w.items()}
    logits = w["x"] @ w["router"].t()  # the same rounded logits herd routes on
    expected = shared_expert(f) + moe_reference(f["x"], logits.float(), 1, f["gate_up"], f["down"])
    error = rel_error(got, expected)
    label = f"MoE layer {dtype} T={case[0]} E={case[1]}"
    return [] if error < TOLERANCE[dtype] else [f"{label}: rel err {error:.1e} against the float32 reference"]


def time_layer(case: tuple[int, int, int, int], dtype: torch.dtype) -> list[str]:
    w = layer_weights(case, dtype)
    ours = cuda_time_us(lambda: moe_layer(w, backend="herd"), iters=20)
    theirs = cuda_time_us(lambda: moe_layer(w, backend="torch"), iters=20)
    tokens, experts, hidden, inter = case
    return [f"| MoE layer (router+experts+shared) | {_short(dtype)} | T={tokens} E={experts} H={hidden} I={inter} | "
            f"{ours:.1f} | {theirs:.1f} | {theirs / ours:.1f}x | - | - |"]


def moe_stages(w: dict[str, torch.Tensor], backend: Backend) -> torch.Tensor:
    """The MoE layer through the backend's stages with no value checks, as the model's own MoE layer runs them in
    a decode step (herd.kernels.api's checks read values on the host, which a CUDA graph cannot hold)."""
    x, experts = w["x"], w["router"].shape[0]
    ids, scores = backend.route(x @ w["router"].t(), 1)
    rows, perm = backend.permute(x, ids, scores, torch.arange(experts, device=x.device))
    out_rows = backend.experts(rows, perm.expert_offsets, w["gate_up"], w["down"])
    return shared_expert(w) + backend.combine(out_rows, perm, x.shape[0])


class ReplayStandIn:
    """The dry run's CUDAGraph: replay re-runs the layer into the output tensor (nothing is captured on a CPU)."""

    def __init__(self, forward: Callable[[], torch.Tensor], out: torch.Tensor) -> None:
        self.forward, self.out = forward, out

    def replay(self) -> None:
        self.out.copy_(self.forward())


def capture_graph(forward: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph | ReplayStandIn, torch.Tensor]:
    """Warm up on a side stream, then capture: (the graph, its output), as herd.engine.decode_graphs does."""
    if DEVICE != "cuda":
        out = forward()
        return ReplayStandIn(forward, out), out
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # bare in torch
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    return graph, out


def graph_section(backend: Backend, cases: list[KernelCase]) -> list[str]:
    """The MoE layer of a decode step as a CUDA graph: is it free of host syncs (herd.kernels.host_syncs, after one
    warm-up call), does it capture (CuPy's kernels must launch on torch's current stream, the capturing one), and
    does a replay after new tokens are copied into the captured input equal the eager layer on those tokens? Then
    eager against replay, timed. Prints a table; returns failures (syncs count as failures on CUDA only: the dry
    run's torch backend is not the CUDA path)."""
    from herd.kernels.host_syncs import HostSyncGuard

    failures: list[str] = []
    lines: list[str] = []
    dtype = torch.bfloat16
    for case in cases:
        tokens, experts, hidden, inter = case
        label = f"T={tokens} E={experts} H={hidden} I={inter}"
        w = layer_weights(case, dtype)
        layer = functools.partial(moe_stages, w, backend)  # reads w["x"], the persistent input, on every call
        layer()  # first calls compile, probe grouped_mm and fill the allocator: not the steady state
        with HostSyncGuard() as guard:
            layer()
        if guard.count and DEVICE == "cuda":
            failures.append(f"graph {label}: {guard.count} host syncs in the layer, e.g. {guard.syncs[:2]}")
        try:
            graph, out = capture_graph(layer)
        except Exception as err:  # a failed capture is this check's finding, with its message
            failures.append(f"graph {label}: capture failed: {str(err).splitlines()[0][:200]}")
            lines.append(f"| {label} | {guard.count} | capture failed | - | - | - | - |")
            continue
        g = torch.Generator(device=DEVICE).manual_seed(tokens + 1)
        w["x"].copy_(torch.randn(tokens, hidden, generator=g, device=DEVICE).to(dtype))
        graph.replay()
        got = out.clone()
        want = layer()
        error = rel_error(got, want)
        if not error <= TOLERANCE[dtype]:
            failures.append(f"graph {label}: replay differs from the eager layer, rel err {error:.1e}")
        eager_us, replay_us = cuda_time_us(layer, iters=20), cuda_time_us(graph.replay, iters=20)
        lines.append(f"| {label} | {guard.count} | captured | {torch.equal(got, want)} | {error:.1e} | "
                     f"{eager_us:.1f} | {replay_us:.1f} |")
    print("\n## An MoE layer (bf16, top-1, + shared expert) captured as a decode step's CUDA graph\n")
    print("| layer | host syncs | capture | replay == eager | rel err | eager (us) | replay (us) |")
    print("|---|---:|---|---|---:|---:|---:|")
    print("\n".join(lines))
    return failures


# Quantised expert layers. A layer is (name, H, I, E); a format is bf16 or a herd.kernels.quantize scheme.


def quantized_section(layers: list[tuple[str, int, int, int]], token_batches: tuple[int, ...], ceiling: float
                      ) -> list[str]:
    """Each layer in each format, built, checked, timed and freed in turn; prints two tables, returns failures."""
    failures: list[str] = []
    checks: list[str] = []
    timings: list[str] = []
    for layer in layers:
        bf16_us: dict[int, float] = {}  # T -> the bf16 time, for the speed-ups
        for fmt in FORMATS:
            found, check_line, time_lines = layer_format(layer, fmt, token_batches, ceiling, bf16_us)
            failures += found
            checks.append(check_line)
            timings += time_lines
            if DEVICE == "cuda":
                torch.cuda.empty_cache()  # the format's weights are gone: give their memory back before the next
    print(f"\n## Quantised MoE expert layers (top-1, SwiGLU experts only; copy bandwidth {ceiling:.0f} GB/s)\n")
    print(f"{fp8_gemm()}; int4 on a GPU: up to 8 rows an expert dequantise inside the GEMM (CuPy), more dequantise "
          "each touched expert to bf16, then a bf16 GEMM (cuBLAS); on the CPU always the latter\n")
    print("| layer | format | weights (GB) | built (s) | rel err vs bf16 weights | limit "
          "| rel err vs own weights dequantised | limit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(checks))
    print("\nfloor = weight bytes of the experts the batch touches / copy bandwidth; floor/time: 100% is the floor\n")
    print("| layer | format | T | experts read | weights read (MB) | time (us) | floor (us) | floor/time "
          "| speed-up vs bf16 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(timings))
    return failures


def layer_format(
    layer: tuple[str, int, int, int], fmt: str, token_batches: tuple[int, ...], ceiling: float,
    bf16_us: dict[int, float],
) -> tuple[list[str], str, list[str]]:
    """One layer in one format: (failures, its check-table row, its timing-table rows).

    Skipped, not failed, when the format does not fit the GPU's free memory (or runs out of it anyway).
    """
    name, hidden, inter, experts = layer
    label = f"| {name} H={hidden} I={inter} E={experts} | {fmt} |"
    shortfall = memory_shortfall(layer, fmt)
    if not shortfall:
        try:
            start = time.perf_counter()
            gate_up, down = build_layer(layer, fmt)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            built_s = time.perf_counter() - start
            gigabytes = (gate_up.nbytes + down.nbytes) / 1e9
            vs_bf16, vs_own = check_format(layer, fmt, gate_up, down)
            time_lines = time_format(layer, fmt, gate_up, down, token_batches, ceiling, bf16_us)
        except torch.cuda.OutOfMemoryError as err:
            shortfall = f"out of memory ({str(err).splitlines()[0][:160]})"
    if shortfall:
        gigabytes = experts * expert_bytes(hidden, inter, fmt) / 1e9
        return ([], f"{label} {gigabytes:.2f} | skipped: {shortfall} | - | - | - | - |",
                [f"{label} - | - | - | skipped for memory | - | - | - |"])
    failures = []
    if not vs_bf16 <= VS_BF16_LIMIT[fmt]:  # written so that NaN fails
        failures.append(f"{name} {fmt}: rel err {vs_bf16:.2e} against the bf16 weights (limit {VS_BF16_LIMIT[fmt]})")
    if vs_own is not None and not vs_own <= VS_DEQUANTISED_LIMIT:
        failures.append(f"{name} {fmt}: rel err {vs_own:.2e} against its own weights dequantised by torch "
                        f"(limit {VS_DEQUANTISED_LIMIT})")
    own = "- | -" if vs_own is None else f"{vs_own:.2e} | {VS_DEQUANTISED_LIMIT}"
    check_line = f"{label} {gigabytes:.2f} | {built_s:.1f} | {vs_bf16:.2e} | {VS_BF16_LIMIT[fmt]} | {own} |"
    return failures, check_line, time_lines


def fp8_gemm() -> str:
    """How herd.kernels runs FP8 experts here (herd.kernels.schemes decides; this only names the case)."""
    if DEVICE != "cuda":
        return "FP8 emulated on the CPU (dequantised weights, e4m3-rounded activations)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) >= (8, 9):
        return (f"FP8 on sm_{major}{minor}: torch._scaled_mm with per-token and per-channel scales (emulated for a "
                "shape it refuses)")
    return f"FP8 on sm_{major}{minor}: no FP8 GEMM before sm_89, emulated (dequantised to bf16)"


def expert_bytes(hidden: int, inter: int, fmt: str) -> int:
    """Bytes of one expert's gate_up [H, 2I] and down [I, H] in `fmt`, values and scales."""
    weights = 3 * hidden * inter
    if fmt == "bf16":
        return 2 * weights
    if fmt == "fp8":  # e4m3 values, a float32 scale per output channel
        return weights + 4 * (2 * inter + hidden)
    from herd.kernels.int4 import GROUP

    groups = -(-hidden // GROUP) * 2 * inter + -(-inter // GROUP) * hidden  # int4: a bf16 scale per group of inputs
    return -(-hidden // 2) * 2 * inter + -(-inter // 2) * hidden + 2 * groups


def memory_shortfall(layer: tuple[str, int, int, int], fmt: str) -> str:
    """'' when the layer in `fmt` fits the GPU's free memory with room to build it, else why not, in numbers."""
    if DEVICE != "cuda":
        return ""
    _, hidden, inter, experts = layer
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    weights = experts * expert_bytes(hidden, inter, fmt)
    headroom = 8 * hidden * 2 * inter * 4 + (1 << 30)  # float32 temporaries of one expert's build and reference
    if weights + headroom <= free:
        return ""
    return (f"needs {weights / 1e9:.1f} GB of weights + {headroom / 1e9:.1f} GB to build them, "
            f"{free / 1e9:.1f} GB free of {total / 1e9:.1f} GB")


def expert_weights(expert: int, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert `expert`'s bf16 gate_up [H, 2I] and down [I, H], N(0, 1/fan_in), from its own seed: the same each call."""
    g = torch.Generator(device=DEVICE).manual_seed(EXPERT_SEED + expert)
    gate_up = torch.randn(hidden, 2 * inter, generator=g, device=DEVICE).mul_(hidden**-0.5).to(torch.bfloat16)
    down = torch.randn(inter, hidden, generator=g, device=DEVICE).mul_(inter**-0.5).to(torch.bfloat16)
    return gate_up, down


def build_layer(layer: tuple[str, int, int, int], fmt: str) -> tuple[Weight, Weight]:
    """gate_up [E, H, 2I] and down [E, I, H] in `fmt` (bf16 tensors or QuantizedTensors), made expert by expert.

    Each expert is generated and quantised alone, then copied into stacks allocated once: the memory held
    is the layer in `fmt` plus one expert's temporaries, never a float copy of the whole layer.
    """
    from herd.kernels import quantize

    _, hidden, inter, experts = layer
    stacks: list[Weight] = []
    for e in range(experts):
        floats = expert_weights(e, hidden, inter)
        pair: tuple[Weight, ...] = floats if fmt == "bf16" else tuple(quantize(w, fmt) for w in floats)
        if not stacks:
            for w in pair:
                if isinstance(w, QuantizedTensor):
                    stacks.append(QuantizedTensor(w.scheme, _empty_stack(w.values, experts),
                                                  _empty_stack(w.scales, experts), w.d_in, w.group))
                else:
                    stacks.append(_empty_stack(w, experts))
        for stack, w in zip(stacks, pair, strict=True):
            if isinstance(stack, QuantizedTensor) and isinstance(w, QuantizedTensor):
                stack.values[e].copy_(w.values)
                stack.scales[e].copy_(w.scales)
            elif isinstance(stack, torch.Tensor) and isinstance(w, torch.Tensor):
                stack[e].copy_(w)
    return stacks[0], stacks[1]


def _empty_stack(t: torch.Tensor, experts: int) -> torch.Tensor:
    """Uninitialised [E, *t.shape] in t's dtype, each slice laid out as t is (column-major for FP8 values)."""
    if t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous():
        return torch.empty((experts, t.shape[1], t.shape[0]), dtype=t.dtype, device=t.device).transpose(1, 2)
    return torch.empty((experts, *t.shape), dtype=t.dtype, device=t.device)


def check_batch(hidden: int, experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Rows [R, H] bf16 already grouped by expert, expert_offsets [E+1], and the experts they touch.

    Up to CHECK_EXPERTS experts spread from the first to the last get CHECK_ROWS rows each in turn (1 row,
    more than one, odd counts); the others none.
    """
    n = min(CHECK_EXPERTS, experts)
    touched = sorted({round(i * (experts - 1) / max(n - 1, 1)) for i in range(n)})
    counts = [0] * experts
    for i, e in enumerate(touched):
        counts[e] = CHECK_ROWS[i % len(CHECK_ROWS)]
    offsets = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int64, device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(3)
    rows = torch.randn(sum(counts), hidden, generator=g, device=DEVICE).to(torch.bfloat16)
    return rows, offsets, touched


def check_format(layer: tuple[str, int, int, int], fmt: str, gate_up: Weight, down: Weight
                 ) -> tuple[float, float | None]:
    """herd.kernels.experts on the check batch: relative errors against the bf16 weights (regenerated expert by
    expert) and against the layer's own weights dequantised by torch (None for bf16, where they are the same)."""
    from herd.kernels import experts as herd_experts

    _, hidden, inter, experts = layer
    rows, offsets, touched = check_batch(hidden, experts)
    got = herd_experts(rows, offsets, gate_up, down).float()
    want = torch.zeros_like(got)
    want_own = torch.zeros_like(got)
    bounds = offsets.tolist()
    for e in touched:
        x = rows[bounds[e]:bounds[e + 1]]
        bf16_gate_up, bf16_down = expert_weights(e, hidden, inter)
        want[bounds[e]:bounds[e + 1]] = expert_reference(x, bf16_gate_up.float(), bf16_down.float())
        if fmt != "bf16":
            want_own[bounds[e]:bounds[e + 1]] = expert_reference(
                x, torch_dequantized(gate_up[e]), torch_dequantized(down[e]), rounding=rows.dtype,
                fp8_activations=fmt == "fp8",
            )
    return rel_error(got, want), (None if fmt == "bf16" else rel_error(got, want_own))


def expert_reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, *, rounding: torch.dtype | None = None,
                     fp8_activations: bool = False) -> torch.Tensor:
    """One expert's SwiGLU with float32 GEMMs: x [n, H], gate_up [H, 2I], down [I, H] (float32) -> [n, H] float32.

    rounding: the dtype the path under test rounds each GEMM's output to (the SwiGLU then runs in it); None
    keeps float32. fp8_activations: each GEMM's input rows rounded to e4m3 per token, as the FP8 path does.
    """
    from herd.kernels import fp8

    def gemm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if fp8_activations:
            values, scales = fp8.quantize_rows(a)
            a = values.float() * scales
        out = a.float() @ w
        return out if rounding is None else out.to(rounding)

    inter = down.shape[0]
    h = gemm(x, gate_up)  # [n, 2I]
    return gemm(F.silu(h[:, :inter]) * h[:, inter:], down).float()


def torch_dequantized(weight: Weight) -> torch.Tensor:
    """A QuantizedTensor [Din, Dout] to float32 by herd.kernels' torch code (not the CuPy kernel under test)."""
    from herd.kernels import fp8, int4

    if isinstance(weight, torch.Tensor):
        return weight.float()
    if weight.scheme == "int4":
        return int4.dequantize_int4(weight.values, weight.scales, weight.d_in, group=weight.group, dtype=torch.float32)
    return fp8.dequantize_fp8(weight.values, weight.scales, dtype=torch.float32)


def timing_batch(tokens: int, hidden: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T rows [T, H] bf16, token t on expert t mod E (so min(T, E) experts touched), and expert_offsets [E+1]."""
    counts = torch.bincount(torch.arange(tokens, device=DEVICE) % experts, minlength=experts)
    offsets = torch.zeros(experts + 1, dtype=torch.int64, device=DEVICE)
    offsets[1:] = torch.cumsum(counts, 0)
    return torch.randn(tokens, hidden, device=DEVICE).to(torch.bfloat16), offsets


def time_format(
    layer: tuple[str, int, int, int], fmt: str, gate_up: Weight, down: Weight, token_batches: tuple[int, ...],
    ceiling: float, bf16_us: dict[int, float],
) -> list[str]:
    """herd.kernels.experts timed per token batch beside its bandwidth floor; records bf16's times in bf16_us."""
    from herd.kernels import experts as herd_experts

    name, hidden, inter, experts = layer
    per_expert = (gate_up.nbytes + down.nbytes) / experts  # values and scales
    lines = []
    for tokens in token_batches:
        rows, offsets = timing_batch(tokens, hidden, experts)
        touched = min(tokens, experts)
        iters, warmup = (20, 3) if DEVICE == "cuda" else (3, 1)  # CPU times mean nothing: just walk the code
        us = cuda_time_us(functools.partial(herd_experts, rows, offsets, gate_up, down), iters=iters, warmup=warmup)
        floor_us = touched * per_expert / ceiling / 1e3
        if fmt == "bf16":
            bf16_us[tokens] = us
        speedup = f"{bf16_us[tokens] / us:.2f}x" if tokens in bf16_us else "-"
        lines.append(f"| {name} H={hidden} I={inter} E={experts} | {fmt} | {tokens} | {touched} | "
                     f"{touched * per_expert / 1e6:.1f} | {us:.1f} | {floor_us:.1f} | {floor_us / us:.0%} | "
                     f"{speedup} |")
    return lines


def cuda_time_us(fn: Callable[[], object], *, iters: int = 50, warmup: int = 5) -> float:
    """Median microseconds of fn between CUDA events, after warm-up (wall clock in the CPU dry run)."""
    for _ in range(warmup):
        fn()
    if DEVICE == "cpu":
        return statistics.median(_wall_us(fn) for _ in range(iters))
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(float(start.elapsed_time(end)) * 1e3)
    return statistics.median(times)


def _wall_us(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    nbytes = nbytes if DEVICE == "cuda" else 1 << 24
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_time_us(lambda: dst.copy_(src), iters=20) / 1e3


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return float((got.float() - expected).norm() / expected.norm().clamp_min(1e-30))


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
