"""Where the Files API keeps file bytes: a local directory (owner-only files, as Herd's other private files).

A file is written once under its key and never changed; the metadata (tenant, size, purpose) is in the
tenancy database (StoredFile), so the store is a plain key -> bytes map. Another store (S3-compatible object
storage) would implement the same three methods.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Protocol

from herd.platform.tenancy.files import open_private, private_directory

_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class FileStore(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes: ...

    async def delete(self, key: str) -> None: ...


class LocalFileStore:
    """Files in one directory: written to a temporary name and renamed, so a crash never leaves half a file
    under a key."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"file store key {key!r} is not a plain name")
        return self.directory / key

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, self._path(key), data)

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self._path(key).read_bytes)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, True)

    def _write(self, path: Path, data: bytes) -> None:
        private_directory(self.directory)
        partial = path.with_name(path.name + ".partial")
        fd = open_private(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)


__all__ = ["FileStore", "LocalFileStore"]
