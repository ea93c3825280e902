"""Writing files so that a crash leaves either the old contents or the new ones."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` all at once: written and fsynced as `.NAME.tmp` beside it,
    then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_synced(tmp, data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
