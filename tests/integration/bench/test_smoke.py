"""Every benchmark under bench/ at its --smoke size, as `.venv/bin/python bench/NAME.py --smoke` runs it: it
must finish with exit code 0 and print its table, so a benchmark that a feature broke fails here. Nothing is
timed; the timeout only stops a hang. serve.py, serve_breakdown.py, disaggregation.py, multiturn.py (twice, 2
replicas each), soak.py and recovery.py (which SIGKILLs an expert shard of it) start `herd serve` (and Ray) with
API keys on.

bench/gpu_check.py and bench/quantized_experts.py are run at their --smoke size by tests/unit/bench/test_smoke_quant.py;
every other script must be listed here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
HANG_S = 900  # far beyond any smoke run; only a hang reaches it

# script: (a line of its table's header, extra arguments given a temporary folder)
SMOKE = {
    "autoscale_sim.py": ("| model | fleet | replicas | requests | SLO met |", lambda tmp: []),
    "moe_layer.py": ("| E | T | ideal GEMMs (ms) | herd (ms) | transformers (ms) |", lambda tmp: []),
    "engine_throughput.py": ("| system | requests | output tokens | wall s | output tok/s |", lambda tmp: []),
    "engine_overhead.py": ("| sequences | step ms | torch ops ms | host ms | host share |", lambda tmp: []),
    "expert_dispatch.py": ("| shards | T | in-process (ms) | gRPC (ms) | collective (ms) | gRPC / in-process | "
                           "collective / in-process |", lambda tmp: []),
    "serve.py": ("| system | concurrency | requests | errors | output tok/s |",
                 lambda tmp: ["--checkpoint", str(tmp / "scout"), "--log-dir", str(tmp / "logs")]),
    "serve_breakdown.py": ("| stage | output tokens | wall s | output tok/s | vs engine |",
                           lambda tmp: ["--checkpoint", str(tmp / "scout"), "--log-dir", str(tmp / "logs")]),
    "structured_output.py": ("| run | batch | output tokens | wall s (median) | output tok/s | vs unconstrained |",
                             lambda tmp: ["--checkpoint", str(tmp / "scout")]),
    "speculative.py": ("| method | batch | output tokens | wall s (median) | tok/s per sequence | vs plain | "
                       "acceptance length | ms per token |", lambda tmp: ["--checkpoint", str(tmp / "scout")]),
    "disaggregation.py": ("| setup | concurrency | requests | errors | TTFT p50 ms | TTFT p95 ms | ITL p50 ms |",
                          lambda tmp: ["--checkpoint", str(tmp / "scout"), "--log-dir", str(tmp / "logs")]),
    "multiturn.py": ("| system | router | host KV MiB | turns | errors |",
                     lambda tmp: ["--checkpoint", str(tmp / "scout"), "--log-dir", str(tmp / "logs")]),
    "lora_delta.py": ("| slots | tokens | base (ms) | gathered (ms) | grouped (ms) | masked (ms) |", lambda tmp: []),
    "lora.py": ("| scenario | sequences | adapters in batch | decode tokens | decode s (median) | decode tok/s | "
                "vs base |", lambda tmp: []),
    "ping_pong.py": ("| schedule | sequences | decode steps | step ms (median) | shard wait ms / step |",
                     lambda tmp: []),
    "context_parallel.py": ("| run | context | global blocks on the peer | prefill s | decode step ms (median) |",
                            lambda tmp: []),
    "soak.py": ("| t_s | gateway_mib | replica_mib | shard0_mib | shard1_mib | kv_blocks |", lambda tmp: []),
    "recovery.py": ("| transport | kills | recovery s (median) |",
                    lambda tmp: ["--checkpoint", str(tmp / "scout"), "--log-dir", str(tmp / "logs")]),
}
NOT_HERE = {"__init__.py", "common.py", "expert_balance.py", "gpu_check.py", "quantized_experts.py"}


def test_every_benchmark_has_a_smoke_run_here() -> None:
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")} - NOT_HERE
    assert scripts == set(SMOKE), f"bench scripts without a smoke test: {sorted(scripts - set(SMOKE))}"


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_smoke_run_completes_and_prints_its_table(script: str, tmp_path: Path) -> None:
    header, extra = SMOKE[script]
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", *extra(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=HANG_S)
    output = f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
    assert result.returncode == 0, output
    assert any(line.startswith(header) for line in result.stdout.splitlines()), output
