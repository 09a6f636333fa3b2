"""Herd's private files on local disk (the SQLite database, the usage journal, the admin token): made
owner-only whatever the process umask, since they hold key hashes, usage and the admin credential.

A mode passed to mkdir/open is masked by the umask, which only ever removes bits, so 0o700 and 0o600 are
what a umask of 0 gets and at most what any other gets. Existing files and directories are left as they
are: they are the operator's (a Kubernetes Secret's mount, a directory shared on purpose).
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


def private_directory(path: Path) -> None:
    """`path` and any missing parents, each made owner-only (existing ones untouched)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        with suppress(FileExistsError):  # another process made it meanwhile
            directory.mkdir(mode=DIRECTORY_MODE)


def private_file(path: Path) -> None:
    """`path` as an owner-only empty file when absent (its directory made as by private_directory)."""
    private_directory(path.parent)
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))


def open_private(path: Path, flags: int) -> int:
    """os.open of `path` with `flags`, a file it creates being owner-only (its directory too)."""
    private_directory(path.parent)
    return os.open(path, flags, FILE_MODE)


__all__ = ["DIRECTORY_MODE", "FILE_MODE", "open_private", "private_directory", "private_file"]
