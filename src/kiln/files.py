"""Writing files so that a crash leaves either the old contents or the new ones."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

from kiln.errors import KilnError


def file_digest(path: Path | str, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in 8 MiB pieces (hashlib releases the GIL on
    each, so threads hash files side by side)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while piece := f.read(8 << 20):
            h.update(piece)
    return h.hexdigest()


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


def check_writable(folder: Path | str, what: str, fix: str) -> None:
    """Refuse, in one line, when `folder` cannot be written (or, when it does not exist yet,
    created): ``cannot write WHAT: PLACE is on a read-only file system; FIX``.

    A real attempt, not os.access alone (root passes every permission check, but a read-only
    mount refuses even root, with EROFS): an empty folder is made and removed in the nearest
    folder that exists, so nothing is left behind, and nothing changes where it fails."""
    folder = Path(folder)
    place = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not place.is_dir():
        raise KilnError(f"cannot write {what}: {place} is a file, not a folder; {fix}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".kiln-write-test-", dir=place))
    except OSError as e:
        why = {errno.EROFS: "on a read-only file system",
               errno.EACCES: "not writable (permission denied)",
               errno.EPERM: "not writable (operation not permitted)"}.get(
                   e.errno, f"not writable ({e.strerror or e})")
        where = "it" if place == folder else str(place)
        raise KilnError(f"cannot write {what}: {where} is {why}; {fix}") from None
