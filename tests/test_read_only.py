"""Read-only places: a run on a read-only mount is refused in one line naming the path and the
way around it (--no-write, a writable trainer.run_dir), and nothing there changes. Also: the
staging folders of killed `kiln prepare` runs are removed by the next prepare."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, kiln_here, snapshot, write_config
from test_survival import _mount_tmpfs


def _unmount(where: Path) -> None:  # lazily if busy: a mount left behind breaks tmp cleanup
    if subprocess.run(["umount", str(where)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="module")
def read_only(pydoc_tokens, tmp_path_factory):
    """(mount, run): a tiny run stopped at step 4 of 8 (so `kiln train RUN` would resume it),
    copied into a tmpfs that is then remounted read-only."""
    root = tmp_path_factory.mktemp("ro")
    over = dict(trainer={"max_duration": 8, "hard_stop": 4, "eval_interval": 0},
                checkpoint={"interval": 4}, log={"console": False})
    out = kiln_here("train", write_config(root / "c.yaml", pydoc_tokens, root / "run", **over))
    assert out.returncode == 0, out.stderr
    mount = root / "mnt"
    if not _mount_tmpfs(mount, 16 << 20):
        pytest.skip("needs root and mount(8) to make a read-only tmpfs")
    try:
        shutil.copytree(root / "run", mount / "run", symlinks=True)
        done = subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot remount a tmpfs read-only: {done.stderr.decode().strip()}")
        assert not os.access(mount, os.W_OK)  # even for root
        yield mount, mount / "run"
    finally:
        _unmount(mount)


@pytest.fixture
def ro(read_only):
    mount, run = read_only
    before = snapshot(mount)
    yield mount, run
    assert snapshot(mount) == before
    assert not list(mount.rglob(".kiln-write-test-*"))


def test_resume_on_a_read_only_mount_is_refused_in_one_line(ro):
    _, run = ro
    out = kiln_here("train", run)
    assert_one_line_error(out, f"run directory {run}", "read-only", "writable trainer.run_dir",
                          f"--init.from={run}")


def test_a_new_run_under_a_read_only_mount_is_refused_in_one_line(ro, pydoc_tokens, tmp_path):
    mount, _ = ro
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, mount / "new" / "run")
    out = kiln_here("train", config)
    assert_one_line_error(out, f"{mount / 'new' / 'run'}", "read-only",
                          "--trainer.run_dir=ELSEWHERE")
    assert not (mount / "new").exists()


def test_eval_is_refused_naming_no_write_and_works_with_it(ro, pydoc_tokens):
    _, run = ro
    args = ("eval", run, "--data", pydoc_tokens, "--limit", "2", "--device", "cpu")
    out = kiln_here(*args)
    assert_one_line_error(out, str(run / "eval" / "step4.json"), "read-only", "--no-write")
    assert out.stdout == ""  # refused before the evaluation
    out = kiln_here(*args, "--no-write")
    assert out.returncode == 0, out.stderr
    assert "nats/token" in out.stdout and "wrote" not in out.stdout


def test_schedule_is_refused_naming_no_write_and_works_with_it(ro):
    _, run = ro
    out = kiln_here("schedule", run)
    assert_one_line_error(out, str(run / "plots" / "lr.png"), "read-only", "--no-write")
    out = kiln_here("schedule", run, "--no-write")
    assert out.returncode == 0, out.stderr
    assert "<- now" in out.stdout and "wrote" not in out.stdout


def test_prepare_into_a_read_only_mount_is_refused_in_one_line(ro, tmp_path):
    mount, _ = ro
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} of a corpus"}) + "\n"
                              for i in range(20)))
    out = kiln_here("prepare", corpus, "--out", mount / "tokens", "--vocab-size", "300",
                    "--no-progress")
    assert_one_line_error(out, str(mount / "tokens"), "read-only", "--out")


def test_next_prepare_removes_dead_staging_folders_and_says_so(pydoc_tokens, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} of a corpus"}) + "\n"
                              for i in range(20)))
    out = tmp_path / "out"
    dead = out / ".prepare-tokens-999999"  # a prepare killed mid-way (no such process)
    (dead / "tokens.bin").parent.mkdir(parents=True)
    (dead / "tokens.bin").write_bytes(b"\0" * 64)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            live = out / f".prepare-tokens-{other.pid}"  # a prepare that is running
            live.mkdir()
            done = kiln_here("prepare", corpus, "--out", out, "--tokenizer",
                             pydoc_tokens.parent / "tokenizer.json", "--overwrite",
                             "--no-progress")
        finally:
            other.kill()
    assert done.returncode == 0, done.stderr
    assert not dead.exists() and live.is_dir()
    warnings = [line for line in done.stderr.splitlines() if line.startswith("kiln: warning:")]
    assert len(warnings) == 1 and dead.name in warnings[0] and live.name not in warnings[0]
    assert sorted(os.listdir(out)) == [live.name, "tokenizer.json", "tokens.bin", "tokens.json"]
