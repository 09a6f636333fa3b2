"""`make gpu-check` itself, walked on the CPU (torch standing in for CuPy), so a GPU run does not fail on
a bug in the script. The kernels it checks on a GPU are covered by tests/unit/kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_passes_every_check_and_prints_the_table():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-dry-run"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checks: all passed" in result.stdout
    for label in ("route (top-k+sigmoid)", "permute (+scale)", "combine", "MoE layer"):
        assert label in result.stdout


def test_without_a_gpu_it_says_nothing_was_checked_and_fails():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 2
    assert "nothing was checked" in result.stdout
