"""A run directory: what makes a folder one, and what a run checks of it before writing.

kiln's config.yaml in a run directory starts with :data:`CONFIG_HEADER`; a folder holding
checkpoints or that file is a run directory. A new run never writes into a folder holding
other files (a user's own), nor into a place it cannot write; the config it saves names its
local data paths absolutely, so `kiln train RUN_DIR` resumes from any working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from kiln import checkpoint as ckpt
from kiln.errors import KilnError
from kiln.files import check_writable
from kiln.runlock import LOCK_FILE

CONFIG_HEADER = "# kiln run config: written by `kiln train`, which resumes this run from it\n"
"""The first line of the config.yaml kiln writes into a run directory: how a run directory
is told from a folder of the user's that happens to hold a config.yaml."""


def is_run_dir(folder: Path) -> bool:
    """A folder kiln trains in: it holds checkpoints, or the config.yaml kiln wrote."""
    if ckpt.checkpoints_dir(folder).is_dir():
        return True
    try:
        with open(folder / "config.yaml", "rb") as f:
            return f.read(len(CONFIG_HEADER)) == CONFIG_HEADER.encode()
    except OSError:
        return False


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse a trainer.run_dir that is a file, or a folder that holds files but is not a kiln
    run directory (a user's own folder: a new run would write its config.yaml and metrics
    over theirs). Reads only; the dry run checks it too."""
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise KilnError(f"trainer.run_dir {str(run)!r} is a file, not a folder; choose a folder "
                        "for the run (it is created if missing)")
    if not run.is_dir() or is_run_dir(run):
        return
    theirs = sorted(p.name for p in run.iterdir() if p.name != LOCK_FILE)
    if theirs:
        raise KilnError(
            f"trainer.run_dir {str(run)!r} holds files kiln did not write ({', '.join(theirs[:3])}"
            f"{', ...' if len(theirs) > 3 else ''}) and is not a kiln run directory; a run writes "
            "its config.yaml, metrics and checkpoints there: choose an empty or new folder")


def check_run_dir_writable(run_dir: str | Path) -> None:
    """Refuse, in one line, a trainer.run_dir that cannot be written (a read-only mount, a
    folder of another user): a run writes its config, metrics and checkpoints there."""
    run = Path(run_dir)
    if ckpt.checkpoints_dir(run).is_dir():  # a run to resume: its checkpoints can seed another
        fix = ("a run needs a writable trainer.run_dir: copy the run somewhere writable and "
               f"train the copy, or start a new run from it with --trainer.run_dir=ELSEWHERE "
               f"--init.from={run}")
    else:
        fix = "a run needs a writable trainer.run_dir: set --trainer.run_dir=ELSEWHERE"
    check_writable(run, f"the run directory {run}", fix)


def absolute(paths: list[str]) -> list[str]:
    """Relative local paths (globs too) made absolute against the working directory; URLs,
    absolute paths and names that are not paths here (a tokenizer alias, a task name) as
    given."""
    from kiln.data.remote import is_url

    def fix(p: str) -> str:
        if is_url(p) or os.path.isabs(p):
            return p
        if os.path.exists(p) or any(c in p for c in "*?[") or os.sep in p:
            return os.path.abspath(p)
        return p

    return [fix(p) for p in paths]
