"""Prefill/decode disaggregation against colocated serving: TTFT and ITL of the same streamed requests.

One `herd serve` (API keys on, as a user runs it: bench.common.HerdServe) serves the tiny Scout checkpoint twice,
with the same replica budget: `colocated`, two replicas that each run whole requests, and `disaggregated`, one
prefill and one decode replica behind the proxy (herd.workers.pd_proxy; the prompt's KV moves through Ray's object
store). Both stream every step (stream_interval_s 0), so ITL is per token. For each concurrency level the same
fixed-seed workload goes to both, colocated first; the table gives TTFT p50 and ITL p50 (and p95), output tok/s,
and the ratio of each to colocated. What the proxy counted (prefills, fallbacks, blocks and bytes moved) is read
from /herd/stats at the end.

Disaggregation is for GPUs where a long prefill stalls every decode sharing its batch: apart, decodes keep their
pace (ITL) while prompts run elsewhere, at the price of one KV transfer per request (TTFT). On a CPU with a couple of
cores both pools share the same cores and the transfer and the extra hop are pure cost: expect no speed-up there.
Exits 1 when a request failed or the server did not come up.

    .venv/bin/python bench/disaggregation.py [--requests 32] [--concurrency 1 4] [--prompt-words 64 256]
                                             [--max-tokens 32 64] [--seed 0] [--checkpoint DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common from a checkout

from bench.common import ROOT, HerdServe, ServerError, parse_args_with_smoke, print_command, tiny_checkpoint
from herd_loadgen import LoadResult, make_workload, run_load

SETUPS = ("colocated", "disaggregated")
COLUMNS = ("setup", "concurrency", "requests", "errors", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms",
           "output tok/s", "TTFT p50 vs colocated", "ITL p50 vs colocated")


def models(checkpoint: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The two setups of one checkpoint, the same engine and replica budget (two model replicas each)."""
    engine = {"max_num_seqs": max(args.concurrency), "kv_cache_mb": 64, "max_model_len": 2048}
    common = {"path": str(checkpoint), "shards": args.shards, "transport": "local", "stream_interval_s": 0,
              "engine": engine}
    return [{"name": "colocated", **common, "deployment": {"num_replicas": 2}},
            {"name": "disaggregated", **common, "disaggregation": {"prefill_replicas": 1, "decode_replicas": 1}}]


def drive(server: HerdServe, args: argparse.Namespace) -> dict[int, dict[str, LoadResult]]:
    """Warm-up, then per level the same workload against each setup in turn."""
    warm = make_workload(args.warmup, seed=args.seed + 1000, prompt_words=(8, 16), max_tokens=(4, 8))
    results: dict[int, dict[str, LoadResult]] = {}
    for setup in SETUPS:
        asyncio.run(run_load(server.url, setup, warm, concurrency=1, api_key=server.api_key,
                             timeout_s=args.timeout_s, extra_body={"ignore_eos": True}))
    for i, level in enumerate(args.concurrency):
        workload = make_workload(args.requests, seed=args.seed + i, prompt_words=tuple(args.prompt_words),
                                 max_tokens=tuple(args.max_tokens))
        results[level] = {}
        for setup in SETUPS:
            results[level][setup] = result = asyncio.run(run_load(
                server.url, setup, workload, concurrency=level, api_key=server.api_key, timeout_s=args.timeout_s,
                extra_body={"ignore_eos": True}))
            print(f"{setup} at {level}: {result.summary()}", file=sys.stderr, flush=True)
    return results


def row(setup: str, summary: dict[str, Any], base: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        return "-" if summary[key] is None else f"{summary[key]:.1f}"

    def ratio(key: str) -> str:
        return "-" if not summary[key] or not base[key] else f"{summary[key] / base[key]:.2f}x"

    cells = [setup, str(summary["concurrency"]), str(summary["requests"]), str(summary["errors"]), ms("ttft_p50_ms"),
             ms("ttft_p95_ms"), ms("itl_p50_ms"), ms("itl_p95_ms"), f"{summary['output_tok_per_s']:.1f}",
             ratio("ttft_p50_ms"), ratio("itl_p50_ms")]
    return "| " + " | ".join(cells) + " |"


def proxy_stats(server: HerdServe) -> dict[str, int]:
    """The disaggregated model's /herd/stats: the proxy's counters, a decode and a prefill replica's."""
    stats: dict[str, dict[str, int]] = httpx.get(f"{server.ops_url}/herd/stats", timeout=30).json()
    return stats.get("disaggregated", {})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / ".herd" / "tiny-scout",
                   help="checkpoint directory; made with make_tiny(preset='scout', seed=0) if it has no config.json")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--seed", type=int, default=0, help="workload seed; level i uses seed + i")
    p.add_argument("--prompt-words", type=int, nargs=2, default=[64, 256], metavar=("LO", "HI"))
    p.add_argument("--max-tokens", type=int, nargs=2, default=[32, 64], metavar=("LO", "HI"))
    p.add_argument("--shards", type=int, default=0, help="expert shards per replica (in the trunk's process)")
    p.add_argument("--warmup", type=int, default=2, help="uncounted requests sent to each setup first")
    p.add_argument("--timeout-s", type=float, default=600.0, help="connect and per-read timeout of each request")
    p.add_argument("--ready-timeout-s", type=float, default=300.0, help="how long herd serve may take to come up")
    p.add_argument("--log-dir", type=Path, default=ROOT / ".herd" / "disaggregation-bench-logs")
    return parse_args_with_smoke(p, argv, requests=2, concurrency=[2], prompt_words=[16, 32], max_tokens=[4, 4],
                                 warmup=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoint = tiny_checkpoint(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"models": models(checkpoint, args), "models_dir": str(Path(tmp) / "models")}
        try:
            with HerdServe(Path(tmp) / "herd", settings=settings, log=args.log_dir / "herd_serve.log",
                           ready_timeout_s=args.ready_timeout_s) as server:
                results = drive(server, args)
                counted = proxy_stats(server)
        except ServerError as err:
            print(f"herd serve did not come up: {err}")
            return 1
    print_command("disaggregation.py")
    print(f"\n## Prefill/decode disaggregation: tiny Scout ({checkpoint}), CPU float32, greedy, {args.requests} "
          f"streamed requests per level, prompts {args.prompt_words[0]}-{args.prompt_words[1]} words, max_tokens "
          f"{args.max_tokens[0]}-{args.max_tokens[1]}, seed {args.seed} (+ level index), {os.cpu_count()} CPUs"
          f"{' (--smoke: sizes too small to mean anything)' if args.smoke else ''}\n")
    print("| " + " | ".join(COLUMNS) + " |\n|---|" + "---:|" * (len(COLUMNS) - 1))
    failures = []
    for by_setup in results.values():
        base = by_setup["colocated"].summary()
        for setup, result in by_setup.items():
            print(row(setup, result.summary(), base))
            failures += [f"{setup} at {result.concurrency}: {line}" for line in result.errors()]
    moved = {key: counted.get(key, 0) for key in ("pd_requests", "pd_prefilled", "pd_fallbacks", "pd_blocks_moved",
                                                  "pd_bytes_moved", "kv_imports", "kv_import_failures")}
    print(f"\nThe proxy's counts (warm-up included): {moved}")
    print(f"Load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if failures or moved["pd_requests"] == 0:
        print("\nFAILED:\n" + "\n".join(f"- {f}" for f in failures or ["the disaggregated model served nothing"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
