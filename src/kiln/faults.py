"""Fault drills: environment variables that make one thing fail on purpose, so that every
recovery path can be rehearsed on a real run. Unset, each costs nothing.

    KILN_FAULT_SAVE=N        the first N checkpoint saves of the process fail with an I/O
                             error after writing their weights (checkpoint.on_save_error)
    KILN_FAULT_SAVE=stepS    every save of step S fails (async saves, the cleanup)
    KILN_FAULT_LOSS=S:F      step S's loss (and so its gradients) is multiplied by F: nan
                             makes a non-finite step, 1000 a spike (docs/stability.md)
    KILN_FAULT_INJECT=R:S    rank R raises just before step S: a failing rank must take the
                             whole job down (docs/scaling.md)
"""

from __future__ import annotations

import errno
import os

saves_failed = [0]
"""How many saves KILN_FAULT_SAVE=N has failed so far in this process."""


def save(step: int) -> None:
    """Raise the I/O error KILN_FAULT_SAVE asks for at the save of `step`, if it does."""
    spec = os.environ.get("KILN_FAULT_SAVE") or "0"
    if spec == f"step{step}" or (spec.isdigit() and saves_failed[0] < int(spec)):
        saves_failed[0] += 1
        raise OSError(errno.EIO, "Input/output error (injected by KILN_FAULT_SAVE)")


def loss_factor() -> tuple[int, float] | None:
    """(step, factor) of KILN_FAULT_LOSS, or None."""
    spec = os.environ.get("KILN_FAULT_LOSS")
    if not spec:
        return None
    step, _, factor = spec.partition(":")
    return int(step), float(factor)


def failing_step(rank: int) -> int | None:
    """The step before which KILN_FAULT_INJECT makes this rank raise, or None."""
    spec = os.environ.get("KILN_FAULT_INJECT")
    if not spec:
        return None
    r, _, step = spec.partition(":")
    return int(step) if int(r) == rank else None
