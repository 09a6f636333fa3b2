"""The wheel as a fresh clone builds it: from the files git tracks and nothing else (no generated gRPC code,
no build leftovers), so a test of it proves what `pip wheel .` gives a user."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_wheel(work: Path) -> Path:
    """Copy the tracked files to `work`/source, build the wheel into `work`/dist, and return its path."""
    source = work / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    assert not (source / "herd" / "protos" / "herd").exists(), "generated code is not tracked"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(work / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (work / "dist").glob("herd-*.whl")
    return wheel
