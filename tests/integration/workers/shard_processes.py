"""Expert shards as real processes (`herd expert-shard`), started together, stopped or killed at will."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = re.compile(r"listening on ([\d.]+):(\d+)")


class ShardProcesses:
    """One `herd expert-shard` process per expert spec; addresses once all are listening."""

    def __init__(
        self, model: Path, specs: list[str], *, ports: list[int] | None = None, timeout_s: float = 120
    ) -> None:
        self.model, self.specs = model, specs
        self.procs: list[subprocess.Popen[str] | None] = [None] * len(specs)
        self.addresses: list[str] = [""] * len(specs)
        for i in range(len(specs)):
            self._start(i, ports[i] if ports else 0)
        for i in range(len(specs)):
            self._wait(i, timeout_s)

    def kill(self, index: int) -> None:
        proc = self.procs[index]
        assert proc is not None
        proc.kill()
        proc.wait(timeout=30)

    def restart(self, index: int, timeout_s: float = 120) -> None:
        port = int(self.addresses[index].rsplit(":", 1)[1])
        self._start(index, port)
        self._wait(index, timeout_s)

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def _start(self, index: int, port: int) -> None:
        self.procs[index] = subprocess.Popen(
            [sys.executable, "-m", "herd.cli", "expert-shard", "--model", str(self.model),
             "--experts", self.specs[index], "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def _wait(self, index: int, timeout_s: float) -> None:
        proc = self.procs[index]
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        seen = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"expert shard {self.specs[index]} exited: {''.join(seen)}")
            seen.append(line)
            match = READY.search(line)
            if match:
                self.addresses[index] = f"{match.group(1)}:{match.group(2)}"
                # Keep reading what it prints, so a full pipe never blocks it.
                threading.Thread(target=proc.stdout.read, daemon=True).start()
                return
        raise TimeoutError(f"expert shard {self.specs[index]} not listening after {timeout_s} s: {''.join(seen)}")

    def __enter__(self) -> ShardProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CollectiveShards:
    """One `herd expert-shard --collective` process per expert spec, joined with this process as the trunk (rank 0):
    `transport` is the trunk's side, ready once every shard has joined."""

    def __init__(self, model: Path, specs: list[str], *, timeout_s: float = 30.0, join_timeout_s: float = 120.0,
                 dtype: str = "float32") -> None:
        import torch

        from herd.model import load_config
        from herd.workers.collective import CollectiveGroup, open_rendezvous
        from herd.workers.collective_transport import CollectiveTransport

        self.specs = specs
        world = len(specs) + 1
        store, rendezvous = open_rendezvous("127.0.0.1", world, backend="gloo", timeout_s=join_timeout_s)
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "herd.cli", "expert-shard", "--model", str(model), "--experts", spec,
                 "--dtype", dtype, "--collective", f"127.0.0.1:{rendezvous.port}", "--rank", str(rank),
                 "--world-size", str(world), "--timeout-s", str(join_timeout_s)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for rank, spec in enumerate(specs, start=1)
        ]
        for proc in self.procs:  # keep reading what they print, so a full pipe never blocks one
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
        config = load_config(model).text
        group = CollectiveGroup(rendezvous, 0, store=store)
        self.transport = CollectiveTransport(
            group, num_experts=config.num_local_experts, moe_layers=len(config.moe_layers),
            hidden_size=config.hidden_size, dtype=getattr(torch, dtype), timeout_s=timeout_s, probe=self.alive)

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def kill(self, index: int) -> None:
        self.procs[index].kill()
        self.procs[index].wait(timeout=30)

    def stop(self) -> None:
        """Stop the shards (they leave their loop when the trunk says so), then make sure they are gone."""
        self.transport.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> CollectiveShards:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
