"""Speculative decoding on the tiny Scout: prompt lookup (ngram) and an EAGLE-3 head against plain decoding, in one
run, at batch 1 and 8. Output tok/s per sequence, acceptance length (tokens made per verifying step) and the extra
time a step costs.

The workload is copy-heavy: each prompt holds a document and then the document's first line again, and the answer
repeats the document (as in editing and rewriting prompts). A random tiny model does not copy what it read, so the
target here is the tiny Scout with its global-attention layers' output projections zeroed: its next token then
depends only on the current 16-token attention chunk, and a document made of its own greedy continuation of a
16-token seed, followed by the seed at a chunk boundary, is continued by the document again, token for token.
Every run (plain, ngram, eagle3) uses that same target; the tokens are identical across them (checked here).

The EAGLE-3 head is `herd make-tiny --eagle3`'s random one: it drafts almost nothing the target accepts, so its
row shows the cost of drafting and verifying (k adapts down to 1 draft a step) against nothing gained.
Runs are interleaved (plain, ngram, eagle3, plain, ...) and their medians compared. Target (issue 24): ngram >= 1.5x
plain at batch 1.

    .venv/bin/python bench/speculative.py [--max-tokens 128] [--num-tokens 4] [--budget-s 60] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common from a checkout

import torch

from bench.common import interleaved_medians, machine, parse_args_with_smoke, print_command, tiny_checkpoint
from herd.engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from herd.engine.speculative.config import SpeculativeConfig
from herd.model.llama4 import Llama4Model
from herd.model.tiny_eagle3 import make_tiny_eagle3

SEED_TOKENS = 16  # one attention chunk of the tiny model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens each answer runs to (a multiple of 16)")
    parser.add_argument("--num-tokens", type=int, default=4, help="drafts per step at most (k)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budget-s", type=float, default=60.0, help="timing budget of each batch's runs")
    parser.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "herd-bench-scout")
    args = parse_args_with_smoke(parser, max_tokens=32, batches=[1, 2], budget_s=0.0)
    print_command("speculative.py")
    print(machine())
    path = tiny_checkpoint(args.checkpoint)
    head = path / "eagle3" if (path / "eagle3" / "config.json").exists() else make_tiny_eagle3(path)
    methods = {"plain": None,
               "ngram": SpeculativeConfig(method="ngram", num_tokens=args.num_tokens),
               "eagle3": SpeculativeConfig(method="eagle3", num_tokens=args.num_tokens, draft_path=str(head))}
    engines = {name: _engine(path, config, max(args.batches)) for name, config in methods.items()}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    documents = _documents(engines["plain"], max(args.batches), args.max_tokens)
    rows = []
    for batch in args.batches:
        prompts = [document + document[:SEED_TOKENS] for document in documents[:batch]]
        outputs: dict[str, list[RequestOutput]] = {}

        def run(name: str, prompts: list[list[int]] = prompts,
                outputs: dict[str, list[RequestOutput]] = outputs) -> None:
            outputs[name] = engines[name].generate(prompts, params)

        seconds = interleaved_medians([lambda name=name: run(name) for name in methods], budget_s=args.budget_s,
                                      min_runs=1 if args.smoke else 3)
        for name in methods:
            if [o.token_ids for o in outputs[name]] != [o.token_ids for o in outputs["plain"]]:
                raise SystemExit(f"{name} at batch {batch} gave other tokens than plain decoding")
        plain_s = seconds[0]
        for name, wall in zip(methods, seconds, strict=True):
            outs = outputs[name]
            tokens = sum(len(o.token_ids) for o in outs)
            steps = sum(o.verify_steps for o in outs)
            length = 1 + sum(o.accepted_tokens for o in outs) / steps if steps else 1.0
            rows.append(f"| {name} | {batch} | {tokens} | {wall:.3f} | {tokens / batch / wall:.1f} | "
                        f"{plain_s / wall:.2f} | {length:.2f} | {wall / (tokens / batch) * 1e3:.2f} |")
    print()
    print("| method | batch | output tokens | wall s (median) | tok/s per sequence | vs plain | acceptance length | "
          "ms per token |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def _engine(path: Path, speculative: SpeculativeConfig | None, batch: int) -> LLMEngine:
    engine = LLMEngine.from_pretrained(path, EngineConfig(kv_cache_mb=64, max_num_seqs=batch,
                                                          speculative=speculative))
    _copying(engine.model)
    return engine


def _copying(model: Llama4Model) -> None:
    """Zero the global-attention layers' output projections: the next token then depends on the current chunk."""
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            if model.config.chunk_size(index) is None:
                layer.self_attn.o_proj.weight.zero_()


def _documents(engine: LLMEngine, count: int, length: int) -> list[list[int]]:
    """`count` documents: a random 16-token seed and the target's greedy continuation of it, `length` tokens."""
    g = torch.Generator().manual_seed(0)
    seeds = [torch.randint(5, 400, (SEED_TOKENS,), generator=g).tolist() for _ in range(count)]
    params = SamplingParams(temperature=0, max_tokens=length, ignore_eos=True)
    return [seed + out.token_ids for seed, out in zip(seeds, engine.generate(seeds, params), strict=True)]


if __name__ == "__main__":
    main()
