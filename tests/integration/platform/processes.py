"""Servers the integration tests start as processes of their own: a free loopback port (bench.common's), a
clean stop."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time

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


def descendants(root: int) -> dict[int, str]:
    """{pid: process title} of every process under root (Ray's workers are the driver's descendants)."""
    found = {}
    for child in psutil.Process(root).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            found[child.pid] = " ".join(child.cmdline())
    return found


__all__ = ["descendants", "free_port", "interrupt", "wait_until_serving"]
