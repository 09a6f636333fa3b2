"""The sanitizer runtimes: an asan/tsan module loads only into a process started with its runtime preloaded."""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess

from tests.cudaemu.errors import EmulatorError

RUNTIMES = {"asan": ("libasan.so", "__asan_init"), "tsan": ("libtsan.so", "__tsan_init")}
OPTIONS = {
    # Python and torch leak by design at exit; the kernels' reports are what matter.
    "asan": {"ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"},
    # torch's OpenMP workers (libgomp, not instrumented) would read as races inside torch.
    "tsan": {"TSAN_OPTIONS": "exitcode=66", "OMP_NUM_THREADS": "1"},
}


@functools.cache
def runtime_library(variant: str) -> str:
    """The path of g++'s shared runtime for `variant` ("asan" or "tsan")."""
    name = RUNTIMES[variant][0]
    path = subprocess.run(["g++", f"-print-file-name={name}"], check=True, capture_output=True,
                          text=True).stdout.strip()
    return os.path.realpath(path)


def sanitizer_env(variant: str) -> dict[str, str]:
    """Environment variables to add for a subprocess that loads `variant` modules (empty for "plain")."""
    if variant == "plain":
        return {}
    return {"LD_PRELOAD": runtime_library(variant), **OPTIONS[variant]}


def runtime_loaded(variant: str) -> bool:
    """Whether this process has `variant`'s sanitizer runtime (always true for "plain")."""
    if variant == "plain":
        return True
    try:
        ctypes.CDLL(None)[RUNTIMES[variant][1]]
    except AttributeError:
        return False
    return True


def require_runtime(variant: str) -> None:
    """EmulatorError naming the environment to start with, unless `variant` can be loaded here."""
    if not runtime_loaded(variant):
        env = " ".join(f"{key}={value}" for key, value in sanitizer_env(variant).items())
        raise EmulatorError(f"a {variant} module loads only into a process started with its sanitizer runtime "
                            f"preloaded: run it with LD_PRELOAD set, e.g. {env} (tests.cudaemu.sanitizer_env)")
