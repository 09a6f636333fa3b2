"""Positive controls on herd's own kernels (issue 19): the text of herd/kernels/cuda/*.cu mutated here, never in
herd/, each mutant caught by the specific check it breaks, the unmutated kernel clean in the same run.

- a barrier removed (int4.cu's GEMV after staging x in shared memory; permute.cu's moe_positions after the warp
  counts): ThreadSanitizer reports a data race in that kernel;
- an index off by one in combine.cu: reading source_row one past the end is ASan's heap-buffer-overflow; a
  choice loop that starts one late stays in bounds and its output differs from the torch backend's (plain).
Too little shared memory and a route launch with a 48-thread block are test_sanitizers.py's and test_rules.py's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from herd.kernels import torch_moe
from herd.kernels.cuda_sources import source
from tests.cudaemu import sanitizer_env
from tests.unit.cudaemu.herd_mutants import MUTANT_MARK, mutate
from tests.unit.kernels.moe_inputs import distinct_logits
from tests.unit.kernels.test_cuda_emulated import cupy_moe  # noqa: F401 - the fixture: cupy_moe on the fake cupy

REPO = Path(__file__).resolve().parents[3]


def run_case(variant: str, case: str) -> tuple[subprocess.CompletedProcess[str], str, str]:
    """Runs herd_mutants' `case` under `variant`: the process, and its stderr before and after the mutant."""
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    env.update(sanitizer_env(variant))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run([sys.executable, "-m", "tests.unit.cudaemu.herd_mutants", variant, case], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert MUTANT_MARK in result.stderr, result.stderr[-4000:]
    clean, mutant = result.stderr.split(MUTANT_MARK)
    return result, clean, mutant


@pytest.mark.parametrize(("case", "kernel"), [("gemv_without_barrier", "int4_gemv_partial"),
                                              ("positions_without_barrier", "moe_positions")])
def test_tsan_reports_herds_kernel_without_its_barrier_as_a_race(case: str, kernel: str) -> None:
    result, clean, mutant = run_case("tsan", case)
    assert "ThreadSanitizer" not in clean, clean[-4000:]
    assert result.returncode == 66, result.stderr[-4000:]
    assert "WARNING: ThreadSanitizer: data race" in mutant, mutant[-4000:]
    assert re.search(rf"SUMMARY: ThreadSanitizer: data race \S+ in (void )?{kernel}\b", mutant), mutant[-4000:]
    assert "case finished" in result.stdout  # TSan reports and carries on: the race, not a crash


def test_asan_reports_combine_reading_one_past_source_row() -> None:
    result, clean, mutant = run_case("asan", "combine_row_off_by_one")
    assert "Sanitizer" not in clean.replace("ASan doesn't fully support makecontext", ""), clean[-4000:]
    assert result.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in mutant, mutant[-4000:]
    assert "READ of size 4" in mutant and "in void combine<float>" in mutant
    assert "0 bytes to the right of 40-byte region" in mutant  # source_row's 5 tokens x 2 choices
    assert "case finished" not in result.stdout


def test_combine_with_its_choice_loop_off_by_one_differs_from_torch(cupy_moe: Any,  # noqa: F811
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    tokens, k, hidden = 6, 2, 40
    ids, _ = torch_moe.route(distinct_logits(tokens, 8, torch.Generator().manual_seed(3)), k)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(4))
    _, permutation = torch_moe.permute(x, ids, torch.ones(tokens, k), torch.arange(8))
    out_rows = torch.randn(tokens * k, hidden, generator=torch.Generator().manual_seed(5))
    expected = torch_moe.combine(out_rows, permutation, tokens)
    assert torch.equal(cupy_moe.combine(out_rows, permutation, tokens), expected)

    mutant = mutate("combine", "for (int choice = 0; choice < k; ++choice)", "choice = 0", "choice = 1")
    monkeypatch.setattr(cupy_moe, "source", lambda name: mutant if name == "combine" else source(name))
    cupy_moe._module.cache_clear()
    got = cupy_moe.combine(out_rows, permutation, tokens)
    assert not torch.equal(got, expected)
    assert torch.equal(got, out_rows[permutation.source_row.view(tokens, k)[:, 1]])  # the second choice alone
