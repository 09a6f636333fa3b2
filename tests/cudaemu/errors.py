"""What the emulator raises."""

from __future__ import annotations


class EmulatorError(RuntimeError):
    """A kernel broke a CUDA rule the emulator checks (deadlock, bad warp mask, ...) or would not compile."""


class LaunchError(EmulatorError):
    """CUDA would refuse the launch itself (a zero dimension, too many threads, too much shared memory)."""
