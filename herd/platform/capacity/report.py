"""A plan as an operator reads it: a table of GiB per GPU by part, the verdict, the limits, the placement."""

from __future__ import annotations

from typing import Any

from herd.platform.capacity.plan import Plan
from herd.platform.capacity.search import Search
from herd.platform.capacity.weights import PARTS

GIB = 2**30
_COLUMNS = (*PARTS, "kv_cache", "activations", "runtime", "total", "capacity")
CONTEXT_PARALLEL = ("context parallelism: set `trunks: M` and `engine.context_parallel: M` (issue 28); proven on "
                    "CPUs over gloo, not yet run on GPUs over NCCL. The host KV tier is not modelled.")


def _ranges(experts: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2, 5'."""
    out: list[str] = []
    for e in experts:
        if out and int(out[-1].split("-")[-1]) == e - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{e}"
        else:
            out.append(str(e))
    return ", ".join(out)


def rows(plan: Plan) -> list[dict[str, Any]]:
    """One dict per GPU: bytes by part and in all."""
    out = []
    for gpu in plan.gpus:
        row: dict[str, Any] = {"gpu": gpu.index, "role": gpu.role, **{p: gpu.weights.get(p, 0) for p in PARTS}}
        row |= {"kv_cache": gpu.kv_bytes, "activations": gpu.activation_bytes, "runtime": gpu.reserve_bytes,
                "total": gpu.total_bytes, "capacity": gpu.capacity_bytes, "experts": _ranges(gpu.experts),
                "fits": gpu.fits}
        out.append(row)
    return out


def layout(plan: Plan) -> dict[str, Any]:
    """What a layout is and how far it stretches: one row of the search's summary."""
    worst = plan.worst_gpu
    return {
        "trunks": plan.trunks, "shards": plan.shards, "kv_dtype": plan.load.kv_dtype,
        "context_parallel": plan.context_parallel, "fits": plan.fits,
        "largest_context": plan.largest_context, "largest_batch": plan.largest_batch,
        "fullest_gpu": worst.index, "fullest_gpu_over_bytes": worst.over_bytes,
    }


def as_json(plan: Plan) -> dict[str, Any]:
    return {
        **layout(plan), "weight_format": plan.weights.weight_format, "weights_bytes": plan.weights.bytes,
        "weights_total_bytes": plan.weights.total_bytes, "gpus": rows(plan), "fits": plan.fits,
        "sequences": plan.load.sequences, "context_tokens": plan.load.context_tokens,
        "largest_context": plan.largest_context, "largest_batch": plan.largest_batch,
        "largest_context_without_chunk_saving": plan.largest_context_without_chunk_saving,
        "tensor_parallel_context": plan.tensor_parallel_context,
        "max_position_embeddings": plan.max_position_embeddings,
    }


def as_text(plan: Plan, title: str) -> str:
    table = rows(plan)
    header = ["gpu", "role", *_COLUMNS, "experts"]
    cells = [[str(r["gpu"]), r["role"], *(f"{r[c] / GIB:.1f}" for c in _COLUMNS), r["experts"] or "-"]
             for r in table]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = [title, "GiB per GPU:", "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    load = plan.load
    verdict = "FITS" if plan.fits else "DOES NOT FIT: " + ", ".join(
        f"GPU {r['gpu']} needs {r['total'] / GIB:.1f} of {r['capacity'] / GIB:.1f} GiB "
        f"({(r['total'] - r['capacity']) / GIB:.1f} GiB over)" for r in table if not r["fits"])
    capped = " (the model's max_position_embeddings)" if plan.largest_context == plan.max_position_embeddings else ""
    lines += [
        f"{verdict}  ({load.sequences} sequence(s) x {load.context_tokens} tokens, KV {load.kv_dtype}, "
        f"{load.step_tokens} tokens per step)",
        f"largest context for {load.sequences} sequence(s): {plan.largest_context} tokens{capped}",
        f"  without Herd's chunk-aware KV (every layer keeping the whole context): "
        f"{plan.largest_context_without_chunk_saving} tokens",
        f"  a tensor-parallel engine over the same GPUs, every layer's KV kept: {plan.tensor_parallel_context} tokens",
        f"largest batch at {load.context_tokens} tokens: {plan.largest_batch} sequences",
    ]
    if plan.context_parallel:
        lines.insert(1, f"layout: {_name(plan)}")
        lines.append(CONTEXT_PARALLEL)
    return "\n".join(lines)


def _name(plan: Plan) -> str:
    cp = "context parallel" if plan.context_parallel else "no context parallelism"
    return f"{plan.trunks} trunk(s) : {plan.shards} shard(s), {cp}, KV {plan.load.kv_dtype}"


def search_json(found: Search) -> dict[str, Any]:
    return {"fits": found.fits, "layouts": [layout(p) for p in found.plans], "best": as_json(found.best)}


def search_text(found: Search, title: str) -> str:
    """The summary of every layout, the verdict (or how far the closest is), and the best one's table."""
    best, load = found.best, found.best.load
    header = ["M", "N", "kv", "context_parallel", "fits", "largest_context", "largest_batch", "fullest_gpu_GiB"]
    cells = [[str(p.trunks), str(p.shards), p.load.kv_dtype, "yes" if p.context_parallel else "no",
              "yes" if p.fits else "no", str(p.largest_context), str(p.largest_batch),
              f"{p.worst_gpu.total_bytes / GIB:.1f} (GPU {p.worst_gpu.index})"] for p in found.plans]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = [title, f"layouts of M trunks and N = G - M expert shards, best first (largest_context: for "
                    f"{load.sequences} sequence(s); largest_batch and fits: at {load.context_tokens} tokens):",
             "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells]
    lines.append(CONTEXT_PARALLEL)
    tp = {p.load.kv_dtype: p.tensor_parallel_context for p in found.plans}
    lines.append("a tensor-parallel engine over the same GPUs, every layer's KV kept: "
                 + ", ".join(f"{n} tokens (KV {d})" for d, n in tp.items()))
    if found.fits:
        lines.append(f"BEST LAYOUT THAT FITS {load.sequences} x {load.context_tokens} tokens: {_name(best)}")
    else:
        worst = best.worst_gpu
        lines.append(
            f"NO LAYOUT FITS {load.sequences} x {load.context_tokens} tokens; the closest, {_name(best)}: largest "
            f"context {best.largest_context} tokens ({load.context_tokens - best.largest_context} tokens short), "
            f"GPU {worst.index} ({worst.role}) {worst.over_bytes / GIB:.1f} GiB over at the request")
    lines += ["", as_text(best, title)]
    return "\n".join(lines)
