"""Stopping early, cleanly: preemption signals, the decision every rank takes together, and a
peer that died.

SIGTERM / SIGINT / SIGUSR1 finish the current step, save a checkpoint and stop (a second one
aborts at once, leaving the checkpoints as they are). With several ranks the stop is agreed at
logging steps (one tiny all-reduce), so every rank stops after the same step. A collective
broken by a peer that went away becomes one line naming the rank and the step.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist

from kiln.errors import KilnError, one_line
from kiln.parallel import DistInfo


class Preemption:
    def __init__(self, dist_info: DistInfo, device: torch.device, log_interval: int):
        self.dist, self.device, self.log_interval = dist_info, device, log_interval
        self.requested: str | None = None
        """Why the run stops early (a signal's name, a peer's signal, a spike), or None."""

    def request(self, reason: str) -> None:
        self.requested = reason

    @contextmanager
    def signals(self):
        """Catch the preemption signals while training (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.requested is not None:
                sys.stderr.write(f"kiln: second signal ({name}): aborting now; existing "
                                 "checkpoints are untouched\n")
                sys.stderr.flush()
                os._exit(128 + signum)
            self.requested = name
            sys.stderr.write(f"kiln: {name} received: finishing this step, then saving a "
                             "checkpoint (send it again to abort at once)\n")
            sys.stderr.flush()

        sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
        previous = {s: signal.signal(s, handler) for s in sigs}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def should_stop(self, step: int, stop_step: int) -> bool:
        """Whether to stop after `step`: a request on any rank stops all ranks after the same
        step. With several ranks the flags are compared at logging steps only, keeping a host
        sync out of every step: a signal then takes effect within log.interval steps."""
        flag = self.requested is not None
        if not self.dist.enabled:
            return flag
        if step % self.log_interval and step != stop_step:
            return False
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t.item() > 0 and self.requested is None:
            self.requested = "a peer's signal"
        return bool(t.item() > 0)

    def lost_peer(self, e: BaseException, step: int) -> KilnError | None:
        """The one-line error for a collective that failed because another process of the job
        went away (None: `e` is something else)."""
        if not (self.dist.enabled and isinstance(e, RuntimeError) and _lost_peer(e)):
            return None
        return KilnError(
            f"rank {self.dist.rank} lost a peer at step {step} (another process of the job "
            f"failed or was killed: {_peer_error(e)}); earlier checkpoints are intact: fix the "
            "failed rank (its own error is above) and resume with the same command")


def _lost_peer(e: RuntimeError) -> bool:
    text = str(e)
    return isinstance(e, dist.DistError) or any(s in text for s in (
        "Connection reset", "closed by peer", "Connection closed", "Broken pipe",
        "Connection refused", "Socket Timeout", "timed out"))


def _peer_error(e: RuntimeError) -> str:
    """The library's words without its source location ("[.../pair.cc:553] ")."""
    return re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", one_line(e))[:100]
