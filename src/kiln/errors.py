"""The one exception type the CLI turns into a one-line error message, and one-line warnings."""

from __future__ import annotations

import os
import sys


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
