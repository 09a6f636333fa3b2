"""Decode throughput with a JSON-schema constraint against the same requests unconstrained, on the tiny Scout.

One run, one engine, the same batch both ways: `--batch` requests of one short prompt each, sampled at temperature
1 with fixed seeds, `--max-tokens` each. Constrained, every request carries the same JSON schema: an object with a
list of at least 64 records whose strings and numbers are unbounded, so the random model's output runs to
max_tokens rather than completing early. The two are timed in turn (a, b, a, b, ...; medians) so the shared
machine's load falls on both alike. Output tok/s counts the tokens each run produced. The constrained run's extra
cost is filling the batch's token masks (llguidance, on the mask thread while the forward runs) and applying them
in the sampler; the table also shows the mask fill per step and the schema's first compile. Target (issue 22):
constrained >= 0.8x of unconstrained at batch 32.

    .venv/bin/python bench/structured_output.py [--batch 32] [--max-tokens 64] [--async-scheduling] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common from a checkout

from bench.common import interleaved_medians, machine, parse_args_with_smoke, print_command, tiny_checkpoint
from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.grammar_mask import MaskFiller
from herd.engine.structured_output import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "records": {"type": "array", "minItems": 64, "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "score": {"type": "number"}, "tags": {
                "type": "array", "items": {"type": "string"}}},
            "required": ["name", "score", "tags"], "additionalProperties": False}},
        "summary": {"type": "string"},
    },
    "required": ["records", "summary"], "additionalProperties": False,
}
PROMPT = [1, *range(5, 37)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--async-scheduling", action="store_true", help="the overlapped engine step")
    parser.add_argument("--budget-s", type=float, default=40.0, help="timing budget of the interleaved runs")
    parser.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "herd-bench-scout")
    args = parse_args_with_smoke(parser, batch=4, max_tokens=8, budget_s=0.0)
    print_command("structured_output.py")
    print(machine())
    engine = LLMEngine.from_pretrained(tiny_checkpoint(args.checkpoint), EngineConfig(
        kv_cache_mb=64, max_num_seqs=max(args.batch, 1), async_scheduling=args.async_scheduling))
    structured = StructuredOutput.json_schema(SCHEMA)
    start = time.perf_counter()
    engine.grammars.start(structured)
    compile_ms = (time.perf_counter() - start) * 1e3

    def batch(constrained: bool) -> list[SamplingParams]:
        return [SamplingParams(temperature=1.0, seed=seed, max_tokens=args.max_tokens,
                               structured=structured if constrained else None, ignore_eos=not constrained)
                for seed in range(args.batch)]

    tokens = {False: 0, True: 0}

    def run(constrained: bool) -> None:
        outs = engine.generate([PROMPT] * args.batch, batch(constrained))
        tokens[constrained] = sum(len(out.token_ids) for out in outs)

    plain_s, constrained_s = interleaved_medians([lambda: run(False), lambda: run(True)], budget_s=args.budget_s,
                                                 min_runs=3 if not args.smoke else 1)
    fill_ms = _mask_fill_ms(engine, structured, args.batch)
    plain_tps, constrained_tps = tokens[False] / plain_s, tokens[True] / constrained_s
    print()
    print("| run | batch | output tokens | wall s (median) | output tok/s | vs unconstrained |")
    print("|---|---|---|---|---|---|")
    print(f"| unconstrained | {args.batch} | {tokens[False]} | {plain_s:.3f} | {plain_tps:.1f} | 1.00 |")
    print(f"| JSON schema | {args.batch} | {tokens[True]} | {constrained_s:.3f} | {constrained_tps:.1f} | "
          f"{constrained_tps / plain_tps:.2f} |")
    print()
    print(f"mask fill for {args.batch} rows: {fill_ms:.3f} ms per step (median); schema's first compile "
          f"{compile_ms:.1f} ms; scheduling {'async' if args.async_scheduling else 'sync'}")


def _mask_fill_ms(engine: LLMEngine, structured: StructuredOutput, rows: int) -> float:
    """Median time to fill `rows` fresh grammars' masks in one batched call."""
    filler = MaskFiller(engine.grammars.vocab_size)
    grammars = [engine.grammars.start(structured) for _ in range(rows)]
    times = []
    for _ in range(50):
        start = time.perf_counter()
        filler.fill(grammars)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


if __name__ == "__main__":
    main()
