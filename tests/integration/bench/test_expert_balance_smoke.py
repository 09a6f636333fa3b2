"""bench/expert_balance.py at its --smoke size, as `.venv/bin/python bench/expert_balance.py --smoke` runs it: it must
finish with exit code 0 and print its table, a row per load, E and shard count. Nothing is timed; the timeout only
stops a hang."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
HANG_S = 300  # the smoke run takes about a second; only a hang reaches this
HEADER = ("| load | experts | shards | slots | static max rows | balanced max rows | ideal | balanced / static | "
          "copies moved |")


def test_expert_balance_smoke_prints_a_row_per_load_and_shard_count() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "expert_balance.py"), "--smoke"], cwd=ROOT,
                            capture_output=True, text=True, timeout=HANG_S)
    output = f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
    assert result.returncode == 0, output
    lines = result.stdout.splitlines()
    assert HEADER in lines, output
    rows = [line.strip("|").split("|") for line in lines[lines.index(HEADER) + 2 :] if line.startswith("| ")]
    cells = [[cell.strip() for cell in row] for row in rows]
    # --smoke: E=16 on 2 and 4 shards, one spare slot each, T=256 top-1
    assert [(c[0], c[1], c[2], c[3], c[6]) for c in cells] == [
        ("zipf", "16", "2", "9", "128"), ("zipf", "16", "4", "5", "64"),
        ("hot", "16", "2", "9", "128"), ("hot", "16", "4", "5", "64"),
    ], output
    for c in cells:
        static, balanced, ratio = int(c[4]), int(c[5]), float(c[7])
        assert abs(ratio - balanced / static) <= 0.02 and int(c[8]) >= 0, output
