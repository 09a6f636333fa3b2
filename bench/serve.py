"""Serving throughput and latency on the tiny Scout checkpoint: `herd serve` against `transformers serve`,
and herd's engine offline on the same requests as the ceiling for serving overhead. CPU, float32, greedy.

One run, three systems, the same requests for each:

- `transformers serve`, forced on the checkpoint. It cannot load the checkpoint as written, so it is given a
  text-only view: a folder of symlinks to the same files whose config.json is the checkpoint's text_config
  with architecture Llama4ForCausalLM (transformers maps the `language_model.` weights onto it; same weights,
  same tokenizer and chat template), and without preprocessor_config.json (see `hf_text_view`). It loads
  every model with a device_map, which needs `accelerate` (and psutil), the `transformers[serving]` extra:
  they are looked for in the venv and in --hf-extra-path; without them it is reported as not measured. Its
  default generation is sequential (`--continuous-batching` refuses Llama 4's chunked_attention layers in
  5.24). It has no ignore_eos; `min_new_tokens = max_tokens` (through its `generation_config` request
  field) makes every request produce exactly max_tokens, as herd's ignore_eos does.
- `herd serve` with API keys on, as a user runs it: a fresh tenancy database in a temporary folder, a
  tenant and key made through its admin API, every request sent with that key (bench.common.HerdServe);
  `ignore_eos: true`. `--herd-args` adds flags (e.g. `--shards 0`).
- herd's `LLMEngine` offline: every request of the highest level's workload rendered with `render_chat`
  (as the chat endpoint does) and run by `generate` at once, max_num_seqs = the highest concurrency, so it
  is what serving at that concurrency could reach with no HTTP, no streaming and no queueing.

Each concurrency level has its own workload (seed + i for level i), the same for every system, so no level
reuses another's prompts through a prefix cache. Every server gets a few warm-up requests first (not
counted). Targets (issue "serving load generator"): herd serve >= 2x transformers serve output tok/s at 8 and
>= 4x at 32, with lower p50 TTFT; herd serve at 32 >= 0.7x the offline engine's output tok/s. Exits 1 when a
request failed or a server did not come up (a missing accelerate only notes it), so a broken benchmark fails
its --smoke run in make test.

    .venv/bin/python bench/serve.py [--requests 64] [--concurrency 1 8 32] [--seed 0] [--plot docs/serve_bench.png]
                                    [--checkpoint DIR] [--herd-args "--shards 0"] [--skip transformers herd offline]
                                    [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common from a checkout

from bench.common import (
    ROOT,
    HerdServe,
    ServerError,
    ServerProcess,
    free_port,
    parse_args_with_smoke,
    tiny_checkpoint,
)
from herd_loadgen import LoadResult, Request, make_workload, plot, run_load, table_header, table_row

VENV_BIN = Path(sys.executable).parent
DEFAULT_PLOT = ROOT / "docs" / "serve_bench.png"


class MissingDependency(ServerError):
    """A server cannot run here for want of an optional package: noted, not a failure."""


def hf_text_view(checkpoint: Path, out: Path) -> Path:
    """Symlinks to the checkpoint's files, with config.json replaced by its text_config as a Llama4ForCausalLM
    and without the image processor's config.

    `transformers serve` loads a processor with AutoProcessor, which follows preprocessor_config.json (make-tiny
    writes one since the checkpoint serves images) to Llama4Processor and its Llama4ImageProcessorFast; that
    needs torchvision, which neither Herd nor this venv installs, so the server exits at start. A text-only
    model needs no image processor: without the file AutoProcessor falls back to the tokenizer, as it did
    before make-tiny wrote it. transformers' multimodal Llama4ForConditionalGeneration would need it anyway."""
    out.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        if f.name not in ("config.json", "preprocessor_config.json", "processor_config.json"):
            (out / f.name).symlink_to(f.resolve())
    raw = json.loads((checkpoint / "config.json").read_text())
    text = dict(raw.get("text_config", raw), architectures=["Llama4ForCausalLM"], model_type="llama4_text")
    (out / "config.json").write_text(json.dumps(text, indent=2))
    return out


def hf_env(extra_path: Path) -> dict[str, str]:
    """Environment for `transformers serve`; MissingDependency when accelerate or psutil cannot be imported."""
    env = dict(os.environ)
    if extra_path.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH")) if p)
    probe = subprocess.run([sys.executable, "-c", "import accelerate, psutil"], env=env, capture_output=True,
                           text=True)
    if probe.returncode:
        missing = probe.stderr.strip().splitlines()[-1]
        raise MissingDependency(f"transformers serve loads models with a device_map, which needs accelerate and "
                                f"psutil (the transformers[serving] extra): {missing}. Install them with "
                                f"`.venv/bin/pip install --target {extra_path} --no-deps accelerate psutil` (or into "
                                "the venv)")
    return env


def model_id(url: str, default: str, api_key: str | None = None) -> str:
    """The first model the server lists, else `default`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        data = httpx.get(f"{url}/v1/models", headers=headers, timeout=5).json()["data"]
        return str(data[0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return default


def drive(url: str, model: str, workloads: dict[int, list[Request]], extra: Callable[[Request], dict[str, Any]],
          args: argparse.Namespace, system: str, api_key: str | None = None) -> dict[int, LoadResult]:
    """Warm-up, then one load run per concurrency level; prints each row as it ends."""
    warmup = make_workload(args.warmup, seed=args.seed + 1000, prompt_words=(8, 16), max_tokens=(4, 8))
    asyncio.run(run_load(url, model, warmup, concurrency=1, api_key=api_key, timeout_s=args.timeout_s,
                         extra_body=extra))
    results = {}
    for concurrency, workload in workloads.items():
        results[concurrency] = asyncio.run(run_load(url, model, workload, concurrency=concurrency, api_key=api_key,
                                                    timeout_s=args.timeout_s, extra_body=extra))
        print(table_row(system, results[concurrency].summary()), file=sys.stderr, flush=True)
        for line in results[concurrency].errors()[:3]:
            print(f"  {system} at {concurrency}: {line}", file=sys.stderr)
    return results


def run_transformers(checkpoint: Path, workloads: dict[int, list[Request]], args: argparse.Namespace,
                     tmp: Path) -> dict[int, LoadResult]:
    env = hf_env(args.hf_extra_path)
    view = hf_text_view(checkpoint, tmp / "hf-text-view")
    port = free_port()
    cmd = [str(VENV_BIN / "transformers"), "serve", str(view), "--device", "cpu", "--dtype", "float32", "--host",
           "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with ServerProcess("transformers serve", cmd, url=f"http://127.0.0.1:{port}", env=env,
                       log=args.log_dir / "transformers_serve.log", ready_path="/v1/models",
                       ready_timeout_s=args.ready_timeout_s) as server:
        def extra(r: Request) -> dict[str, Any]:
            return {"generation_config": json.dumps({"min_new_tokens": r.max_tokens})}

        return drive(server.url, model_id(server.url, str(view)), workloads, extra, args, "transformers serve")


def run_herd(checkpoint: Path, workloads: dict[int, list[Request]], args: argparse.Namespace,
             tmp: Path) -> dict[int, LoadResult]:
    flags = ["--model", str(checkpoint), *shlex.split(args.herd_args)]
    with HerdServe(tmp / "herd", args=flags, log=args.log_dir / "herd_serve.log",
                   ready_timeout_s=args.ready_timeout_s) as server:
        return drive(server.url, model_id(server.url, checkpoint.name, server.api_key), workloads,
                     lambda r: {"ignore_eos": True}, args, "herd serve", api_key=server.api_key)


def run_offline(checkpoint: Path, workload: list[Request], max_num_seqs: int) -> dict[str, Any]:
    from herd.engine import EngineConfig, LLMEngine, SamplingParams
    from herd.model.chat_template import render_chat

    engine = LLMEngine.from_pretrained(checkpoint, EngineConfig(max_num_seqs=max_num_seqs))
    texts = [render_chat([{"role": "user", "content": r.prompt}]) for r in workload]
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in workload]
    warm = make_workload(2, seed=10_000, prompt_words=(8, 16), max_tokens=(4, 8))
    engine.generate([render_chat([{"role": "user", "content": r.prompt}]) for r in warm],
                    SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    start = time.perf_counter()
    outputs = engine.generate(texts, params)
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"concurrency": f"all {len(workload)} (batch <= {max_num_seqs})", "requests": len(workload), "errors": 0,
            "output_tokens": tokens, "wall_s": wall, "output_tok_per_s": tokens / wall}


def target_checks(results: dict[str, dict[int, LoadResult]], offline: dict[str, Any] | None) -> list[str]:
    herd, hf = results.get("herd serve", {}), results.get("transformers serve", {})
    lines = []
    for level, factor in ((8, 2.0), (32, 4.0)):
        if level in herd and level in hf:
            h, t = herd[level].summary(), hf[level].summary()
            ratio = h["output_tok_per_s"] / t["output_tok_per_s"] if t["output_tok_per_s"] else float("inf")
            lines.append(f"- herd serve >= {factor:.0f}x transformers serve output tok/s at {level}: "
                         f"{h['output_tok_per_s']:.1f} vs {t['output_tok_per_s']:.1f} = {ratio:.2f}x: "
                         f"{'PASS' if ratio >= factor else 'FAIL'}")
            both = h["ttft_p50_ms"] is not None and t["ttft_p50_ms"] is not None
            lower = both and h["ttft_p50_ms"] < t["ttft_p50_ms"]
            lines.append(f"- herd serve p50 TTFT below transformers serve at {level}: {_ms(h['ttft_p50_ms'])} vs "
                         f"{_ms(t['ttft_p50_ms'])}: {'PASS' if lower else 'FAIL'}")
        else:
            lines.append(f"- herd serve vs transformers serve at {level}: n/a (not both measured)")
    if 32 in herd and offline:
        share = herd[32].summary()["output_tok_per_s"] / offline["output_tok_per_s"]
        lines.append(f"- herd serve at 32 >= 0.7x offline engine output tok/s: {share:.2f}x: "
                     f"{'PASS' if share >= 0.7 else 'FAIL'}")
    else:
        lines.append("- herd serve at 32 >= 0.7x offline engine: n/a (not both measured)")
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / ".herd" / "tiny-scout",
                   help="checkpoint directory; made with make_tiny(preset='scout', seed=0) if it has no config.json")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--seed", type=int, default=0, help="workload seed; level i uses seed + i")
    p.add_argument("--prompt-words", type=int, nargs=2, default=[8, 128], metavar=("LO", "HI"))
    p.add_argument("--max-tokens", type=int, nargs=2, default=[16, 64], metavar=("LO", "HI"))
    p.add_argument("--warmup", type=int, default=3, help="uncounted requests sent to each server first")
    p.add_argument("--timeout-s", type=float, default=900.0, help="connect and per-read timeout of each request")
    p.add_argument("--ready-timeout-s", type=float, default=300.0, help="how long a server may take to come up")
    p.add_argument("--herd-args", default="", help="flags added to `herd serve --model CHECKPOINT`, e.g. '--shards 0'")
    p.add_argument("--hf-extra-path", type=Path, default=ROOT / ".herd" / "hf-serve-deps",
                   help="a pip --target folder with accelerate and psutil for transformers serve, if not in the venv")
    p.add_argument("--skip", nargs="*", choices=["transformers", "herd", "offline"], default=[])
    p.add_argument("--log-dir", type=Path, default=ROOT / ".herd" / "serve-bench-logs")
    p.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    args = parse_args_with_smoke(p, argv, requests=2, concurrency=[1, 2], prompt_words=[4, 8], max_tokens=[4, 4],
                                 warmup=1)
    if args.smoke and args.plot == DEFAULT_PLOT:
        args.plot = args.log_dir / "serve_bench_smoke.png"  # never over the recorded plot
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = sorted(set(args.concurrency))
    checkpoint = tiny_checkpoint(args.checkpoint)
    workloads = {c: make_workload(args.requests, seed=args.seed + i, prompt_words=tuple(args.prompt_words),
                                  max_tokens=tuple(args.max_tokens)) for i, c in enumerate(levels)}
    results: dict[str, dict[int, LoadResult]] = {}
    notes: list[str] = []
    failures: list[str] = []
    load: dict[str, float] = {}  # the 1-minute load average as each system began: others' work skews its numbers
    print(table_header(), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = (("transformers serve", lambda: run_transformers(checkpoint, workloads, args, Path(tmp))),
                ("herd serve", lambda: run_herd(checkpoint, workloads, args, Path(tmp))))
        for system, run in runs:
            if system.split()[0] in args.skip:
                notes.append(f"{system}: skipped (--skip)")
                continue
            load[system] = os.getloadavg()[0]
            try:
                results[system] = run()
            except ServerError as err:
                notes.append(f"{system}: not measured: {err}")
                print(f"{system}: not measured: {err}", file=sys.stderr, flush=True)
                if not isinstance(err, MissingDependency):
                    failures.append(f"{system} did not come up")
    offline = None
    if "offline" not in args.skip:
        load["offline engine"] = os.getloadavg()[0]
        offline = run_offline(checkpoint, workloads[levels[-1]], max_num_seqs=levels[-1])
    failures += [f"{system} at {level}: {result.summary()['errors']} of {len(result.records)} requests failed"
                 for system, by_level in results.items() for level, result in by_level.items() if result.errors()]

    print(f"## Serving benchmark: tiny Scout ({checkpoint}), CPU float32, greedy, {args.requests} requests per "
          f"level, prompts {args.prompt_words[0]}-{args.prompt_words[1]} words, max_tokens "
          f"{args.max_tokens[0]}-{args.max_tokens[1]}, seed {args.seed} (+ level index), {os.cpu_count()} CPUs"
          f"{' (--smoke: sizes too small to mean anything)' if args.smoke else ''}\n")
    print(table_header())
    for system, by_level in results.items():
        for level in sorted(by_level):
            print(table_row(system, by_level[level].summary()))
    if offline:
        print(table_row("herd engine offline", offline))
    print("\nTargets:")
    print("\n".join(target_checks(results, offline)))
    began = ", ".join(f"{system} {value:.2f}" for system, value in load.items())
    notes.append(f"load average (1 min) as each began, on {os.cpu_count()} CPUs: {began}; at the end "
                 f"{os.getloadavg()[0]:.2f}")
    print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    if results:
        ceilings = {f"herd engine offline (batch <= {levels[-1]})": offline["output_tok_per_s"]} if offline else None
        print(f"\nplot: {plot(results, args.plot, ceilings=ceilings)}")
    if failures:
        print(f"\nFAILED (the errors are in the rows above, the servers' logs in {args.log_dir}):\n"
              + "\n".join(f"- {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
