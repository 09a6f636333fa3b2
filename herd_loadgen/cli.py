"""The command line (`herd bench`, `python -m herd_loadgen`): one run per concurrency level, a row as each ends."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from herd_loadgen.client import ENDPOINTS, run_load
from herd_loadgen.report import plot, table_header, table_row
from herd_loadgen.results import LoadResult
from herd_loadgen.workload import make_workload


def main(argv: Sequence[str] | None = None, *, prog: str = "herd bench") -> int:
    """One run per concurrency level, a markdown row as each ends. Level i uses seed + i, so no level reuses
    another's prompts (a server's prefix cache would otherwise flatter later levels). Exit 1 when every
    request of some level failed, 2 on bad arguments."""
    args = _parser(prog).parse_args(argv)
    try:
        extra = json.loads(args.extra_body) if args.extra_body else None
        if extra is not None and not isinstance(extra, dict):
            raise ValueError(f"--extra-body must be a JSON object, got {args.extra_body!r}")
        results: dict[int, LoadResult] = {}
        print(table_header(), flush=True)
        for i, concurrency in enumerate(args.concurrency):
            workload = make_workload(args.requests, seed=args.seed + i, prompt_words=tuple(args.prompt_words),
                                     max_tokens=tuple(args.max_tokens))
            result = asyncio.run(run_load(args.url, args.model, workload, concurrency=concurrency,
                                          endpoint=args.endpoint, api_key=args.api_key, timeout_s=args.timeout_s,
                                          extra_body=extra))
            results[concurrency] = result
            print(table_row(args.label or args.model, result.summary()), flush=True)
        for result in results.values():
            for line in result.errors()[:5]:
                print(f"concurrency {result.concurrency}: {line}", file=sys.stderr)
        if args.plot:
            print(f"plot: {plot({args.label or args.model: results}, args.plot)}")
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 1 if any(r.summary()["errors"] == len(r.records) for r in results.values()) else 0


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Load an OpenAI-compatible server; report "
                                "output tok/s, TTFT and inter-token latency per concurrency.")
    p.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000 (or its /v1)")
    p.add_argument("--model", required=True, help="the `model` field of every request")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients, per run")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--seed", type=int, default=0, help="workload seed (level i uses seed + i)")
    p.add_argument("--prompt-words", type=int, nargs=2, default=[8, 128], metavar=("LO", "HI"))
    p.add_argument("--max-tokens", type=int, nargs=2, default=[16, 64], metavar=("LO", "HI"))
    p.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat")
    p.add_argument("--api-key", help="sent as a Bearer token")
    p.add_argument("--timeout-s", type=float, default=300.0, help="connect and per-read timeout")
    p.add_argument("--extra-body", help='JSON merged into every request, e.g. \'{"ignore_eos": true}\'')
    p.add_argument("--label", help="system name in the table and plot (default: the model)")
    p.add_argument("--plot", type=Path, help="write a PNG of throughput and TTFT against concurrency")
    return p

