"""The asan (AddressSanitizer + UBSan) and tsan (ThreadSanitizer) variants: herd's kernels and the test kernels
clean, and each positive control reported. Every case runs in a subprocess started with the sanitizer's runtime
preloaded (tests.cudaemu.sanitizer_env), the way a sanitized module must be loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cudaemu import sanitizer_env

REPO = Path(__file__).resolve().parents[3]


def run_case(variant: str, case: str, *, preload: bool = True) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    env.update(sanitizer_env(variant) if preload else {})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "tests.unit.cudaemu.sanitized", variant, case], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_clean_kernels_raise_no_report(variant):
    result = run_case(variant, "clean")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Sanitizer" not in result.stderr.replace("ASan doesn't fully support makecontext", "")
    assert "case finished" in result.stdout


def test_asan_reports_a_read_past_the_launched_shared_memory():
    result = run_case("asan", "shared_overrun")
    assert result.returncode != 0
    assert "ERROR: AddressSanitizer: use-after-poison" in result.stderr, result.stderr[-4000:]
    assert "in shared_overrun" in result.stderr
    assert "case finished" not in result.stdout


def test_asan_reports_herds_gemv_launched_with_too_little_shared_memory():
    result = run_case("asan", "gemv_short_shared")
    assert result.returncode != 0
    assert "ERROR: AddressSanitizer: use-after-poison" in result.stderr, result.stderr[-4000:]
    assert "in int4_gemv_partial" in result.stderr


def test_ubsan_reports_undefined_behaviour():
    result = run_case("asan", "shift_overflow")
    assert result.returncode != 0
    assert "shift exponent 40 is too large" in result.stderr, result.stderr[-4000:]


def test_tsan_reports_a_missing_barrier_as_a_race():
    result = run_case("tsan", "missing_barrier")
    assert result.returncode == 66, result.stderr[-4000:]
    assert "WARNING: ThreadSanitizer: data race" in result.stderr
    assert "in publish" in result.stderr


@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_a_sanitized_module_needs_its_runtime_preloaded(variant):
    result = run_case(variant, "clean", preload=False)
    assert result.returncode != 0
    assert f"EmulatorError: a {variant} module loads only into a process started with its sanitizer runtime " \
           "preloaded: run it with LD_PRELOAD set" in result.stderr, result.stderr[-4000:]
