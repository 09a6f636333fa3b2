"""`make gpu-check`: every CuPy MoE kernel, and a whole MoE layer, against torch on a CUDA GPU, then timed.

Runs with PyTorch and CuPy alone (`PYTHONPATH=. python3 bench/gpu_check.py`): the GPU machines have
nothing else installed. `--cpu-dry-run` walks the same script on the CPU with small shapes and the
torch backend standing in for CuPy, so the script itself is tested where there is no GPU; its numbers
mean nothing. Checks first, with outputs poisoned (NaN / -1) so an element a kernel forgets
to write shows; then CUDA-event timings (median of many runs after warm-up) beside the torch backend on
the same GPU and the measured device-to-device copy bandwidth, the ceiling for these memory-bound
kernels. Exits 1 when a check fails, 2 when there is no GPU or no CuPy (nothing was checked).

Legend: T tokens, E experts, k experts per token, H hidden, I expert intermediate, R = T*k rows.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from types import ModuleType, SimpleNamespace

import torch
import torch.nn.functional as F

# (T, E, k, H): T=1, odd T, k > 1, more experts than rows, Scout- and Maverick-like widths.
KERNEL_CASES = [(1, 16, 1, 5120), (37, 16, 2, 1024), (3, 6, 4, 64), (511, 128, 2, 5120),
                (4096, 16, 1, 5120), (4096, 128, 1, 5120)]
LAYER_CASES = [(4096, 16, 5120, 1024), (4096, 128, 5120, 1024)]  # (T, E, H, I), top-1
DRY_KERNEL_CASES = [(1, 16, 1, 64), (37, 16, 2, 32), (3, 6, 4, 64)]
DRY_LAYER_CASES = [(64, 16, 64, 32)]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DEVICE = "cuda"


def main(argv: list[str]) -> int:
    if argv == ["--cpu-dry-run"]:
        return dry_run()
    if argv:
        print(f"usage: gpu_check.py [--cpu-dry-run], got {argv}")
        return 2
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing was checked")
        return 2
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError as err:
        print(f"gpu-check: CuPy is not importable ({err}); nothing was checked")
        return 2
    from herd.kernels import cupy_moe

    print(f"# gpu-check on {torch.cuda.get_device_name()}, torch {torch.__version__}, CuPy {cupy.__version__}")
    return run(cupy_moe, KERNEL_CASES, LAYER_CASES)


def dry_run() -> int:
    """The whole script on the CPU, torch backend in CuPy's place: proves the script, not the kernels."""
    global DEVICE
    from herd.kernels import torch_moe

    DEVICE = "cpu"
    stand_in = SimpleNamespace(
        route=torch_moe.route, permute=torch_moe.permute, combine=torch_moe.combine, poison_outputs=False
    )
    print("# gpu-check DRY RUN on the CPU: torch backend standing in for CuPy; not a GPU result")
    return run(stand_in, DRY_KERNEL_CASES, DRY_LAYER_CASES)


def run(cupy_moe: ModuleType | SimpleNamespace, kernel_cases: list, layer_cases: list) -> int:
    ceiling = copy_bandwidth_gbs()
    print(f"device-to-device copy: {ceiling:.0f} GB/s (the ceiling for the memory-bound kernels)\n")
    failures: list[str] = []
    table: list[str] = []
    for dtype in (torch.float32, torch.bfloat16):
        for case in kernel_cases:
            failures += check_kernels(case, dtype, cupy_moe)
            table += time_kernels(case, dtype, cupy_moe, ceiling)
        for case in layer_cases:
            failures += check_layer(case, dtype)
            table += time_layer(case, dtype)
    print("| kernel | dtype | shape | CuPy (us) | torch backend (us) | speed-up | GB/s | of copy BW |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(table))
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


def check_kernels(
    case: tuple[int, int, int, int], dtype: torch.dtype, cupy_moe: ModuleType | SimpleNamespace
) -> list[str]:
    from herd.kernels import torch_moe

    tokens, experts, k, _ = case
    name = f"{dtype} T={tokens} E={experts} k={k}"
    data = inputs(case, dtype, seed=tokens)
    order = torch.randperm(experts, device=DEVICE)
    cupy_moe.poison_outputs = True
    try:
        ids, scores = cupy_moe.route(data["logits"], k)
        rows, perm = cupy_moe.permute(data["x"], ids, scores, order)
        combined = cupy_moe.combine(data["out_rows"], perm, tokens)
    finally:
        cupy_moe.poison_outputs = False
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


def time_kernels(
    case: tuple[int, int, int, int], dtype: torch.dtype, cupy_moe: ModuleType | SimpleNamespace, ceiling: float
) -> list[str]:
    from herd.kernels import torch_moe

    tokens, experts, k, hidden = case
    data = inputs(case, dtype)
    order = torch.arange(experts, device=DEVICE)
    ids, scores = cupy_moe.route(data["logits"], k)
    _, perm = cupy_moe.permute(data["x"], ids, scores, order)
    _, torch_perm = torch_moe.permute(data["x"], ids, scores, order)
    size = data["x"].element_size()
    rows = tokens * k
    kernels = [
        ("route (top-k+sigmoid)", lambda: cupy_moe.route(data["logits"], k), lambda: torch_moe.route(data["logits"], k),
         tokens * experts * size + rows * (4 + size)),
        ("permute (+scale)", lambda: cupy_moe.permute(data["x"], ids, scores, order),
         lambda: torch_moe.permute(data["x"], ids, scores, order), 2 * rows * hidden * size),
        ("combine", lambda: cupy_moe.combine(data["out_rows"], perm, tokens),
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
        return (torch.randn(*shape, generator=g, device=DEVICE) * fan_in**-0.5).to(dtype)

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


def cuda_time_us(fn: Callable[[], object], *, iters: int = 50, warmup: int = 5) -> float:
    """Median microseconds of fn between CUDA events, after warm-up (wall clock in the CPU dry run)."""
    for _ in range(warmup):
        fn()
    if DEVICE == "cpu":
        return statistics.median(_wall_us(fn) for _ in range(iters))
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
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
