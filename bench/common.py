"""What the benchmarks share: the --smoke flag, timers, a free port, the tiny checkpoint, and servers in
subprocesses (`herd serve` with API keys on, as a user runs it).

A script imports it as `bench.common` after putting the repository root on sys.path (scripts run as
`.venv/bin/python bench/NAME.py`, so only bench/ is on it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from herd_loadgen import percentile

ROOT = Path(__file__).resolve().parent.parent
BENCH_TENANT = "bench"  # the tenant whose key the benchmarks send to herd serve

__all__ = ["BENCH_TENANT", "ROOT", "HerdServe", "ServerError", "ServerProcess", "free_port", "interleaved_medians",
           "machine", "median_seconds", "parse_args_with_smoke", "percentile", "print_command", "tiny_checkpoint"]


# --- the smoke size ---------------------------------------------------------------------------------------------
def parse_args_with_smoke(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                          **sizes: Any) -> argparse.Namespace:
    """Parse with a `--smoke` flag added: the smallest run that still goes through the whole script and
    prints its table, seconds where it can be (`make test` runs every script so, to catch a benchmark that a
    feature broke). `sizes` are the argument values it sets, over any given on the command line."""
    shown = ", ".join(f"{name}={value!r}" for name, value in sizes.items())
    parser.add_argument("--smoke", action="store_true",
                        help=f"a seconds-long run through the whole script, for make test ({shown}); its times "
                        "mean nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in sizes.items():
            if not hasattr(args, name):
                raise AttributeError(f"--smoke sets {name!r}, which {parser.prog} has no argument for")
            setattr(args, name, value)
    return args


# --- timing ---------------------------------------------------------------------------------------------------
def median_seconds(fn: Callable[[], object], *, budget_s: float = 2.0, min_runs: int = 3) -> float:
    """Median wall time of fn after one warm-up run, over at least min_runs runs or budget_s seconds."""
    return interleaved_medians([fn], budget_s=budget_s, min_runs=min_runs)[0]


def interleaved_medians(
    fns: Sequence[Callable[[], object]], *, budget_s: float = 3.0, min_runs: int = 5, max_runs: int = 50
) -> list[float]:
    """Median wall time of each fn, run in turn (a, b, a, b, ...) so that load on a shared machine falls on
    all of them alike; one warm-up run each first."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < max_runs and (len(times[0]) < min_runs or sum(map(sum, times)) < budget_s):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


# --- checkpoints and ports ------------------------------------------------------------------------------------
def print_command(script: str) -> None:
    """The command line that produced this output, as typed from the repository root."""
    print(f"$ .venv/bin/python bench/{script} {shlex.join(sys.argv[1:])}".rstrip())


def machine() -> str:
    """When and on what a run happened: UTC time, processor, CPUs, torch and its intra-op threads."""
    import torch  # here, so the server benchmarks that import this module load no torch

    cpu = platform.processor() or platform.machine()
    return (f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC, {cpu}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)")


def tiny_checkpoint(path: Path, *, preset: str = "scout", seed: int = 0) -> Path:
    """`path`, made there by make_tiny first when it holds no config.json."""
    if not (path / "config.json").exists():
        from herd.model.tiny import make_tiny

        make_tiny(path, preset=preset, seed=seed)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, below the kernel's ephemeral range (32768 up) and
    above Ray's worker ports (10002-19999): a server that binds port 0 (Ray's, an expert shard's, a metrics
    endpoint's) is never handed it while the process it is meant for starts up, which can take a minute."""
    for _ in range(1000):
        port = random.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


# --- servers --------------------------------------------------------------------------------------------------
PORT_ATTEMPTS = 3
"""Starts of herd serve on new ports when a chosen one was taken meanwhile (UVICORN_STARTUP_FAILURE)."""
UVICORN_STARTUP_FAILURE = 3
"""uvicorn's exit status when it cannot bind its port (or its lifespan fails to start)."""


class ServerError(RuntimeError):
    """A server did not come up; the message says why."""


class ServerProcess:
    """One server subprocess: output to a log file (a full pipe would stall the server), ready when
    `url + ready_path` answers 200, stopped with SIGINT (then killed) on exit."""

    def __init__(self, name: str, cmd: Sequence[str], *, url: str, log: Path, env: Mapping[str, str] | None = None,
                 cwd: Path = ROOT, ready_path: str = "/health", ready_timeout_s: float = 300.0,
                 stop_timeout_s: float = 120.0) -> None:
        self.name, self.cmd, self.url, self.log = name, list(cmd), url, log
        self._env, self._cwd, self._ready_path = dict(env) if env is not None else None, cwd, ready_path
        self._ready_timeout_s, self._stop_timeout_s = ready_timeout_s, stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.log.open("wb") as out:
                self.proc = subprocess.Popen(self.cmd, cwd=self._cwd, env=self._env, stdout=out,
                                             stderr=subprocess.STDOUT)
        except OSError as err:
            raise ServerError(f"{self.name}: cannot start `{' '.join(self.cmd)}`: {err}") from err
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # herd serve drains and stops Ray on it; uvicorn stops
        try:
            self.proc.wait(timeout=self._stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self._ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode}: {self.reason()}")
            try:
                if httpx.get(self.url + self._ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise ServerError(f"{self.name} not ready after {self._ready_timeout_s:.0f} s: {self.reason()}")

    def reason(self) -> str:
        """The last line of the log that is not a traceback frame, and where the whole log is."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        lines = [ln.rstrip() for ln in text.splitlines()]
        last = [ln for ln in lines if ln and not ln.startswith((" ", "Traceback", "^"))]
        return f"{last[-1] if last else '(no output)'} [log: {self.log}]"


class HerdServe(ServerProcess):
    """`herd serve` on free ports with API keys on, as a user runs it. Its tenants live in a fresh SQLite
    database in `work`; once it is up, the admin API makes the tenant 'bench' (every model, no limits) and one
    key for it, so nothing depends on what a first start does, and `api_key` is what clients send.
    `settings` is the config file's content (its `tenancy` section is added to, not replaced); `tenant` adds
    fields (limits) to the tenant; `args` go after `herd serve`'s own; the log goes to `log` (default: in
    `work`). The operator endpoints (/herd/*, /admin/v1) are at `ops_url`."""

    def __init__(self, work: Path, *, settings: Mapping[str, Any] | None = None,
                 tenant: Mapping[str, Any] | None = None, args: Sequence[str] = (), log: Path | None = None,
                 ready_timeout_s: float = 300.0, stop_timeout_s: float = 120.0) -> None:
        self.work = work
        tenancy = {"auth": True, "database_url": f"sqlite:///{work / 'herd.db'}",
                   "admin_token_file": str(work / "admin-token"), "spill_path": str(work / "usage-spill.jsonl"),
                   **dict((settings or {}).get("tenancy", {}))}
        self.ops_port = free_port()
        self.settings = {"ops_port": self.ops_port, **(settings or {}), "tenancy": tenancy}
        self.ops_url = f"http://127.0.0.1:{self.ops_port}"
        self.tenant = dict(tenant or {})
        self.http_port, self.grpc_port = free_port(), free_port()
        self.api_key = ""
        cmd = [sys.executable, "-m", "herd.cli", "serve", "--config", str(work / "herd.json"), "--http-port",
               str(self.http_port), "--grpc-port", str(self.grpc_port), *args]
        super().__init__("herd serve", cmd, url=f"http://127.0.0.1:{self.http_port}", ready_path="/health/ready",
                         log=log or work / "herd_serve.log", cwd=work, ready_timeout_s=ready_timeout_s,
                         stop_timeout_s=stop_timeout_s)

    def __enter__(self) -> HerdServe:
        self.work.mkdir(parents=True, exist_ok=True)
        for attempt in range(PORT_ATTEMPTS):
            (self.work / "herd.json").write_text(json.dumps(self.settings, indent=2))
            try:
                super().__enter__()
                break
            except ServerError:
                # uvicorn exits with 3 when its port was taken after free_port chose it (herd serve binds its doors
                # only once Ray and Serve are up, a minute on a busy machine): new ports, and start again.
                if self.proc is None or self.proc.returncode != UVICORN_STARTUP_FAILURE or attempt + 1 == PORT_ATTEMPTS:
                    raise
                self._new_ports()
        try:
            self.api_key = self._bench_key()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _new_ports(self) -> None:
        """Other free ports for the doors and the operator endpoints, in the settings and the command line."""
        old = {str(self.http_port), str(self.grpc_port)}
        self.http_port, self.grpc_port, self.ops_port = free_port(), free_port(), free_port()
        self.settings["ops_port"] = self.ops_port
        self.ops_url = f"http://127.0.0.1:{self.ops_port}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        flags = {"--http-port": str(self.http_port), "--grpc-port": str(self.grpc_port)}
        self.cmd = [flags.get(self.cmd[i - 1], arg) if arg in old else arg for i, arg in enumerate(self.cmd)]

    def _bench_key(self) -> str:
        """The tenant BENCH_TENANT and a key of it, made through the admin API (its token: made at start)."""
        token = Path(self.settings["tenancy"]["admin_token_file"]).read_text().strip()
        with httpx.Client(base_url=f"{self.ops_url}/admin/v1", headers={"Authorization": f"Bearer {token}"},
                          timeout=30) as admin:
            made = admin.post("/tenants", json={"id": BENCH_TENANT, "allowed_models": ["*"], **self.tenant})
            key = admin.post(f"/tenants/{BENCH_TENANT}/keys", json={"name": "benchmark"}) if made.is_success else made
        if not key.is_success:
            raise ServerError(f"herd serve's admin API answered {key.status_code}: {key.text[:500]} "
                              f"[log: {self.log}]")
        return str(key.json()["key"])
