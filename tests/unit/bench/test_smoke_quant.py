"""The quantised-weight benchmarks at their --smoke sizes: each runs to its end on the CPU and prints its table.

Nothing is timed. bench/gpu_check.py must also run on GPU machines that have only PyTorch and CuPy, so its
smoke run is checked to import none of Herd's other dependencies (torch's own optional imports aside).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
GPU_MACHINE_PACKAGES = {"torch", "numpy"}  # what a GPU machine has besides CuPy (numpy comes with both)

# Runs a script as `python script --smoke` would, then lists the top-level modules it imported.
_RUN_AND_LIST_IMPORTS = """
import runpy, sys
script = sys.argv[1]
sys.argv = [script, "--smoke"]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exit:
    code = exit.code
print("imported:", " ".join(sorted({m.split(".")[0] for m in sys.modules})))
sys.exit(code)
"""
_LIST_IMPORTS_OF_TORCH = """
import sys, numpy, torch
print("imported:", " ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def _smoke(script: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    result = _python(_RUN_AND_LIST_IMPORTS, str(ROOT / "bench" / script))
    return result, _imported(result)


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-c", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _imported(result: subprocess.CompletedProcess[str]) -> set[str]:
    listed = [line for line in result.stdout.splitlines() if line.startswith("imported: ")]
    assert len(listed) == 1, result.stdout
    return set(listed[0].removeprefix("imported: ").split())


def _herd_dependencies() -> set[str]:
    """The distributions Herd itself depends on (not the dev extras), normalised names."""
    names = {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0] for r in requires("herd") or [] if "extra ==" not in r}
    return {_normalised(n) for n in names}


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_quantized_experts_smoke_prints_its_table() -> None:
    result, _ = _smoke("quantized_experts.py")
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "| weights | weight MiB | T=1 ms | T=8 ms | T=1 vs bf16 | T=8 vs bf16 |"
    for name in ("float32", "bfloat16", "int4 (bf16 rows)", "fp8 (bf16 rows)"):
        found = [row for row in rows if row.startswith(f"| {name} |")]
        assert len(found) == 1 and found[0].count("|") == 7, (name, rows)


def test_gpu_check_smoke_passes_its_checks_prints_its_tables_and_needs_only_torch() -> None:
    result, imported = _smoke("gpu_check.py")
    assert "DRY RUN on the CPU" in result.stdout and "checks: all passed" in result.stdout
    assert "| kernel | dtype | shape | CuPy (us) | torch backend (us) |" in result.stdout
    assert "## Quantised MoE expert layers" in result.stdout
    for label in ("route (top-k+sigmoid)", "permute (+scale)", "combine", "MoE layer"):
        assert f"| {label}" in result.stdout
    by_torch = _imported(_python(_LIST_IMPORTS_OF_TORCH))
    distributions = packages_distributions()
    others = _herd_dependencies() - GPU_MACHINE_PACKAGES
    needed = {m: d for m in imported - by_torch for d in distributions.get(m, []) if _normalised(d) in others}
    assert not needed, f"gpu_check imports what a GPU machine lacks: {needed}"
    assert "herd" in imported and "torch" in imported
