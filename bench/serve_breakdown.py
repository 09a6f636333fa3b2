"""Where `herd serve` loses the engine's throughput: the same streaming workload through one more layer at a time.

Stages, each on the tiny Scout (CPU, float32, greedy, ignore_eos), `--concurrency` clients that start their
next request as soon as one ends (as bench/serve.py's load generator does), the same requests for every stage:

- `engine`: herd's AsyncLLMEngine in this process, the clients reading its RequestOutputs.
- `replica core`: ReplicaCore.generate (experts in the trunk), the clients reading its herd.v1 GenerateChunks
  (stream_interval_s merging, protobuf chunks): what the Ray Serve replica runs, without Ray.
- `gateway`: the HTTP door (serve_doors: FastAPI, uvicorn, SSE) over that core in a server process of its own
  (LocalBackend, no Ray, API keys off), the load generator (herd_loadgen over HTTP) in this process.
- `herd serve --shards 0`: Ray Serve between the gateway and the replica, API keys on (bench.common.HerdServe).
- `herd serve`: the default, 2 expert-shard processes in the replica's collective group (gloo on this CPU).
- `herd serve --transport grpc`: the same 2 shards behind gRPC (the default before issue 21).

For every stage it prints output tok/s and the CPU seconds each process used per output token (from /proc,
so the 2-core machine's split between load generator, gateway, Ray and engine shows). Nothing is asserted.

    .venv/bin/python bench/serve_breakdown.py [--requests 64] [--concurrency 32] [--rounds 1]
                                              [--stages engine core gateway serve0 serve serve_grpc] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common from a checkout

from bench.common import (
    ROOT,
    HerdServe,
    ServerProcess,
    free_port,
    parse_args_with_smoke,
    print_command,
    tiny_checkpoint,
)
from herd_loadgen import Request, make_workload, run_load

STAGES = {"engine": "engine (AsyncLLMEngine)", "core": "replica core (pb chunks)",
          "gateway": "gateway over in-process core (HTTP/SSE)", "serve0": "herd serve --shards 0",
          "serve": "herd serve (2 collective shards)", "serve_grpc": "herd serve (2 gRPC shards)"}
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """This process's and its descendants' (servers, Ray's processes) (command, user + system CPU seconds) now;
    other people's processes on a shared machine are left out."""
    found: dict[int, tuple[int, str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                fields = stat.read().rpartition(")")[2].split()
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found[int(entry)] = (int(fields[1]), command, (int(fields[11]) + int(fields[12])) * TICK_S)

    def ours(pid: int) -> bool:
        while pid > 1 and pid in found:
            if pid == os.getpid():
                return True
            pid = found[pid][0]
        return False

    return {pid: (command, seconds) for pid, (_, command, seconds) in found.items() if ours(pid)}


def role(command: str) -> str:
    """A process's part in the run, from its command line."""
    for needle, name in (("serve_breakdown.py --serve-local", "gateway+core"), ("serve_breakdown.py", "client"),
                         ("herd.cli serve", "gateway"), ("ServeReplica", "replica"), ("ExpertShard", "shards"),
                         ("ServeController", "serve controller"), ("ProxyActor", "serve proxy")):
        if needle in command:
            return name
    return "ray, others" if "ray" in command else "other"


@contextlib.contextmanager
def cpu_split(into: dict[str, float]) -> Iterator[None]:
    """CPU seconds used while the block runs, by role (processes that started inside it count from zero)."""
    before = cpu_seconds()
    yield
    for pid, (command, seconds) in cpu_seconds().items():
        used = seconds - before.get(pid, (command, 0.0))[1]
        if used > 0:
            into[role(command)] = into.get(role(command), 0.0) + used


def chat_ids(tokenizer: Any, workload: list[Request]) -> list[list[int]]:
    from herd.model.chat_template import render_chat
    from herd.model.prompt import prompt_ids

    return [prompt_ids(tokenizer, render_chat([{"role": "user", "content": r.prompt}]), tokenizer.vocab_size)
            for r in workload]


async def closed_loop(workload: list[Request], concurrency: int, one: Callable[[int], Awaitable[int]]) -> int:
    """`concurrency` clients, each taking the next request when its last ended; the output tokens of all."""
    pending = list(range(len(workload)))[::-1]
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while pending:
            got = await one(pending.pop())  # not `tokens += await ...`: that reads tokens before the wait
            tokens += got

    await asyncio.gather(*(client() for _ in range(min(concurrency, len(workload)))))
    return tokens


Stream = Callable[[str, list[int], int], Awaitable[int]]
"""One request (its id, prompt ids, max_tokens) streamed to its end; its output tokens."""


def run_in_process(tokenizer: Any, stream: Stream, workloads: list[list[Request]], concurrency: int,
                   split: dict[str, float]) -> tuple[int, float]:
    """The workloads through `stream` in this process; output tokens and wall seconds of all but the first
    (warm-up) round."""
    def one(round_: int, workload: list[Request], ids: list[list[int]], index: int) -> Awaitable[int]:
        return stream(f"r{round_}-{index}", ids[index], workload[index].max_tokens)

    async def go() -> tuple[int, float]:
        tokens, wall = 0, 0.0
        for round_, workload in enumerate(workloads):
            ids = chat_ids(tokenizer, workload)
            with cpu_split(split if round_ else {}):
                start = time.perf_counter()
                done = await closed_loop(workload, concurrency, functools.partial(one, round_, workload, ids))
            if round_:
                tokens, wall = tokens + done, wall + time.perf_counter() - start
        return tokens, wall

    return asyncio.run(go())


def run_engine(checkpoint: Path, workloads: list[list[Request]], concurrency: int,
               split: dict[str, float]) -> tuple[int, float]:
    from herd.engine import AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams

    engine = AsyncLLMEngine(LLMEngine.from_pretrained(checkpoint, EngineConfig()))

    async def stream(request_id: str, ids: list[int], max_tokens: int) -> int:
        count = 0
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        async for out in engine.generate(ids, params, request_id=request_id):
            count = len(out.token_ids)
        return count

    return run_in_process(engine.engine.tokenizer, stream, workloads, concurrency, split)


def run_core(checkpoint: Path, workloads: list[list[Request]], concurrency: int,
             split: dict[str, float]) -> tuple[int, float]:
    from herd.protos.herd.v1 import inference_pb2 as pb
    from herd.workers.replica_config import ReplicaConfig
    from herd.workers.replica_core import ReplicaCore

    core = ReplicaCore(ReplicaConfig(name="scout", path=str(checkpoint), shards=0))

    async def stream(request_id: str, ids: list[int], max_tokens: int) -> int:
        count = 0
        sampling = pb.SamplingOptions(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        request = pb.GenerateRequest(model="scout", token_ids=pb.TokenIds(ids=ids), request_id=request_id,
                                     sampling=sampling)
        async for chunk in core.generate(request):
            count += len(chunk.token_ids)
        return count

    return run_in_process(core.tokenizer, stream, workloads, concurrency, split)


def drive_http(url: str, model: str, workloads: list[list[Request]], concurrency: int, split: dict[str, float],
               api_key: str | None = None) -> tuple[int, float]:
    tokens, wall = 0, 0.0
    for i, workload in enumerate(workloads):
        with cpu_split(split if i else {}):
            result = asyncio.run(run_load(url, model, workload, concurrency=concurrency, api_key=api_key,
                                          extra_body={"ignore_eos": True}))
        if result.errors():
            raise RuntimeError(f"{len(result.errors())} requests failed: {result.errors()[:2]}")
        if i:
            tokens, wall = tokens + result.summary()["output_tokens"], wall + result.wall_s
    return tokens, wall


def run_gateway(checkpoint: Path, workloads: list[list[Request]], concurrency: int, split: dict[str, float],
                log_dir: Path) -> tuple[int, float]:
    port = free_port()
    settings = {"http_port": port, "grpc_port": free_port(), "ops_port": free_port(), "tenancy": {"auth": False}}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-local", json.dumps(settings), str(checkpoint)]
    with ServerProcess("gateway", cmd, url=f"http://127.0.0.1:{port}", log=log_dir / "gateway.log",
                       ready_path="/health/ready"):
        return drive_http(f"http://127.0.0.1:{port}", "scout", workloads, concurrency, split)


def serve_local(settings_json: str, checkpoint: str) -> None:
    """The gateway's doors over a ReplicaCore in this process (no Ray), until SIGINT."""
    from herd.platform.gateway.backend import LocalBackend
    from herd.platform.server import serve_doors
    from herd.platform.settings import HerdSettings
    from herd.workers.replica_config import ReplicaConfig
    from herd.workers.replica_core import ReplicaCore

    core = ReplicaCore(ReplicaConfig(name="scout", path=checkpoint, shards=0))
    asyncio.run(serve_doors(HerdSettings(**json.loads(settings_json)), {"scout": LocalBackend(core)},
                           lambda _gateway: None))


def run_herd_serve(checkpoint: Path, workloads: list[list[Request]], concurrency: int, split: dict[str, float],
                   log_dir: Path, flags: list[str]) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as work, HerdServe(
            Path(work), args=["--model", str(checkpoint), "--name", "scout", *flags],
            log=log_dir / f"herd_serve{''.join(flags)}.log") as server:
        return drive_http(server.url, "scout", workloads, concurrency, split, api_key=server.api_key)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / ".herd" / "tiny-scout",
                   help="checkpoint directory; made with make_tiny(preset='scout', seed=0) if it has no config.json")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=64, help="requests per round")
    p.add_argument("--rounds", type=int, default=2, help="measured rounds per stage (after one warm-up round)")
    p.add_argument("--prompt-words", type=int, nargs=2, default=[8, 128], metavar=("LO", "HI"))
    p.add_argument("--max-tokens", type=int, nargs=2, default=[16, 64], metavar=("LO", "HI"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the in-process stages "
                   "(engine, core); default torch's (the cores). A Ray Serve replica gets 1 (Ray's OMP_NUM_THREADS "
                   "for an actor of 0-1 CPUs)")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    p.add_argument("--log-dir", type=Path, default=ROOT / ".herd" / "serve-breakdown-logs")
    return parse_args_with_smoke(p, argv, requests=2, concurrency=2, rounds=1, prompt_words=[4, 8],
                                 max_tokens=[4, 4], stages=["engine", "core", "gateway"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-local"]:
        serve_local(argv[1], argv[2])
        return 0
    args = parse_args(argv)
    print_command("serve_breakdown.py")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    checkpoint = tiny_checkpoint(args.checkpoint)
    workloads = [make_workload(args.requests, seed=round_, prompt_words=tuple(args.prompt_words),
                               max_tokens=tuple(args.max_tokens)) for round_ in range(args.rounds + 1)]
    c = args.concurrency
    runners: dict[str, Callable[[dict[str, float]], tuple[int, float]]] = {
        "engine": lambda split: run_engine(checkpoint, workloads, c, split),
        "core": lambda split: run_core(checkpoint, workloads, c, split),
        "gateway": lambda split: run_gateway(checkpoint, workloads, c, split, args.log_dir),
        "serve0": lambda split: run_herd_serve(checkpoint, workloads, c, split, args.log_dir, ["--shards", "0"]),
        "serve": lambda split: run_herd_serve(checkpoint, workloads, c, split, args.log_dir, []),
        "serve_grpc": lambda split: run_herd_serve(checkpoint, workloads, c, split, args.log_dir,
                                                   ["--transport", "grpc"]),
    }
    smoke = " (--smoke: sizes too small to mean anything)" if args.smoke else ""
    print(f"# {args.concurrency} clients, {args.rounds} x {args.requests} requests (after one warm-up round), "
          f"prompts {args.prompt_words[0]}-{args.prompt_words[1]} words, {args.max_tokens[0]}-{args.max_tokens[1]} "
          f"output tokens, {os.cpu_count()} CPUs{smoke}\n")
    print("| stage | output tokens | wall s | output tok/s | vs engine | load avg | CPU ms/token by process |")
    print("|---|---:|---:|---:|---:|---:|---|")
    first = None
    for stage in args.stages:
        load = os.getloadavg()[0]
        split: dict[str, float] = {}
        tokens, wall = runners[stage](split)
        rate = tokens / wall if wall else 0.0
        first = first or rate
        per_token = ", ".join(f"{name} {1e3 * s / max(tokens, 1):.2f}" for name, s in
                              sorted(split.items(), key=lambda kv: -kv[1]) if s / max(tokens, 1) >= 1e-5)
        print(f"| {STAGES[stage]} | {tokens} | {wall:.2f} | {rate:.1f} | {rate / first:.2f} | {load:.2f} | "
              f"{per_token} |", flush=True)
    print("\n(CPU ms per output token, by process, over the measured rounds only; on 2 cores a stage can use at most "
          "2000 / (its tok/s) ms per token in all.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
