"""The one exception type the CLI turns into a one-line error message, one-line warnings, and
quieting a library's own log lines."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager


class KilnError(Exception):
    """A problem with the user's input: the message names the problem and the fix.

    The CLI prints it as a single line and exits non-zero (traceback only with --debug).
    """


def one_line(e: BaseException | str) -> str:
    """An error's text on one line (libraries often raise multi-line messages)."""
    return " ".join(str(e).split())


_warned: set[str] = set()


def warn(message: str) -> None:
    """Print `kiln: warning: message` to stderr once per process (rank 0 only)."""
    if message in _warned or os.environ.get("RANK", "0") != "0":
        return
    _warned.add(message)
    print(f"kiln: warning: {message}", file=sys.stderr, flush=True)


@contextmanager
def quiet_loggers(*names: str):
    """Only errors from the `logging` loggers `names` while inside (a library's chatter about
    what kiln handles itself); their levels are restored on the way out."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
