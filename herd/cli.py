"""`herd`: the command line. Each subcommand parses its flags and calls one function below the CLI."""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from herd import __version__
from herd.model import greedy_decode, load_model
from herd.model.chat_template import render_chat
from herd.model.dtypes import DTYPES
from herd.model.tiny import PRESETS, make_tiny
from herd.model.tiny_eagle3 import make_tiny_eagle3
from herd.model.tokenizer import Tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return int(args.run(args))
    except (ValueError, FileNotFoundError, LookupError) as err:
        print(f"herd {args.command}: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herd", description="Serve Llama 4 mixture-of-experts models.")
    parser.add_argument("--version", action="version", version=f"herd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("make-tiny", help="write a tiny random Llama 4 checkpoint (HF layout)")
    tiny.add_argument("--preset", choices=sorted(PRESETS), default="scout", help="model shape to imitate")
    tiny.add_argument("--out", type=Path, required=True, help="directory to write")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.add_argument("--eagle3", action="store_true",
                      help="also write a tiny random EAGLE-3 draft head for it, into <out>/eagle3")
    tiny.set_defaults(run=_make_tiny)

    quantize = commands.add_parser("quantize", help="write an int4 or FP8 copy of a bf16 checkpoint")
    scheme = quantize.add_mutually_exclusive_group(required=True)
    scheme.add_argument("--int4", dest="scheme", action="store_const", const="int4",
                        help="int4 weight-only, symmetric, group 128 (Herd's layout)")
    scheme.add_argument("--fp8", dest="scheme", action="store_const", const="fp8",
                        help="FP8 e4m3 per output channel (the published compressed-tensors layout)")
    quantize.add_argument("source", type=Path, help="checkpoint directory to read (bf16 or float32)")
    quantize.add_argument("dest", type=Path, help="new directory to write")
    quantize.set_defaults(run=_quantize)

    generate = commands.add_parser("generate", help="greedy completion from a checkpoint, on this machine")
    generate.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="raw text, sent as is after <|begin_of_text|>")
    prompt.add_argument("--chat", help="a user message, rendered with the Llama 4 chat template")
    generate.add_argument("--max-tokens", type=int, default=32, help="most new tokens to generate")
    generate.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype")
    generate.set_defaults(run=_generate)

    shard = commands.add_parser("expert-shard", help="serve some experts of every MoE layer over gRPC")
    shard.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    shard.add_argument("--experts", required=True, help="owned experts: 'a:b' or a comma-separated list")
    shard.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port)")
    shard.add_argument("--host", default="127.0.0.1", help="address to listen on (other than loopback: only with "
                       "the --tls-* flags)")
    shard.add_argument("--step-tokens", type=int, default=8192, help="tokens of the trunk's largest step (its "
                       "max_num_batched_tokens): sizes the largest message taken")
    shard.add_argument("--reflection", action="store_true", help="serve gRPC reflection (off: shards are internal)")
    shard.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype")
    shard.add_argument("--tls-cert", type=Path, help="mutual TLS: this shard's certificate (PEM; with --tls-key, "
                       "--tls-ca)")
    shard.add_argument("--tls-key", type=Path, help="mutual TLS: the private key of --tls-cert")
    shard.add_argument("--tls-ca", type=Path, help="mutual TLS: only clients with a certificate from this CA")
    shard.add_argument("--collective", metavar="HOST:PORT", help="instead of serving gRPC, join a trunk's collective "
                       "group at its store (with --rank, --world-size) and serve it until it stops")
    shard.add_argument("--rank", type=int, help="this shard's rank in the trunk's group (trunks..world size - 1)")
    shard.add_argument("--world-size", type=int, help="ranks of the trunk's group: the trunk(s) and its shards")
    shard.add_argument("--trunks", type=int, default=1, help="trunks of the group (ranks 0..trunks - 1), which "
                       "dispatch to the shards in lockstep (M:N)")
    shard.add_argument("--timeout-s", type=float, default=600.0, help="joining the group, and each collective")
    shard.set_defaults(run=_expert_shard)

    serve_cmd = commands.add_parser("serve", help="serve models over OpenAI HTTP and gRPC (local Ray cluster)")
    serve_cmd.add_argument("--model", help="checkpoint directory, or a tiny preset: scout, maverick")
    serve_cmd.add_argument("--name", help="the model name clients use (default: the preset or directory name)")
    serve_cmd.add_argument("--shards", type=int, help="expert shards per replica (0: none)")
    serve_cmd.add_argument("--trunks", type=int, help="attention trunks per replica, in lockstep to the same shards "
                           "(M:N; more than 1 needs the collective transport)")
    serve_cmd.add_argument("--context-parallel", action="store_true", help="the trunks share their global-layer KV: "
                           "one sequence may be --trunks times longer than one trunk's cache holds")
    serve_cmd.add_argument("--transport", choices=["auto", "collective", "grpc", "ray", "local"],
                           help="trunk-to-shard transport (auto: collective on one node)")
    serve_cmd.add_argument("--config", type=Path, help="settings file (YAML or JSON)")
    serve_cmd.add_argument("--http-port", type=int, help="OpenAI HTTP port (default 8000)")
    serve_cmd.add_argument("--grpc-port", type=int, help="gRPC port (default 50051)")
    serve_cmd.add_argument("--print-config", action="store_true", help="print the Ray Serve config and exit")
    serve_cmd.add_argument("--no-auth", action="store_true", help="no API keys, limits or ledger (local experiments)")
    serve_cmd.set_defaults(run=_serve)

    for name, help_text in (("gateway", "the HTTP and gRPC doors alone, reaching models through Serve's gRPC proxy"),
                            ("controlplane", "scale models' RayServices on Kubernetes (leader-elected)")):
        cmd = commands.add_parser(name, help=help_text)
        cmd.add_argument("--config", type=Path, help="settings file (YAML or JSON)")
        cmd.set_defaults(run=_gateway if name == "gateway" else _controlplane)

    from herd.platform.capacity.cli import add_parser as add_plan
    from herd.platform.tenancy.cli import add_parser as add_tenants

    add_tenants(commands)
    add_plan(commands)

    bench = commands.add_parser("bench", help="load-test an OpenAI-compatible server", add_help=False)
    bench.set_defaults(run=_bench)
    return parser


def _make_tiny(args: argparse.Namespace) -> int:
    out = make_tiny(args.out, preset=args.preset, seed=args.seed)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote tiny {args.preset} checkpoint to {out} ({size / 2**20:.1f} MiB)")
    if args.eagle3:
        head = make_tiny_eagle3(out, seed=args.seed)
        print(f"wrote tiny EAGLE-3 draft head to {head} (speculative: {{method: eagle3, draft_path: {head}}})")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from herd.model.quant.convert import quantize_checkpoint

    start = time.perf_counter()
    out = quantize_checkpoint(args.source, args.dest, args.scheme)
    before = sum(f.stat().st_size for f in args.source.glob("*.safetensors"))
    after = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {args.scheme} checkpoint to {out}: {after / 2**20:.1f} MiB of weights (from {before / 2**20:.1f} "
          f"MiB) in {time.perf_counter() - start:.1f} s")
    return 0


def _generate(args: argparse.Namespace) -> int:
    tokenizer = Tokenizer.from_pretrained(args.model)
    model = load_model(args.model, dtype=DTYPES[args.dtype])
    if args.chat is not None:
        prompt_ids = tokenizer.encode(render_chat([{"role": "user", "content": args.chat}]))
    else:
        prompt_ids = tokenizer.encode(args.prompt, add_bos=True)
    start = time.perf_counter()
    new_ids = greedy_decode(model, prompt_ids, max_new_tokens=args.max_tokens, stop_ids=tokenizer.stop_ids)
    seconds = time.perf_counter() - start
    print(tokenizer.decode(new_ids))
    print(
        f"[{len(prompt_ids)} prompt tokens, {len(new_ids)} generated in {seconds:.2f} s, greedy, {args.dtype}]",
        file=sys.stderr,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from herd.platform.server import print_config, run
    from herd.platform.settings import HerdSettings, ModelSettings
    from herd.platform.telemetry import configure_process

    settings = HerdSettings.load(args.config, http_port=args.http_port, grpc_port=args.grpc_port)
    configure_process(settings.telemetry, "gateway")
    if args.no_auth:
        settings.tenancy.auth = False
    if (args.model or args.shards is not None or args.trunks is not None or args.transport or args.name
            or args.context_parallel):
        base = settings.models[0]
        path = args.model or base.path
        name = args.name or (path if path in ("scout", "maverick") else Path(path).name) if args.model else base.name
        updates = {"path": path, "name": name}
        if args.shards is not None:
            updates["shards"] = args.shards
        if args.trunks is not None:
            updates["trunks"] = args.trunks
        if args.transport:
            updates["transport"] = args.transport
        if args.context_parallel:
            trunks = args.trunks if args.trunks is not None else base.trunks
            if trunks < 2:
                raise ValueError("--context-parallel shares the global-layer KV of several trunks: give --trunks 2 "
                                 "or more")
            updates["engine"] = {**base.engine.model_dump(), "context_parallel": trunks}
        settings.models[0] = ModelSettings.model_validate({**base.model_dump(), **updates})
    if args.print_config:
        print(print_config(settings), end="")
        return 0
    asyncio.run(run(settings))
    return 0


def _gateway(args: argparse.Namespace) -> int:
    import asyncio

    from herd.platform.server import run_gateway
    from herd.platform.settings import HerdSettings
    from herd.platform.telemetry import configure_process

    settings = HerdSettings.load(args.config)
    configure_process(settings.telemetry, "gateway")
    asyncio.run(run_gateway(settings))
    return 0


def _controlplane(args: argparse.Namespace) -> int:
    import asyncio

    from herd.platform.controlplane.app import run_kubernetes
    from herd.platform.settings import HerdSettings
    from herd.platform.telemetry import configure_process

    settings = HerdSettings.load(args.config)
    configure_process(settings.telemetry, "controlplane")
    asyncio.run(run_kubernetes(settings))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from herd_loadgen import main as loadgen_main

    return int(loadgen_main(args.rest))


def _expert_shard(args: argparse.Namespace) -> int:
    import signal
    import threading

    from herd.model import load_config
    from herd.workers.expert_shard import parse_experts, serve
    from herd.workers.shard_tls import ShardTls

    tls = ShardTls.of(args.tls_cert, args.tls_key, args.tls_ca)
    if tls is None and not _is_loopback(args.host):
        raise ValueError(f"--host {args.host} is reachable from the network: a shard there needs mutual TLS "
                         "(--tls-cert, --tls-key, --tls-ca)")
    if args.collective:
        return _collective_shard(args)
    credentials = tls.server_credentials() if tls is not None else None  # unreadable files: an error before loading
    if args.step_tokens < 1:
        raise ValueError(f"--step-tokens must be at least 1, got {args.step_tokens}")
    experts = parse_experts(args.experts, load_config(args.model).text.num_local_experts)
    server, port, service = serve(args.model, experts, port=args.port, host=args.host, dtype=DTYPES[args.dtype],
                                  credentials=credentials, step_tokens=args.step_tokens, reflection=args.reflection)
    print(f"expert shard listening on {args.host}:{port}{' (mutual TLS)' if tls else ''} (experts "
          f"{experts[0]}..{experts[-1]}, {service.shard.resident_bytes / 2**20:.1f} MiB)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    return 0


def _collective_shard(args: argparse.Namespace) -> int:
    from herd.model import load_config
    from herd.workers.collective import CollectiveGroup, Rendezvous
    from herd.workers.collective_shard import CollectiveShard
    from herd.workers.expert_shard import parse_experts
    from herd.workers.shard_experts import ShardExperts

    host, _, port = args.collective.rpartition(":")
    if not host or not port.isdigit() or args.rank is None or args.world_size is None:
        raise ValueError("--collective takes HOST:PORT, with --rank and --world-size")
    if not 1 <= args.trunks <= args.rank < args.world_size:
        raise ValueError(f"--rank must be in {args.trunks}..{args.world_size - 1} (ranks 0..{args.trunks - 1} are "
                         f"trunks), got {args.rank}")
    num_experts = load_config(args.model).text.num_local_experts
    shard = ShardExperts.load(args.model, parse_experts(args.experts, num_experts), dtype=DTYPES[args.dtype])
    rendezvous = Rendezvous(host=host, port=int(port), world_size=args.world_size, backend="gloo",
                            timeout_s=args.timeout_s)
    print(f"expert shard joining {args.collective} as rank {args.rank} of {args.world_size}", flush=True)
    CollectiveShard(shard, CollectiveGroup(rendezvous, args.rank), num_experts, trunks=args.trunks).serve()
    return 0


def _is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or the name localhost): no one else on the network reaches it."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
