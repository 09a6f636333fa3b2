"""Shard recovery time: `herd serve` on the tiny Scout (2 expert shards) while an expert shard's process is
SIGKILLed under streaming load, once per round, for each transport (issue 27: a dead shard is restarted in
place and its replica holds its requests meanwhile, so streams pause but complete).

Per transport, one `herd serve` (API keys on, bench.common.HerdServe) with shards 2, dispatch_timeout_s 5 and a
health check every 2 s, as tests/integration/platform/test_faults.py runs it. First `--streams` streams through
the gRPC door (greedy, `--max-tokens` each with EOS ignored, prompt i the same in every run) with nothing
disturbed: the reference tokens and text. Then `--rounds` rounds: the same streams again, and once every one
has streamed its first chunk, SIGKILL one `ray::ExpertShardActor` process under herd serve (shard round mod 2).
Every stream must end with exactly the reference's tokens and text ("streams ok"); the longest gap between two
chunks of any stream is the round's stream pause, as a client sees it. The replica's own recovery seconds (from
the death noticed to the shard serving again: process restart, experts loaded, transport reconnected) are the
delta of its `herd_replica_shard_recovery_seconds` _sum over the round, its _count having grown by exactly one.

Weight-load share: `ShardExperts.load` of one shard's experts (shard 0's of the replica's placement: half the
experts), timed here in the bench process (median of 3), and the bytes of those weights; "load share" is that
time over the median recovery: how much of a recovery is the experts' weights, the rest being Ray starting the
process (a fresh Python importing torch and Herd) and the transport reconnecting. Also printed per transport:
how long after the kill a process under herd serve took the shard actor's title again (Ray placed the actor).

Exits 1 when a stream failed or differed from the reference, or a kill was not followed by exactly one recovery.

    .venv/bin/python bench/recovery.py [--transports collective grpc] [--streams 8] [--rounds 3]
                                       [--max-tokens 120] [--checkpoint DIR] [--log-dir DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common from a checkout

from bench.common import ROOT, HerdServe, ServerError, machine, parse_args_with_smoke, print_command, tiny_checkpoint
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc

MODEL = "scout"
SHARDS = 2
SHARD_TITLE = "ray::ExpertShardActor"
STREAM_DEADLINE_S = 300.0  # a stream's gRPC deadline: far beyond a recovery (RESTART_TIMEOUT_S is 120)
RECOVERED_WITHIN_S = 180.0  # after its streams end, a round's recovery must be counted within this
LOAD_REPEATS = 3
TABLE_HEADER = ("| transport | kills | recovery s (median) | recovery s (max) | longest stream pause s | "
                "weight load s | load share | streams ok |")


@dataclass
class Stream:
    """What one stream's client saw: its tokens and text, the chunks' arrival times, or the error that ended it."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    times: list[float] = field(default_factory=list)  # time.monotonic() of each chunk
    error: str | None = None

    @property
    def longest_pause_s(self) -> float:
        return max((b - a for a, b in zip(self.times, self.times[1:], strict=False)), default=0.0)


@dataclass
class Round:
    """One kill: its streams, the replica's recovery seconds, and when the new shard process started."""

    streams: list[Stream]
    recovery_s: float | None  # None: the kill was not followed by exactly one recovery
    respawn_s: float | None  # from the kill to a process titled as the shard actor again (Ray placed it)


# --- streams ------------------------------------------------------------------------------------------------
async def _stream(stub: pb_grpc.InferenceStub, key: str, n: int, max_tokens: int, started: set[int]) -> Stream:
    request = pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(role="user", content=f"recovery {n}")],
                             sampling=pb.SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    seen = Stream()
    try:
        async for chunk in stub.Chat(request, timeout=STREAM_DEADLINE_S,
                                     metadata=(("authorization", f"Bearer {key}"),)):
            seen.times.append(time.monotonic())
            seen.tokens += chunk.token_ids
            seen.text += chunk.text
            started.add(n)
    except grpc.aio.AioRpcError as err:
        seen.error = f"{err.code().name}: {err.details()}"
    finally:
        started.add(n)  # or over: the kill waits for no stream that has ended
    if seen.error is None and len(seen.tokens) != max_tokens:
        seen.error = f"{len(seen.tokens)} tokens, not {max_tokens}"
    return seen


async def _run_streams(server: HerdServe, streams: int, max_tokens: int,
                       once_started: Callable[[], None] = lambda: None) -> list[Stream]:
    """`streams` streams at once; `once_started` runs (on a thread) when each has streamed its first chunk."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        started: set[int] = set()
        tasks = [asyncio.create_task(_stream(stub, server.api_key, n, max_tokens, started)) for n in range(streams)]
        deadline = time.monotonic() + STREAM_DEADLINE_S
        while len(started) < streams and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.to_thread(once_started)
        return list(await asyncio.gather(*tasks))


def _same(stream: Stream, reference: Stream) -> bool:
    return stream.error is None and stream.tokens == reference.tokens and stream.text == reference.text


# --- the shard processes and the replica's metrics ----------------------------------------------------------
def _shard_pids(root: int) -> list[int]:
    """The expert shard processes under herd serve (Ray's workers are its descendants), by pid."""
    pids = []
    for child in psutil.Process(root).children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith(SHARD_TITLE):
                pids.append(child.pid)
        except psutil.Error:
            continue
    return sorted(pids)


def _recovery_totals(server: HerdServe) -> tuple[float, int]:
    """The replica's herd_replica_shard_recovery_seconds (_sum, _count)."""
    port = httpx.get(f"{server.ops_url}/herd/stats", timeout=30).json()[MODEL]["metrics_port"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    found = {}
    for part in ("sum", "count"):
        match = re.search(rf'^herd_replica_shard_recovery_seconds_{part}\{{model="{MODEL}"\}} (\S+)$', text, re.M)
        if match is None:
            raise RuntimeError(f"the replica's /metrics has no herd_replica_shard_recovery_seconds_{part}")
        found[part] = float(match.group(1))
    return found["sum"], int(found["count"])


def _kill_round(server: HerdServe, streams: int, max_tokens: int, shard: int) -> Round:
    """The streams, and shard `shard`'s process SIGKILLed once each has streamed its first chunk."""
    assert server.proc is not None
    root = server.proc.pid
    before_sum, before_count = _recovery_totals(server)
    old = _shard_pids(root)
    if len(old) != SHARDS:
        raise RuntimeError(f"{len(old)} expert shard processes under herd serve, not {SHARDS}: {old}")
    respawn_s: list[float] = []

    def kill() -> None:
        """SIGKILL, then wait for a process under herd serve to take the shard actor's title."""
        os.kill(old[shard], signal.SIGKILL)
        killed = time.monotonic()
        while time.monotonic() - killed < RECOVERED_WITHIN_S:
            if set(_shard_pids(root)) - set(old):
                respawn_s.append(time.monotonic() - killed)
                return
            time.sleep(0.05)

    seen = asyncio.run(_run_streams(server, streams, max_tokens, kill))
    deadline = time.monotonic() + RECOVERED_WITHIN_S
    after_sum, after_count = _recovery_totals(server)
    while after_count == before_count and time.monotonic() < deadline:
        time.sleep(0.5)
        after_sum, after_count = _recovery_totals(server)
    recovery_s = after_sum - before_sum if after_count == before_count + 1 else None
    return Round(seen, recovery_s, respawn_s[0] if respawn_s else None)


def _transport(transport: str, checkpoint: Path, args: argparse.Namespace,
               work: Path) -> tuple[list[Stream], list[Round]]:
    """herd serve over `transport`: the reference streams, then the kill rounds."""
    settings = {"models": [{"name": MODEL, "path": str(checkpoint), "shards": SHARDS, "transport": transport,
                            "dispatch_timeout_s": 5,
                            "deployment": {"health_check_period_s": 2, "max_ongoing_requests": 64},
                            "engine": {"max_num_seqs": 64}}]}
    with HerdServe(work / transport, settings=settings, log=args.log_dir / f"herd_serve_{transport}.log") as server:
        reference = asyncio.run(_run_streams(server, args.streams, args.max_tokens))
        rounds = []
        for k in range(args.rounds):
            rounds.append(_kill_round(server, args.streams, args.max_tokens, shard=k % SHARDS))
            done = rounds[-1]
            ok = sum(_same(s, r) for s, r in zip(done.streams, reference, strict=True))
            print(f"{transport} round {k + 1}: recovery {_s(done.recovery_s)} s, longest pause "
                  f"{max(s.longest_pause_s for s in done.streams):.2f} s, streams ok {ok}/{len(done.streams)}",
                  file=sys.stderr, flush=True)
    return reference, rounds


# --- the experts' weights -----------------------------------------------------------------------------------
def _weight_load(checkpoint: Path) -> tuple[float, int]:
    """Median seconds of ShardExperts.load of shard 0's experts (of SHARDS, as a replica places them), and
    their bytes."""
    from herd.model.config import load_config
    from herd.workers.placement import place_experts
    from herd.workers.shard_experts import ShardExperts

    experts = place_experts(load_config(checkpoint).text.num_local_experts, SHARDS).shard_experts[0]
    times, nbytes = [], 0
    for _ in range(LOAD_REPEATS):
        start = time.perf_counter()
        shard = ShardExperts.load(checkpoint, list(experts))
        times.append(time.perf_counter() - start)
        nbytes = sum(weights.nbytes for weights in shard.layers.values())
    return statistics.median(times), nbytes


# --- the table ----------------------------------------------------------------------------------------------
def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _report(results: dict[str, tuple[list[Stream], list[Round]]], load_s: float, nbytes: int) -> list[str]:
    """Prints the table; the failures."""
    failures = []
    print(TABLE_HEADER)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for transport, (reference, rounds) in results.items():
        bad_reference = [s.error for s in reference if s.error is not None]
        failures += [f"{transport}: an undisturbed stream failed: {e}" for e in bad_reference]
        recoveries = [r.recovery_s for r in rounds if r.recovery_s is not None]
        failures += [f"{transport} round {k + 1}: the kill was not followed by exactly one recovery"
                     for k, r in enumerate(rounds) if r.recovery_s is None]
        streams = [(s, ref) for r in rounds for s, ref in zip(r.streams, reference, strict=True)]
        ok = sum(_same(s, ref) for s, ref in streams)
        failures += [f"{transport}: stream {'failed: ' + s.error if s.error else 'differed from the undisturbed run'}"
                     for s, ref in streams if not _same(s, ref)]
        median = statistics.median(recoveries) if recoveries else None
        pause = max((s.longest_pause_s for s, _ in streams), default=0.0)
        share = f"{load_s / median:.1%}" if median else "-"
        print(f"| {transport} | {len(rounds)} | {_s(median)} | {_s(max(recoveries, default=None))} | {pause:.2f} | "
              f"{load_s:.3f} | {share} | {ok}/{len(streams)} |")
    print(f"\nOne shard's expert weights: {nbytes / 2**20:.1f} MiB ({nbytes} bytes), loaded in {load_s:.3f} s "
          f"(median of {LOAD_REPEATS}) = {nbytes / 2**20 / load_s:.0f} MiB/s.")
    for transport, (_, rounds) in results.items():
        respawns = [r.respawn_s for r in rounds if r.respawn_s is not None]
        if respawns:
            print(f"{transport}: a process took the shard actor's title {statistics.median(respawns):.2f} s after "
                  f"the kill (median of {len(respawns)}: Ray starts a new worker process at once, and it takes "
                  "the title with the actor's creation task; its imports and constructor come after). The recovery "
                  "counts from the death noticed, a stream pause from its last chunk before the kill.")
    return failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--transports", nargs="+", choices=["collective", "grpc"], default=["collective", "grpc"])
    p.add_argument("--streams", type=int, default=8, help="streams at once, in the reference run and each round")
    p.add_argument("--rounds", type=int, default=3, help="shard kills per transport, one per round")
    p.add_argument("--max-tokens", type=int, default=120, help="tokens of each stream (EOS ignored)")
    p.add_argument("--checkpoint", type=Path, default=ROOT / ".herd" / "tiny-scout",
                   help="checkpoint directory; made with make_tiny(preset='scout', seed=0) if it has no config.json")
    p.add_argument("--log-dir", type=Path, default=ROOT / ".herd" / "recovery-bench-logs")
    return parse_args_with_smoke(p, argv, transports=["collective"], streams=4, rounds=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoint = tiny_checkpoint(args.checkpoint)
    print_command("recovery.py")
    print(machine())
    load_s, nbytes = _weight_load(checkpoint)
    results = {}
    with tempfile.TemporaryDirectory(prefix="herd-recovery-") as tmp:
        for transport in args.transports:
            try:
                results[transport] = _transport(transport, checkpoint, args, Path(tmp))
            except ServerError as err:
                print(f"herd serve ({transport}) did not start: {err}", file=sys.stderr)
                return 1
    failures = _report(results, load_s, nbytes)
    for line in failures:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
