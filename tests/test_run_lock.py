"""One writer per run directory: a second `kiln train` on a directory that another process
trains in is refused in one line, and the first run finishes as if it had been alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import assert_one_line_error, kiln_here, snapshot, write_config

from kiln.runlock import RunLock


def kiln_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kiln", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_holder(run: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until RUN/.lock names the running process `proc`."""
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        try:
            if json.loads((run / ".lock").read_text()).get("pid") == proc.pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    raise AssertionError(f"pid {proc.pid} never held the lock on {run} while it ran")


def steps_logged(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def test_second_train_on_a_run_directory_is_refused_and_the_first_finishes_unharmed(
        pydoc_tokens, tmp_path):
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, tmp_path / "run",
                          trainer={"max_duration": 30, "threads": 1, "eval_interval": 0},
                          checkpoint={"interval": 10})
    first = kiln_process("train", config)
    alone = kiln_process("train", config, f"--trainer.run_dir={tmp_path / 'alone'}")
    try:
        wait_for_holder(tmp_path / "run", first)
        # the first run is paused while it holds the lock, so that the two overlap for sure
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run([sys.executable, "-m", "kiln", "train", config],
                                capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)  # (nothing if it has exited)
    assert second.returncode == 2
    assert_one_line_error(second, f"pid {first.pid} on {socket.gethostname()}", "since",
                          "wait for", "trainer.run_dir")
    assert first.wait(timeout=120) == 0, first.stderr.read()
    assert alone.wait(timeout=120) == 0, alone.stderr.read()
    assert steps_logged(tmp_path / "run") == list(range(1, 31))
    a = load_file(tmp_path / "run" / "checkpoints" / "step30" / "model.safetensors")
    b = load_file(tmp_path / "alone" / "checkpoints" / "step30" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "run" / ".lock").exists()  # released at the end


def test_lock_left_by_a_dead_process_is_taken_over_with_a_warning(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, run,
                          trainer={"max_duration": 2, "eval_interval": 0})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                           "since": "2024-01-01T00:00:00+00:00"}))
    out = kiln_here("train", config)
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if str(run / ".lock") in line]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"kiln: warning: took over the lock of dead process {dead.pid}")
    assert not (run / ".lock").exists()


def test_lock_left_on_another_host_warns_that_it_may_still_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"host": "node-17", "pid": 4242, "since": "noon"}))
    lock = RunLock(run)
    err = capsys.readouterr().err
    assert "pid 4242 on node-17" in err and "may still be running" in err
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / ".lock").exists()


@pytest.fixture
def held_run(pydoc_tokens, tmp_path):
    """A trained run directory whose lock another process holds: (config, run, holder)."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, run,
                          trainer={"max_duration": 2, "eval_interval": 0})
    assert kiln_here("train", config).returncode == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from kiln.runlock import RunLock; "
         "RunLock(sys.argv[1]); print('held', flush=True); sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield config, run, holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_read_only_commands_work_on_a_run_that_another_process_trains(held_run):
    config, run, holder = held_run
    before = snapshot(run)
    out = kiln_here("inspect", run)
    assert out.returncode == 0 and "step            2" in out.stdout, out.stderr
    out = kiln_here("generate", run, "--prompt", "The", "--max-new-tokens", "4", "--greedy")
    assert out.returncode == 0 and out.stdout.startswith("The"), out.stderr
    # training is what takes the lock
    refused = kiln_here("train", config)
    assert refused.returncode == 2
    assert_one_line_error(refused, f"pid {holder.pid}")
    assert snapshot(run) == before
