"""What context parallelism costs a long sequence (issue 28): one engine against two trunks sharing their global blocks.

The same long prompt (`--context` tokens, then `--output-tokens` greedy ones) runs three ways, on a tiny checkpoint
widened as bench/lora.py widens it (experts in the trunk: this measures attention and the trunks' exchange, not the
shards):
- one engine with room for the whole sequence (the baseline);
- two trunks (threads of this process, linked over a gloo group) with context parallelism on and room at home: the
  sequence stays on one trunk, and every global layer still exchanges headers with the other (lockstep's cost);
- the same two trunks with caches of about half the sequence's global blocks each: the rest lives on the other
  trunk, and every global layer ships the new token's k/v there, asks for its partial attention and merges.
Rounds alternate the order (`--repeats` after a warm-up round); the table shows medians over rounds of the prefill's
wall time and the median decode step, and each one's ratio to the baseline's in the same round. On this 2-core
machine both trunks share the cores, so the spread sequence's peer attention does not run beside anything: the
ratio is the exchange's cost here, not on a GPU pair.

A second table shows the host's cost of planning a spread sequence's step at long contexts (`--plan-contexts`, up to
10M tokens): the incremental index (herd.engine.spread_index) against walking the whole block table.

Checks (exit 1 when one fails): the three give the same tokens, every round; the spread run's sequence really held
blocks on the other trunk.

    .venv/bin/python bench/context_parallel.py [--preset scout|maverick] [--hidden-size 512] [--layers 4] ...
                                               [--context 2048] [--output-tokens 32] [--repeats 5]
                                               [--plan-contexts 65536 1048576 10485760] [--plan-steps 64] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common

from bench.common import machine, parse_args_with_smoke, print_command
from bench.lora import add_width_arguments, make_prompts, wide_checkpoint
from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.block_pool import BlockPool
from herd.engine.kv_cache_manager import FULL
from herd.engine.paged_kv import bytes_per_block
from herd.engine.sequence import Sequence
from herd.engine.shared_blocks import SharedBlocks
from herd.engine.spread_index import SpreadIndex
from herd.engine.trunk_group import TrunkGroup
from herd.model import load_config
from herd.model.config import TextConfig
from herd.workers.collective import CollectiveGroup, open_rendezvous

TABLE_HEADER = ("| run | context | global blocks on the peer | prefill s | decode step ms (median) | "
                "step time vs one engine |")
STEP_TOKENS = 512


@dataclass
class Run:
    name: str
    engine: LLMEngine | TrunkGroup
    prefill_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    lent: int = 0  # most global blocks the other trunk held
    tokens: list[int] = field(default_factory=list)

    def run(self, prompt: list[int], params: SamplingParams) -> None:
        engine = self.engine
        start = time.perf_counter()
        rid = engine.add_request(prompt, params)
        steps: list[float] = []
        final: list[int] | None = None
        first = None
        while engine.has_unfinished():
            began = time.perf_counter()
            for out in engine.step():
                first = first or (time.perf_counter() if out.delta_token_ids else None)
                final = out.token_ids if out.finished and out.request_id == rid else final
            if first is not None and began > first:
                steps.append(time.perf_counter() - began)
            if isinstance(engine, TrunkGroup):
                self.lent = max(self.lent, engine.engines[1].stats().kv_blocks_used[FULL])
        assert final is not None and first is not None
        self.prefill_s.append(first - start)
        self.step_s.append(statistics.median(steps))
        if self.tokens and final != self.tokens:
            raise RuntimeError(f"{self.name}: greedy tokens changed between rounds")
        self.tokens = final


def kv_mb(text: TextConfig, config: dict[str, object], full_blocks: int) -> float:
    """The kv_cache_mb whose layout gives the global group `full_blocks` blocks (and the chunked windows)."""
    step = bytes_per_block(text, EngineConfig().block_size, EngineConfig().dtype)[FULL] / 2**20

    def blocks(mb: float) -> int:
        try:
            return EngineConfig(**config, kv_cache_mb=mb).kv_layout(text).num_blocks[FULL]
        except ValueError:  # too small for one sequence
            return -1

    mb = step * full_blocks
    while blocks(mb) < full_blocks:
        mb += step
    while blocks(mb) > full_blocks:
        mb -= step
    return mb


def linked(trunks: int) -> list[CollectiveGroup]:
    store, rendezvous = open_rendezvous("127.0.0.1", trunks, backend="gloo", timeout_s=300)
    with ThreadPoolExecutor(trunks) as pool:
        return list(pool.map(lambda r: CollectiveGroup(rendezvous, r, store=store if r == 0 else None), range(trunks)))


def table(runs: list[Run], context: int) -> str:
    base = runs[0]
    lines = [TABLE_HEADER, "|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        ratio = statistics.median(r / b for r, b in zip(run.step_s, base.step_s, strict=True))
        lines.append(f"| {run.name} | {context} | {run.lent} | {statistics.median(run.prefill_s):.2f} | "
                     f"{statistics.median(run.step_s) * 1e3:.2f} | {ratio:.2f}x |")
    return "\n".join(lines)


PLAN_HEADER = "| context tokens | global blocks | index, per decode step (us, median) | whole-table walk (ms, median) |"


def planning_table(contexts: list[int], steps: int) -> str:
    """The host's cost of knowing where a spread sequence's blocks are, per decode step: the index (what changed)
    against walking the whole table (what planning did before it), for sequences half on each of 2 trunks."""
    block = EngineConfig().block_size
    lines = [PLAN_HEADER, "|---:|---:|---:|---:|"]
    for context in contexts:
        blocks = -(-context // block)
        shared = SharedBlocks([BlockPool(blocks // 2 + steps + 1) for _ in range(2)])
        view = shared.view(0)
        table: list[int | None] = [view.allocate() for _ in range(blocks)]
        index = SpreadIndex(view, block, torch.device("cpu"))
        seq = Sequence(request_id="long", prompt_ids=[1] * context, params=SamplingParams())
        index.blocks(seq, table)  # the first time walks it all, once
        indexed, walked = [], []
        for step in range(steps):
            if step % block == 0:
                table.append(view.allocate())  # a decode fills a block every `block` steps
            start = time.perf_counter()
            index.blocks(seq, table)
            indexed.append(time.perf_counter() - start)
            start = time.perf_counter()
            [view.holder(b) for b in table]  # type: ignore[arg-type]  # the walk the index replaces
            walked.append(time.perf_counter() - start)
        lines.append(f"| {context} | {blocks} | {statistics.median(indexed) * 1e6:.1f} | "
                     f"{statistics.median(walked) * 1e3:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_width_arguments(parser)
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens of the long sequence")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plan-contexts", type=int, nargs="+", default=[65536, 1048576, 10485760],
                        help="contexts whose per-step planning cost the second table shows")
    parser.add_argument("--plan-steps", type=int, default=64)
    return parse_args_with_smoke(parser, argv, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                                 head_dim=16, context=96, output_tokens=4, repeats=1, plan_contexts=[4096],
                                 plan_steps=4)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_command("context_parallel.py")
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        path = wide_checkpoint(Path(tmp) / "wide", args)
        text = load_config(path).text
        length = args.context + args.output_tokens + 1
        block = EngineConfig().block_size
        # No prefix caching: every round computes the whole prompt.
        base: dict[str, object] = dict(max_num_seqs=1, max_num_batched_tokens=STEP_TOKENS, max_model_len=length,
                                       enable_prefix_caching=False)
        roomy = kv_mb(text, base, -(-length // block) + 1)
        tight = kv_mb(text, {**base, "context_parallel": 2}, -(-length // block) // 2 + 1)

        def group(mb: float) -> TrunkGroup:
            links = linked(2)
            config = EngineConfig(**base, kv_cache_mb=mb, context_parallel=2)
            return TrunkGroup([LLMEngine.from_pretrained(path, config) for _ in links], links=links)

        runs = [Run("one engine", LLMEngine.from_pretrained(path, EngineConfig(**base, kv_cache_mb=roomy))),
                Run("2 trunks, CP, all at home", group(roomy)),
                Run("2 trunks, CP, spread over both", group(tight))]
        (prompt,) = make_prompts(1, args.context, text.vocab_size, seed=0)
        params = SamplingParams(temperature=0, max_tokens=args.output_tokens, ignore_eos=True)
        order: list[Callable[[], None]] = [lambda r=run: r.run(prompt, params) for run in runs]  # type: ignore[misc]
        for round_ in range(args.repeats + 1):  # round 0 warms up and is dropped
            for call in order if round_ % 2 else order[::-1]:
                call()
            if round_ == 0:
                for run in runs:
                    run.prefill_s.clear()
                    run.step_s.clear()
            print(f"round {round_}/{args.repeats} done", file=sys.stderr)
        for run in runs:
            if isinstance(run.engine, TrunkGroup):
                run.engine.close()
    print(f"\n{args.preset}, H {args.hidden_size}, {args.layers} layers, experts in the trunk, 2 trunks over gloo "
          f"in this process, torch threads {torch.get_num_threads()}\n")
    print(table(runs, args.context))
    if any(run.tokens != runs[0].tokens for run in runs):
        print("\nFAILED: context parallelism changed the tokens")
        return 1
    if runs[2].lent == 0 or runs[1].lent != 0:
        print("\nFAILED: the spread run held nothing on the other trunk (or the roomy one did)")
        return 1
    print(f"\nall three give the same {len(runs[0].tokens)} tokens; the spread sequence held {runs[2].lent} global "
          "blocks on the other trunk\n")
    print(planning_table(args.plan_contexts, args.plan_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
