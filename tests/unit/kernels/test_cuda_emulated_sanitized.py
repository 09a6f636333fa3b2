"""test_cuda_emulated.py again, in a process started with ASan+UBSan's runtime preloaded and once with TSan's
(tests.cudaemu.sanitizer_env): herd's kernels, launched by herd.kernels.cupy_moe, clean under each sanitizer.

The child is pytest on that module (as `python -m pytest -q -p no:cacheprovider FILE`, through pytest.main so it
can also say whether the sanitizer's runtime is loaded there and how many tests it collected): a run that fell
back to the plain build, collected nothing, or skipped or deselected any test fails here. A sanitizer report fails
the child's exit status (ASan/UBSan abort; TSan exits 66). Here: about 15 s under ASan, 28 s under TSan.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cudaemu import sanitizer_env

REPO = Path(__file__).resolve().parents[3]
TARGET = "tests/unit/kernels/test_cuda_emulated.py"
CHILD = """
import sys
import pytest
from tests.cudaemu import runtime_loaded

class Collected:
    count = 0
    def pytest_collection_finish(self, session):
        Collected.count = len(session.items)

status = pytest.main(sys.argv[2:], plugins=[Collected()])
print(f"child: {sys.argv[1]} runtime loaded {runtime_loaded(sys.argv[1])}, {Collected.count} collected")
sys.exit(status)
"""


@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_herds_kernels_run_clean_under_the_sanitizer(variant: str) -> None:
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    env.update(sanitizer_env(variant))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run([sys.executable, "-c", CHILD, variant, "-q", "-p", "no:cacheprovider", TARGET],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Sanitizer" not in result.stderr.replace("ASan doesn't fully support makecontext", ""), output[-6000:]
    child = re.search(rf"^child: {variant} runtime loaded (\w+), (\d+) collected$", result.stdout, re.MULTILINE)
    assert child is not None and child[1] == "True", output[-6000:]
    summary = re.search(r"^(\d+) passed(, \d+ warnings?)? in [\d.]+s", result.stdout, re.MULTILINE)
    assert summary is not None, output[-6000:]  # "N passed" alone: nothing failed, skipped, deselected, xfailed
    assert int(summary[1]) == int(child[2]) > 0
