"""`make gpu-check` itself, walked on the CPU (torch standing in for CuPy), so a GPU run does not fail on
a bug in the script. The kernels it checks on a GPU are covered by tests/unit/kernels."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from herd.kernels import QuantizedTensor

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
assert _spec is not None and _spec.loader is not None
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

TINY = [("tiny", 256, 128, 4)]  # H=256: two int4 groups per gate_up column


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
    assert "## Quantised MoE expert layers" in result.stdout
    assert "| floor/time | speed-up vs bf16 |" in result.stdout
    for name, hidden, inter, experts in gpu_check.DRY_QUANT_LAYERS:
        for fmt in gpu_check.FORMATS:
            rows = [line for line in result.stdout.splitlines()
                    if line.startswith(f"| {name} H={hidden} I={inter} E={experts} | {fmt} |")]
            assert len(rows) == 1 + len(gpu_check.DRY_QUANT_TOKENS), (name, fmt, rows)  # a check, then timings
            assert "skipped" not in "".join(rows)
    assert "## An MoE layer (bf16, top-1, + shared expert) captured as a decode step's CUDA graph" in result.stdout
    for tokens, experts, hidden, inter in gpu_check.DRY_GRAPH_CASES:
        (row,) = [line for line in result.stdout.splitlines()
                  if line.startswith(f"| T={tokens} E={experts} H={hidden} I={inter} |")]
        assert "| captured | True |" in row, row


def test_without_a_gpu_it_says_nothing_was_checked_and_fails():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 2
    assert "nothing was checked" in result.stdout


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")


def test_layers_built_expert_by_expert_are_the_regenerated_experts_quantised(on_cpu):
    from herd.kernels import quantize

    layer = TINY[0]
    for fmt in ("fp8", "int4"):
        gate_up, down = gpu_check.build_layer(layer, fmt)
        assert gate_up.shape == (4, 256, 256) and down.shape == (4, 128, 256)
        for e in (0, 3):
            want_gate_up, want_down = (quantize(w, fmt) for w in gpu_check.expert_weights(e, 256, 128))
            assert torch.equal(gate_up[e].dequantize(torch.float32), want_gate_up.dequantize(torch.float32))
            assert torch.equal(down[e].dequantize(torch.float32), want_down.dequantize(torch.float32))
    assert not gpu_check.build_layer(layer, "fp8")[0].values[1].is_contiguous()  # column-major, as FP8 GEMMs want


def test_int4_with_its_nibbles_swapped_fails_both_checks_and_only_int4_fails(on_cpu, monkeypatch, capsys):
    dequantize = QuantizedTensor.dequantize

    def swapped(self, dtype=torch.bfloat16):  # a dequantise kernel that reads the high nibble first
        if self.scheme == "int4":
            self = dataclasses.replace(self, values=((self.values & 0x0F) << 4) | (self.values >> 4))
        return dequantize(self, dtype)

    monkeypatch.setattr(QuantizedTensor, "dequantize", swapped)
    failures = gpu_check.quantized_section(TINY, (1,), 1.0)
    assert len(failures) == 2, failures
    assert all(f.startswith("tiny int4: rel err") for f in failures)
    assert "against the bf16 weights" in failures[0] and "dequantised by torch" in failures[1]


def test_a_wrong_int4_group_scale_fails_against_the_dequantised_weights(on_cpu, monkeypatch, capsys):
    dequantize = QuantizedTensor.dequantize

    def shifted(self, dtype=torch.bfloat16):  # each group dequantised with the previous group's scales
        if self.scheme == "int4":
            self = dataclasses.replace(self, scales=torch.roll(self.scales, 1, dims=-2))
        return dequantize(self, dtype)

    monkeypatch.setattr(QuantizedTensor, "dequantize", shifted)
    failures = gpu_check.quantized_section(TINY, (1,), 1.0)
    assert any(f.startswith("tiny int4") and "dequantised by torch" in f for f in failures), failures


def test_a_format_that_does_not_fit_is_skipped_with_its_numbers_not_failed(on_cpu, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "memory_shortfall",
                        lambda layer, fmt: "needs 80.5 GB of weights, 79.0 GB free" if fmt == "bf16" else "")
    assert gpu_check.quantized_section(TINY, (1, 16), 1.0) == []
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("| tiny H=256 I=128 E=4 | bf16 |") and "skipped: needs 80.5 GB" in line
               for line in lines)
    timed = [line for line in lines if line.startswith("| tiny H=256 I=128 E=4 | int4 | ")]
    assert len(timed) == 3 and all(line.endswith("| - |") for line in timed[1:])  # no bf16 to compare with


def test_running_out_of_memory_while_building_is_a_skip(on_cpu, monkeypatch, capsys):
    def out_of_memory(layer, fmt):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(gpu_check, "build_layer", out_of_memory)
    assert gpu_check.quantized_section(TINY, (1,), 1.0) == []
    assert capsys.readouterr().out.count("skipped: out of memory (CUDA out of memory") == 3


GRAPH = [(3, 4, 64, 32)]


def test_a_replay_that_reads_stale_inputs_fails_the_graph_check(on_cpu, monkeypatch, capsys):
    """A graph that does not see the tokens copied into its input after capture (here: a stand-in that replays the
    capture-time output) is caught; the stand-in that re-runs the layer passes."""
    assert gpu_check.graph_section(gpu_check.Backend(), GRAPH) == []

    class Frozen:
        def replay(self):
            pass

    monkeypatch.setattr(gpu_check, "capture_graph", lambda forward: (Frozen(), forward()))
    failures = gpu_check.graph_section(gpu_check.Backend(), GRAPH)
    assert len(failures) == 1 and "replay differs from the eager layer" in failures[0], failures


def test_a_failed_capture_is_a_failure_with_its_message(on_cpu, monkeypatch, capsys):
    def refuse(forward):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(gpu_check, "capture_graph", refuse)
    failures = gpu_check.graph_section(gpu_check.Backend(), GRAPH)
    assert failures == ["graph T=3 E=4 H=64 I=32: capture failed: operation not permitted when stream is capturing"]
    assert "| T=3 E=4 H=64 I=32 | 0 | capture failed |" in capsys.readouterr().out
