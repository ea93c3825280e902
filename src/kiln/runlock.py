"""One writer per run directory: a lock that a training process holds for as long as it trains.

A double submission, or a scheduler requeue while the old job still runs, would otherwise put
two `kiln train` processes in one run directory, each writing metrics and checkpoints over the
other's. Rank 0 takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``RUN_DIR/.lock`` and writes who
holds it (host, pid, start time) into the file; a second `kiln train` on the directory is
refused in one line that names the holder. Read-only commands (generate, eval, inspect,
export) take no lock.

What it promises: on a local file system, and on a shared one whose locks work across hosts
(NFSv4, NFSv3 with a lock daemon, Lustre mounted with ``-o flock``, GPFS), only one process
holds the lock at a time. The kernel releases it when the holder exits, however it exits, so a
crash or ``kill -9`` never leaves a directory locked. A clean release removes the file; one
left behind is only a record, and the next run takes the lock over with a warning (the
holder's pid is gone, or it was on another host).

What it does not: where locks are local to each host (NFS mounted with ``nolock`` or
``local_lock=flock``, Lustre with ``-o localflock``), jobs on two hosts both get the lock; the
second only warns that the record names a holder on another host that may still be running.
Where the file system has no locks at all (Lustre without ``flock``), the run warns and goes
on unlocked. It guards against a second `kiln train`, not against other programs.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.errors import KilnError, warn

if TYPE_CHECKING:
    import torch

    from kiln.parallel import DistInfo

LOCK_FILE = ".lock"
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


class RunLock:
    """The lock on `run_dir` (created if missing), taken on construction: KilnError naming the
    holder when another process has it. `release()` removes the file and any folder it
    created that is still empty."""

    def __init__(self, run_dir: str | Path):
        run_dir = Path(run_dir)
        self.path = run_dir / LOCK_FILE
        self._made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        self._fd: int | None = None
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._fd = self._lock()
            self._check_record()
            me = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.now().astimezone().isoformat(timespec="seconds")}
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(self._fd)
        except BaseException as e:
            self.release()
            if isinstance(e, OSError):
                raise KilnError(f"cannot lock the run directory: {self.path}: {e.strerror}; a "
                                "run needs a writable trainer.run_dir") from None
            raise

    def _lock(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = describe(read_record(fd))
                os.close(fd)
                raise KilnError(
                    f"run directory {str(self.path.parent)!r} is being trained by {holder} (it "
                    f"holds {self.path}); wait for that run to finish or stop it, or train into "
                    "a different trainer.run_dir") from None
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    os.close(fd)
                    raise
                warn(f"{self.path}: the file system has no locks ({e.strerror}); nothing stops "
                     "a second `kiln train` on this run directory")
                return fd
            if _same_file(fd, self.path):  # else a releasing holder unlinked it: open again
                return fd
            os.close(fd)

    def _check_record(self) -> None:
        """Warn about a holder that stopped without releasing the lock."""
        held = read_record(self._fd)
        if not held:
            return
        if held.get("host") == socket.gethostname():
            if not _alive(held.get("pid")):
                warn(f"took over the lock of dead process {held.get('pid')} on this host "
                     f"({self.path}, held since {held.get('since', '?')}); it stopped without "
                     "releasing it")
        else:
            warn(f"took over {self.path} from {describe(held)}, which did not release it: it "
                 "may still be running if this file system does not share locks between "
                 "hosts; make sure it has stopped")

    def release(self) -> None:
        """Let the run directory go (again: nothing)."""
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)  # while still locked: see _lock
            finally:
                os.close(self._fd)
                self._fd = None
        for p in self._made:  # a run that stopped before writing anything leaves no folder
            try:
                p.rmdir()
            except OSError:
                break
        self._made = []


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), path.stat())
    except FileNotFoundError:
        return False


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return True  # unknown: say nothing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def read_record(fd: int) -> dict:
    """The holder a lock file names ({} when it is empty or unreadable)."""
    try:
        held = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


def describe(held: dict) -> str:
    if "pid" not in held:
        return "another process (which has not written its name yet)"
    return f"pid {held['pid']} on {held.get('host', '?')} since {held.get('since', '?')}"


def hold(run_dir: str | Path, info: DistInfo, device: torch.device) -> RunLock | None:
    """Rank 0 takes the run directory's lock (other ranks: None); with several ranks every
    rank learns whether it could, so that none waits alone for a rank that has stopped."""
    lock, error = None, None
    if info.is_main:
        try:
            lock = RunLock(run_dir)
        except KilnError as e:
            error = e
    if info.enabled:
        import torch
        import torch.distributed as dist

        refused = torch.tensor([float(error is not None)], device=device)
        dist.broadcast(refused, src=0)
        if refused.item() and error is None:
            raise KilnError("rank 0 could not lock the run directory (see its error)")
    if error is not None:
        raise error
    return lock


def released_on_error(init):
    """For an `__init__` that sets `self.run_lock`: the lock is let go if the rest raises."""
    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except BaseException:
            if getattr(self, "run_lock", None) is not None:
                self.run_lock.release()
            raise
    return wrapper
