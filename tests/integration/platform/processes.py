"""Servers the integration tests start as processes of their own: a free loopback port (bench.common's), a
clean stop, and `herd serve` of a settings file run from this checkout."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from bench.common import free_port  # one rule for every server a test or bench starts


def interrupt(proc: subprocess.Popen, timeout_s: float = 90) -> None:
    """Ctrl-C, as an operator stops it (it drains); killed if it has not exited within timeout_s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_until_serving(proc: subprocess.Popen, output: list[str], timeout_s: float = 300) -> None:
    """Read herd serve's output into `output` until its banner's last line, then keep reading in a thread."""
    deadline = time.monotonic() + timeout_s
    while not any("Ctrl-C stops everything" in line for line in output) and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "herd serve exited:\n" + "".join(output)
        output.append(line)
    threading.Thread(target=lambda: output.extend(iter(proc.stdout.readline, "")), daemon=True).start()


CHECKOUT = Path(__file__).resolve().parents[3]
"""herd serve runs in a temporary directory: its processes (and Ray's workers, which inherit PYTHONPATH) import herd
from this checkout first, so the code under test is this one even when PYTHONPATH is relative or unset."""


@contextlib.contextmanager
def herd_serve(root: Path, settings: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`herd serve` of `settings` (written to root/herd.json; its ops port chosen here) in `root`, until the block
    ends: yields its http and ops URLs and its output so far (a list that grows)."""
    http_port, ops_port = free_port(), free_port()
    config = root / "herd.json"
    config.write_text(json.dumps({**settings, "ops_port": ops_port}))
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", "--config", str(config),
                             "--http-port", str(http_port), "--grpc-port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled",
                                 "PYTHONPATH": os.pathsep.join([str(CHECKOUT), os.environ.get("PYTHONPATH", "")])})
    output: list[str] = []
    try:
        wait_until_serving(proc, output)
        yield {"http": f"http://127.0.0.1:{http_port}", "ops": f"http://127.0.0.1:{ops_port}", "output": output}
    finally:
        interrupt(proc)


def descendants(root: int) -> dict[int, str]:
    """{pid: process title} of every process under root (Ray's workers are the driver's descendants)."""
    found = {}
    for child in psutil.Process(root).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            found[child.pid] = " ".join(child.cmdline())
    return found


__all__ = ["descendants", "free_port", "interrupt", "wait_until_serving"]
