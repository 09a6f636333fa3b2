"""Serving throughput and latency on the tiny Scout checkpoint: `herd serve` against `transformers serve`,
and herd's engine offline on the same requests as the ceiling for serving overhead. CPU, float32, greedy.

One run, three systems, the same requests for each:

- `transformers serve`, forced on the checkpoint. It cannot load the checkpoint as written (its
  Llama4ForConditionalGeneration path needs an image processor, which needs torchvision and a
  preprocessor_config.json the text-only checkpoint lacks), so it is given a text-only view: a folder of
  symlinks to the same files whose config.json is the checkpoint's text_config with architecture
  Llama4ForCausalLM (transformers maps the `language_model.` weights onto it; same weights, same tokenizer
  and chat template). It loads every model with a device_map, which needs `accelerate` (and psutil), the
  `transformers[serving]` extra: they are looked for in the venv and in --hf-extra-path. Its default
  generation is sequential (`--continuous-batching` refuses Llama 4's chunked_attention layers in 5.24).
  It has no ignore_eos; `min_new_tokens = max_tokens` (through its `generation_config` request field) makes
  every request produce exactly max_tokens, as herd's ignore_eos does.
- `herd serve` (`--herd-cmd`, a template), with `ignore_eos: true`. Ready when it prints
  `http://127.0.0.1:<port>` and that port answers HTTP.
- herd's `LLMEngine` offline: every request of the highest level's workload rendered with `render_chat`
  (as the chat endpoint does) and run by `generate` at once, max_num_seqs = the highest concurrency, so it
  is what serving at that concurrency could reach with no HTTP, no streaming and no queueing.

Each concurrency level has its own workload (seed + i for level i), the same for every system, so no level
reuses another's prompts through a prefix cache. Every server gets a few warm-up requests first (not
counted). Targets (issue "serving load generator"): herd serve >= 2x transformers serve output tok/s at 8 and
>= 4x at 32, with lower p50 TTFT; herd serve at 32 >= 0.7x the offline engine's output tok/s.

    .venv/bin/python bench/serve.py [--requests 64] [--concurrency 1 8 32] [--seed 0] [--plot docs/serve_bench.png]
                                    [--checkpoint DIR] [--herd-cmd TEMPLATE] [--skip transformers herd offline]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from herd.platform.loadgen import LoadResult, Request, make_workload, plot, run_load, table_header, table_row

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
HERD_CMD = f"{VENV_BIN}/herd serve --model {{model}} --http-port {{http_port}} --grpc-port {{grpc_port}}"
HF_CMD = (f"{VENV_BIN}/transformers serve {{model}} --device cpu --dtype float32 --host 127.0.0.1 "
          f"--port {{http_port}} --log-level warning")
URL_LINE = re.compile(r"http://127\.0\.0\.1:(\d+)")


class ServerError(RuntimeError):
    """A server did not come up; the message says why."""


class Server:
    """One server subprocess: output to a log file, ready when its URL answers, stopped on exit."""

    def __init__(self, name: str, cmd: str, *, env: Mapping[str, str], log: Path, url: str | None,
                 ready_timeout_s: float) -> None:
        self.name, self.cmd, self.log, self.url = name, cmd, log, url
        self._env, self._ready_timeout_s = dict(env), ready_timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._seen_url = threading.Event()

    def __enter__(self) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._proc = subprocess.Popen(shlex.split(self.cmd), cwd=ROOT, env=self._env, text=True, bufsize=1,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except OSError as err:
            raise ServerError(f"{self.name}: cannot start `{self.cmd}`: {err}") from err
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with self.log.open("w") as out:
            for line in self._proc.stdout:
                out.write(line)
                out.flush()
                match = URL_LINE.search(line)
                if match and not self._seen_url.is_set():
                    self.url = self.url or f"http://127.0.0.1:{match.group(1)}"
                    self._seen_url.set()

    def _wait_ready(self) -> None:
        """Until the URL (given, or printed by the server) answers any HTTP below 500 at /health or /v1/models."""
        assert self._proc is not None
        deadline = time.monotonic() + self._ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                time.sleep(0.2)  # let the pump write the last lines
                raise ServerError(f"{self.name} exited with {self._proc.returncode}: {self.reason()}")
            if self.url is not None and self._answers(self.url):
                return
            self._seen_url.wait(0.25)
        raise ServerError(f"{self.name} not ready after {self._ready_timeout_s:.0f} s: {self.reason()}")

    @staticmethod
    def _answers(url: str) -> bool:
        for path in ("/health", "/v1/models"):
            try:
                if httpx.get(url + path, timeout=2).status_code < 500:
                    return True
            except httpx.HTTPError:
                pass
        return False

    def reason(self) -> str:
        """The last line of the log that is not a traceback frame, and where the whole log is."""
        lines = [ln.rstrip() for ln in self.log.read_text(errors="replace").splitlines()] if self.log.exists() else []
        last = [ln for ln in lines if ln and not ln.startswith((" ", "Traceback", "^"))]
        return f"{last[-1] if last else '(no output)'} [log: {self.log}]"

    def model_id(self, default: str) -> str:
        """The first model the server lists, else `default`."""
        try:
            data = httpx.get(f"{self.url}/v1/models", timeout=5).json()["data"]
            return str(data[0]["id"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            return default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_checkpoint(path: Path) -> Path:
    if not (path / "config.json").exists():
        from herd.model.tiny import make_tiny

        make_tiny(path, preset="scout", seed=0)
    return path


def hf_text_view(checkpoint: Path, out: Path) -> Path:
    """Symlinks to every file of the checkpoint, with config.json replaced by its text_config as a
    Llama4ForCausalLM (transformers' multimodal path needs an image processor the checkpoint lacks)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    raw = json.loads((checkpoint / "config.json").read_text())
    text = dict(raw.get("text_config", raw), architectures=["Llama4ForCausalLM"], model_type="llama4_text")
    (out / "config.json").write_text(json.dumps(text, indent=2))
    return out


def hf_env(extra_path: Path) -> tuple[dict[str, str], str | None]:
    """Environment for `transformers serve`, and why it cannot run (None if it can)."""
    env = dict(os.environ)
    if extra_path.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH")) if p)
    probe = subprocess.run([sys.executable, "-c", "import accelerate, psutil"], env=env, capture_output=True,
                           text=True)
    if probe.returncode:
        missing = probe.stderr.strip().splitlines()[-1]
        return env, (f"transformers serve loads models with a device_map, which needs accelerate and psutil (the "
                     f"transformers[serving] extra): {missing}. Install them with `.venv/bin/pip install --target "
                     f"{extra_path} --no-deps accelerate psutil` (or into the venv)")
    return env, None


def drive(url: str, model: str, workloads: dict[int, list[Request]], extra: Callable[[Request], dict[str, Any]],
          args: argparse.Namespace, system: str) -> dict[int, LoadResult]:
    """Warm-up, then one load run per concurrency level; prints each row as it ends."""
    warmup = make_workload(args.warmup, seed=args.seed + 1000, prompt_words=(8, 16), max_tokens=(4, 8))
    asyncio.run(run_load(url, model, warmup, concurrency=1, timeout_s=args.timeout_s, extra_body=extra))
    results = {}
    for concurrency, workload in workloads.items():
        results[concurrency] = asyncio.run(run_load(url, model, workload, concurrency=concurrency,
                                                    timeout_s=args.timeout_s, extra_body=extra))
        print(table_row(system, results[concurrency].summary()), file=sys.stderr, flush=True)
        for line in results[concurrency].errors()[:3]:
            print(f"  {system} at {concurrency}: {line}", file=sys.stderr)
    return results


def run_transformers(checkpoint: Path, workloads: dict[int, list[Request]], args: argparse.Namespace,
                     tmp: Path) -> dict[int, LoadResult]:
    env, missing = hf_env(args.hf_extra_path)
    if missing:
        raise ServerError(missing)
    view = hf_text_view(checkpoint, tmp / "hf-text-view")
    port = free_port()
    cmd = HF_CMD.format(model=shlex.quote(str(view)), http_port=port)
    with Server("transformers serve", cmd, env=env, log=args.log_dir / "transformers_serve.log",
                url=f"http://127.0.0.1:{port}", ready_timeout_s=args.ready_timeout_s) as server:
        def extra(r: Request) -> dict[str, Any]:
            return {"generation_config": json.dumps({"min_new_tokens": r.max_tokens})}

        return drive(server.url or "", server.model_id(str(view)), workloads, extra, args, "transformers serve")


def run_herd(checkpoint: Path, workloads: dict[int, list[Request]], args: argparse.Namespace) -> dict[int, LoadResult]:
    cmd = args.herd_cmd.format(model=shlex.quote(str(checkpoint)), http_port=free_port(), grpc_port=free_port())
    with Server("herd serve", cmd, env=os.environ, log=args.log_dir / "herd_serve.log", url=None,
                ready_timeout_s=args.ready_timeout_s) as server:
        return drive(server.url or "", server.model_id(str(checkpoint)), workloads,
                     lambda r: {"ignore_eos": True}, args, "herd serve")


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


def parse_args() -> argparse.Namespace:
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
    p.add_argument("--herd-cmd", default=HERD_CMD,
                   help="herd's server command; {model}, {http_port} and {grpc_port} are filled in")
    p.add_argument("--hf-extra-path", type=Path, default=ROOT / ".herd" / "hf-serve-deps",
                   help="a pip --target folder with accelerate and psutil for transformers serve, if not in the venv")
    p.add_argument("--skip", nargs="*", choices=["transformers", "herd", "offline"], default=[])
    p.add_argument("--log-dir", type=Path, default=ROOT / ".herd" / "serve-bench-logs")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "serve_bench.png")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    levels = sorted(set(args.concurrency))
    checkpoint = ensure_checkpoint(args.checkpoint)
    workloads = {c: make_workload(args.requests, seed=args.seed + i, prompt_words=tuple(args.prompt_words),
                                  max_tokens=tuple(args.max_tokens)) for i, c in enumerate(levels)}
    results: dict[str, dict[int, LoadResult]] = {}
    notes: list[str] = []
    print(table_header(), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = (("transformers serve", lambda: run_transformers(checkpoint, workloads, args, Path(tmp))),
                ("herd serve", lambda: run_herd(checkpoint, workloads, args)))
        for system, run in runs:
            if system.split()[0] in args.skip:
                notes.append(f"{system}: skipped (--skip)")
                continue
            try:
                results[system] = run()
            except ServerError as err:
                notes.append(f"{system}: not measured: {err}")
                print(f"{system}: not measured: {err}", file=sys.stderr, flush=True)
    offline = None
    if "offline" not in args.skip:
        offline = run_offline(checkpoint, workloads[levels[-1]], max_num_seqs=levels[-1])

    print(f"## Serving benchmark: tiny Scout ({checkpoint}), CPU float32, greedy, {args.requests} requests per "
          f"level, prompts {args.prompt_words[0]}-{args.prompt_words[1]} words, max_tokens "
          f"{args.max_tokens[0]}-{args.max_tokens[1]}, seed {args.seed} (+ level index), {os.cpu_count()} CPUs\n")
    print(table_header())
    for system, by_level in results.items():
        for level in sorted(by_level):
            print(table_row(system, by_level[level].summary()))
    if offline:
        print(table_row("herd engine offline", offline))
    print("\nTargets:")
    print("\n".join(target_checks(results, offline)))
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    if results:
        ceilings = {f"herd engine offline (batch <= {levels[-1]})": offline["output_tok_per_s"]} if offline else None
        print(f"\nplot: {plot(results, args.plot, ceilings=ceilings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
