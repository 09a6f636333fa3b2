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
    """One `herd expert-shard --collective` process per expert spec, joined with this process as the trunk (rank 0),
    or as `trunks` trunks (ranks 0..trunks-1, issue 28's M:N; they must then run their forwards in lockstep):
    `transports` are the trunks' sides (`transport` trunk 0's), ready once every shard has joined."""

    def __init__(self, model: Path, specs: list[str], *, timeout_s: float = 30.0, join_timeout_s: float = 120.0,
                 dtype: str = "float32", trunks: int = 1) -> None:
        import torch

        from herd.model import load_config
        from herd.workers.collective import CollectiveGroup, open_rendezvous
        from herd.workers.collective_transport import CollectiveTransport

        self.specs = specs
        world = len(specs) + trunks
        store, rendezvous = open_rendezvous("127.0.0.1", world, backend="gloo", timeout_s=join_timeout_s)
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "herd.cli", "expert-shard", "--model", str(model), "--experts", spec,
                 "--dtype", dtype, "--collective", f"127.0.0.1:{rendezvous.port}", "--rank", str(rank),
                 "--world-size", str(world), "--timeout-s", str(join_timeout_s), "--trunks", str(trunks)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for rank, spec in enumerate(specs, start=trunks)
        ]
        for proc in self.procs:  # keep reading what they print, so a full pipe never blocks one
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
        config = load_config(model).text
        transports: list[CollectiveTransport | None] = [None] * trunks

        def join(rank: int) -> None:  # every trunk joins at once: a group forms when all ranks have
            group = CollectiveGroup(rendezvous, rank, store=store if rank == 0 else None)
            transports[rank] = CollectiveTransport(
                group, num_experts=config.num_local_experts, moe_layers=len(config.moe_layers),
                hidden_size=config.hidden_size, dtype=getattr(torch, dtype), timeout_s=timeout_s, probe=self.alive,
                trunks=trunks, layers=config.moe_layers if trunks > 1 else None)

        joining = [threading.Thread(target=join, args=(rank,), daemon=True) for rank in range(1, trunks)]
        for thread in joining:
            thread.start()
        join(0)
        for thread in joining:
            thread.join(timeout=join_timeout_s)
        if any(t is None for t in transports):
            raise RuntimeError("a trunk did not join the collective group")
        self.transports: list[CollectiveTransport] = [t for t in transports if t is not None]
        self.transport = self.transports[0]

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def kill(self, index: int) -> None:
        self.procs[index].kill()
        self.procs[index].wait(timeout=30)

    def stop(self) -> None:
        """Stop the shards (they leave their loop when trunk 0 says so, the other trunks having left), then make
        sure they are gone."""
        for transport in reversed(self.transports):
            transport.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> CollectiveShards:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
