"""Offline serving throughput on the tiny Scout checkpoint: herd's engine versus transformers' `generate`.

One run, same requests for both systems: mixed prompt and output lengths drawn from a fixed seed, every
request arriving at time 0, greedy decoding, EOS ignored (each request produces exactly its own
max_tokens). Both run in float32 on the CPU.

- herd: `LLMEngine` driven through `add_request`/`step` (continuous batching, chunked prefill, paged KV).
- transformers: `Llama4ForCausalLM.generate` on static batches of `--batch-size` requests in arrival
  order, left-padded, each batch run for its longest request's max_tokens. Only each request's own
  max_tokens count as output tokens; the extra tokens of shorter rows are the cost static batching pays.
  transformers' continuous batching (`generate_batch`) is tried on two requests first: 5.24 refuses Llama 4's
  `chunked_attention` layers, so static batches are its best; the report says so if a later version accepts it.

TTFT is measured from time 0 (all requests queued) to the wall time the request's first token exists:
for herd the end of the step that sampled it, for transformers the moment its batch's first token
reaches a streamer. Output tok/s = output tokens / wall time of the whole run. Target (issue "engine
throughput"): herd >= 2x transformers' output tok/s.

Also checks that herd's greedy tokens equal transformers' (batch of 1, no padding) on a few requests,
and reports the KV bytes herd pins for one sequence four chunks long against a keep-every-layer cache.

    .venv/bin/python bench/engine_throughput.py [--requests 200] [--prompt-tokens 8 200]
                                                [--output-tokens 16 64] [--batch-size 16] [--threads N]
                                                [--checkpoint DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import Llama4ForCausalLM, Llama4ForConditionalGeneration
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common from a checkout

from bench.common import machine, parse_args_with_smoke, percentile, print_command, tiny_checkpoint
from herd.engine import EngineConfig, LLMEngine, SamplingParams

PAD_ID = 0  # left padding for transformers' batches; masked out, so any id works
KV_CHUNKS = 4  # the KV-bytes probe: one sequence this many attention chunks long


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class RunResult:
    system: str
    output_tokens: int
    wall_s: float
    ttft_s: list[float]
    token_ids: list[list[int]]


def make_requests(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], token_limit: int, seed: int
) -> list[Request]:
    """Prompt lengths log-uniform over prompt_range (many short, some long), outputs uniform over output_range."""
    rng = random.Random(seed)
    lo, hi = prompt_range
    requests = []
    for _ in range(n):
        length = min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))
        prompt = [rng.randrange(1, token_limit) for _ in range(length)]
        requests.append(Request(prompt, rng.randint(*output_range)))
    return requests


# --- herd ---------------------------------------------------------------------------------------------
def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        kv_cache_mb=args.kv_cache_mib, block_size=16)


def run_herd(engine: LLMEngine, requests: list[Request]) -> RunResult:
    first: dict[str, float] = {}
    final: dict[str, list[int]] = {}
    start = time.perf_counter()
    ids = [
        engine.add_request(r.prompt_ids, SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True),
                           request_id=f"bench-{i}")
        for i, r in enumerate(requests)
    ]
    while len(final) < len(ids):
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.delta_token_ids and out.request_id not in first:
                first[out.request_id] = now - start
            if out.finished:
                final[out.request_id] = out.token_ids
    wall = time.perf_counter() - start
    token_ids = [final[rid] for rid in ids]
    return RunResult("herd LLMEngine", sum(map(len, token_ids)), wall, [first[rid] for rid in ids], token_ids)


def kv_probe(engine: LLMEngine, rng_seed: int, token_limit: int) -> tuple[int, int, int, int, dict[str, int]]:
    """KV bytes of one sequence KV_CHUNKS chunks long, herd versus keep-everything, taken after the step that
    computed its prompt (chunk*KV_CHUNKS - 1 tokens) and sampled its last token: the sequence then spans
    KV_CHUNKS chunks and its next query is still in the last one.
    Returns (herd bytes, full bytes, tokens, computed tokens, blocks held per layer group)."""
    chunk = engine.model.config.attention_chunk_size
    rng = random.Random(rng_seed)
    prompt = [rng.randrange(1, token_limit) for _ in range(chunk * KV_CHUNKS - 1)]
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), request_id="kv")
    seq = engine._requests[rid]
    while not seq.output_ids:
        engine.step()
    held, full, known, computed = (engine.kv.bytes_held(seq), engine.kv.full_cache_bytes(seq.num_known),
                                   seq.num_known, seq.num_computed)
    blocks = engine.kv.blocks_held(seq)
    while engine.has_unfinished():
        engine.step()
    return held, full, known, computed, blocks


# --- transformers ---------------------------------------------------------------------------------------
class FirstTokenClock(BaseStreamer):
    """Records when generate hands out its first new tokens (the first put is the prompt itself)."""

    def __init__(self) -> None:
        self.puts: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def first_token(self) -> float:
        return self.puts[1]


def load_transformers(path: Path) -> Llama4ForCausalLM:
    transformers.logging.set_verbosity_error()  # the tiny checkpoint has no vision weights: that report is noise
    model = Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).language_model.eval()
    # Never stop at EOS (as herd's ignore_eos): every row runs to max_new_tokens, nothing suppresses EOS.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return model


def try_generate_batch(model: Llama4ForCausalLM, requests: list[Request]) -> str | None:
    """transformers' continuous batching on two requests: None if it works, else the error it raised."""
    try:
        model.generate_batch([r.prompt_ids for r in requests[:2]], max_new_tokens=2, do_sample=False)
    except Exception as error:  # whatever it raises is the finding
        return f"{type(error).__name__}: {error}"
    return None


@torch.inference_mode()
def hf_generate(model: Llama4ForCausalLM, batch: list[Request], clock: BaseStreamer | None = None) -> list[list[int]]:
    width = max(len(r.prompt_ids) for r in batch)
    new = max(r.max_tokens for r in batch)
    input_ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        input_ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[row, width - len(r.prompt_ids) :] = 1
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         streamer=clock)
    return [out[row, width : width + r.max_tokens].tolist() for row, r in enumerate(batch)]


def run_transformers(model: Llama4ForCausalLM, requests: list[Request], batch_size: int) -> RunResult:
    ttft: list[float] = []
    token_ids: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        clock = FirstTokenClock()
        token_ids += hf_generate(model, batch, clock)
        ttft += [clock.first_token - start] * len(batch)
    wall = time.perf_counter() - start
    return RunResult(f"transformers generate, static batches of {batch_size}", sum(map(len, token_ids)), wall,
                     ttft, token_ids)


# --- report -------------------------------------------------------------------------------------------
def table(results: list[RunResult], n: int) -> str:
    lines = ["| system | requests | output tokens | wall s | output tok/s | TTFT p50 ms | TTFT p95 ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.system} | {n} | {r.output_tokens} | {r.wall_s:.2f} | {r.output_tokens / r.wall_s:.1f} | "
                     f"{percentile(r.ttft_s, 50) * 1e3:.0f} | {percentile(r.ttft_s, 95) * 1e3:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a Llama 4 checkpoint; default: make_tiny(preset='scout', seed=0)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=(8, 200), metavar=("MIN", "MAX"))
    p.add_argument("--output-tokens", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    p.add_argument("--batch-size", type=int, default=16, help="transformers' static batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-requests", type=int, default=8, help="requests whose herd tokens are checked (batch of 1)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-mib", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch intra-op threads for both systems; default: torch's choice")
    return parse_args_with_smoke(p, argv, requests=6, prompt_tokens=(8, 24), output_tokens=(4, 8), batch_size=3,
                                 check_requests=2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    begun = time.perf_counter()
    print_command("engine_throughput.py")
    print(f"{machine()}, transformers {transformers.__version__}, load average {os.getloadavg()[0]:.2f} "
          "(other processes on these cores skew both systems, herd's many small ops most)")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or tiny_checkpoint(Path(tmp) / "scout")
        engine = LLMEngine.from_pretrained(path, engine_config(args))
        hf = load_transformers(path)
        token_limit = min(engine.tokenizer.special_ids)  # prompts of ordinary tokens only (specials follow them)
        requests = make_requests(args.requests, tuple(args.prompt_tokens), tuple(args.output_tokens), token_limit,
                                 args.seed)
        lengths = [len(r.prompt_ids) for r in requests]
        print(f"{len(requests)} requests, seed {args.seed}: prompt tokens {min(lengths)}..{max(lengths)} "
              f"(median {statistics.median(lengths):.0f}), output tokens "
              f"{args.output_tokens[0]}..{args.output_tokens[1]} (total {sum(r.max_tokens for r in requests)})")

        cb_error = try_generate_batch(hf, requests)
        print("transformers generate_batch (continuous batching):",
              "works, but this bench does not drive it yet" if cb_error is None else f"refused: {cb_error}")

        warm = make_requests(2, (8, 40), (2, 4), token_limit, args.seed + 1)
        run_herd(engine, warm)
        hf_generate(hf, warm)

        herd = run_herd(engine, requests)
        reference = run_transformers(hf, requests, args.batch_size)

        checked = requests[: args.check_requests]
        mismatched = [i for i, r in enumerate(checked) if hf_generate(hf, [r])[0] != herd.token_ids[i]]
        padded_same = sum(a == b for a, b in zip(herd.token_ids, reference.token_ids, strict=True))
        held, full, known, computed, blocks = kv_probe(engine, args.seed + 2, token_limit)

    print()
    print(table([herd, reference], len(requests)))
    ratio = (herd.output_tokens / herd.wall_s) / (reference.output_tokens / reference.wall_s)
    print()
    print(f"herd / transformers output tok/s: {ratio:.2f}x (target >= 2x: {'met' if ratio >= 2 else 'NOT met'})")
    print(f"KV bytes, one sequence {KV_CHUNKS} chunks long ({known} tokens, {computed} computed): herd {held:,} vs "
          f"keep-every-layer {full:,} ({held / full:.3f}x); blocks of {engine.kv.block_size} tokens held per layer "
          f"group: {blocks} of {-(-known // engine.kv.block_size)}")
    print(f"greedy tokens, herd vs transformers batch of 1: {len(checked) - len(mismatched)}/{len(checked)} requests "
          f"identical" + (f"; differ: {mismatched}" if mismatched else ""))
    print(f"greedy tokens, herd vs transformers padded batches: {padded_same}/{len(requests)} requests identical "
          "(transformers 5.24 scales NoPE queries by the padded index, not the position, so left-padded rows drift)")
    print(f"total runtime {time.perf_counter() - begun:.0f} s, load average {os.getloadavg()[0]:.2f}")
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
