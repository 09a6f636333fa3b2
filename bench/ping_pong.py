"""Ping-pong micro-batches against whole steps, with the routed experts on expert-shard processes (issue 28).

`--trunks` trunks in this process (each an `LLMEngine` on its own copy of the trunk: attention, KV cache, shared
expert; one thread each) and `--shards` `herd expert-shard --collective` processes holding the routed experts,
joined over the replica's collective group (gloo; with 2 trunks every shard computes both trunks' rows of a layer
in one call, issue 28's M:N), on a tiny
checkpoint widened to `--hidden-size` (bench/lora.py's widening) so that both sides carry real work. The same
`--sequences` prompts run with whole steps (`micro_batches` 1, the baseline) and with each step split into
`--micro-batches` (`EngineConfig.micro_batches`): while one micro-batch's rows are at the shards, the trunk runs
the other's attention. Rounds alternate the two engines (`--repeats` after a warm-up round), so load on a shared
machine falls on both alike; the table shows medians over rounds. With several trunks every trunk runs the same
prompts: the trunks then step in lockstep by construction (the bench drives each trunk's engines itself, not
through herd.engine.trunk_group, to time the two schedules apart), and the table shows trunk 0's times (each
trunk's are printed to stderr).

Per decode step (the steps after every sequence has its first token): wall time; the trunk's wait for the shards
(TransportStats.wait_s: shard time the trunk did not hide); and the overlapped share = 1 - wait with ping-pong /
wait with whole steps, the part of the exposed shard time that ping-pong hid. On this machine every rank (the trunk
and each shard) shares 2 cores, so the shards' compute and the trunk's attention cannot truly run at once: expect
little or no gain here; the number to carry to a GPU cluster is how much of the wait the schedule hides.

Checks (exit 1 when one fails): ping-pong gives the whole steps' tokens, every round, on every trunk.

    .venv/bin/python bench/ping_pong.py [--preset scout|maverick] [--hidden-size 512] [--intermediate-size 512]
                                        [--intermediate-size-mlp 1024] [--layers 4] [--head-dim 64]
                                        [--trunks 2] [--shards 2] [--micro-batches 2] [--sequences 32]
                                        [--prompt-tokens 32] [--output-tokens 17] [--repeats 5] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common and tests' shard processes

from bench.common import machine, parse_args_with_smoke, print_command
from bench.lora import add_width_arguments, make_prompts, wide_checkpoint
from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.model import load_config, load_model
from herd.model.tokenizer import Tokenizer
from herd.workers.dispatch import ExpertDispatcher
from herd.workers.placement import place_experts
from herd.workers.transport import TransportStats
from tests.integration.workers.shard_processes import CollectiveShards

TABLE_HEADER = ("| schedule | sequences | decode steps | step ms (median) | shard wait ms / step | overlapped share "
                "| vs whole steps |")


@dataclass
class Schedule:
    name: str
    engine: LLMEngine
    stats: TransportStats
    step_s: list[float] = field(default_factory=list)  # each round's median decode step
    wait_s: list[float] = field(default_factory=list)  # each round's wait for the shards per decode step
    steps: int = 0
    tokens: list[list[int]] = field(default_factory=list)

    def run(self, prompts: list[list[int]], params: SamplingParams) -> None:
        engine = self.engine
        ids = [engine.add_request(p, params) for p in prompts]
        final: dict[str, list[int]] = {}
        started: set[str] = set()
        while len(started) < len(ids):  # prefill until every sequence has sampled once
            for out in engine.step():
                started.update([out.request_id] if out.delta_token_ids else [])
                if out.finished:
                    final[out.request_id] = out.token_ids
        durations: list[float] = []
        waited = self.stats.wait_s
        while engine.has_unfinished():
            start = time.perf_counter()
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out.token_ids
            durations.append(time.perf_counter() - start)
        self.steps = len(durations)
        self.step_s.append(statistics.median(durations))
        self.wait_s.append((self.stats.wait_s - waited) / max(1, len(durations)))
        tokens = [final[rid] for rid in ids]
        if self.tokens and tokens != self.tokens:
            raise RuntimeError(f"{self.name}: greedy tokens changed between rounds")
        self.tokens = tokens


def table(whole: Schedule, split: Schedule, sequences: int) -> str:
    lines = [TABLE_HEADER, "|---|---:|---:|---:|---:|---:|---:|"]
    wait_whole = statistics.median(whole.wait_s)
    for schedule in (whole, split):
        wait = statistics.median(schedule.wait_s)
        share = "" if schedule is whole else f"{1 - wait / wait_whole:.0%}" if wait_whole else "n/a"
        ratios = [w / s for w, s in zip(whole.step_s, schedule.step_s, strict=True)]
        step_ms = statistics.median(schedule.step_s) * 1e3
        lines.append(f"| {schedule.name} | {sequences} | {schedule.steps} | {step_ms:.2f} | {wait * 1e3:.2f} | {share} "
                     f"| {statistics.median(ratios):.2f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_width_arguments(parser)
    parser.add_argument("--trunks", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=17)
    parser.add_argument("--repeats", type=int, default=5)
    return parse_args_with_smoke(parser, argv, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                                 head_dim=16, sequences=4, prompt_tokens=8, output_tokens=4, repeats=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_command("ping_pong.py")
    print(machine())
    os.environ["OMP_NUM_THREADS"] = "1"  # the shard processes started below: every rank shares the cores
    with tempfile.TemporaryDirectory() as tmp:
        path = wide_checkpoint(Path(tmp) / "wide", args)
        text = load_config(path).text
        placement = place_experts(text.num_local_experts, args.shards)
        specs = [f"{owned[0]}:{owned[-1] + 1}" for owned in placement.shard_experts]
        prompts = make_prompts(args.sequences, args.prompt_tokens, text.vocab_size, seed=0)
        params = SamplingParams(temperature=0, max_tokens=args.output_tokens, ignore_eos=True)
        tokenizer = Tokenizer.from_pretrained(path)
        config = dict(kv_cache_mb=64, max_num_seqs=args.sequences, max_num_batched_tokens=4096)
        with CollectiveShards(path, specs, trunks=args.trunks) as shards:
            trunks: list[tuple[Schedule, Schedule]] = []
            for transport in shards.transports:
                trunk = load_model(path, experts=(), progress=False)
                ExpertDispatcher(placement, transport).attach(trunk)
                whole = Schedule("whole steps", LLMEngine(trunk, tokenizer, EngineConfig(**config)), transport.stats)
                split = Schedule(f"ping-pong, {args.micro_batches} micro-batches", LLMEngine(
                    trunk, tokenizer, EngineConfig(**config, micro_batches=args.micro_batches)), transport.stats)
                trunks.append((whole, split))
            for round_ in range(args.repeats + 1):  # round 0 warms up and is dropped
                for index in (0, 1) if round_ % 2 else (1, 0):
                    in_lockstep([pair[index] for pair in trunks], prompts, params)
                if round_ == 0:
                    for schedule in (s for pair in trunks for s in pair):
                        schedule.step_s.clear()
                        schedule.wait_s.clear()
                print(f"round {round_}/{args.repeats} done", file=sys.stderr)
    for rank, (whole, split) in enumerate(trunks):
        print(f"trunk {rank}:\n{table(whole, split, args.sequences)}", file=sys.stderr)
    print(f"\n{args.preset}, H {args.hidden_size}, {args.layers} layers, {text.num_local_experts} experts on "
          f"{args.shards} shard processes (collective, gloo), {args.trunks} trunk(s) in this process, torch threads "
          f"{torch.get_num_threads()}\n")
    whole, split = trunks[0]
    print(table(whole, split, args.sequences))
    if any(s.tokens != w.tokens or w.tokens != trunks[0][0].tokens for w, s in trunks):
        print("\nFAILED: ping-pong (or another trunk) changed the tokens")
        return 1
    print(f"\nping-pong gives the whole steps' tokens ({len(whole.tokens)}/{len(whole.tokens)} sequences"
          f"{', on every trunk' if len(trunks) > 1 else ''})")
    return 0


def in_lockstep(schedules: list[Schedule], prompts: list[list[int]], params: SamplingParams) -> None:
    """Run each trunk's schedule on the same prompts at once, a thread each; the first error is raised."""
    errors: list[BaseException] = []

    def run(schedule: Schedule) -> None:
        try:
            schedule.run(prompts, params)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(schedule,)) for schedule in schedules]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


if __name__ == "__main__":
    sys.exit(main())
