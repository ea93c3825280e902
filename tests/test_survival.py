"""A run either makes progress that is saved, or stops loudly with its earlier checkpoints
intact: NaN losses, torn metrics, a full disk, damaged checkpoints (real `kiln` processes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import assert_one_line_error, kiln, kiln_here, snapshot, write_config

from kiln import checkpoint as ckpt


def steps_on_disk(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name != "latest")


def all_finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors"))
               .values())


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_nan_never_checkpointed_last_good_kept_and_the_named_resume_route_works(
        pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, run,
                          trainer={"max_duration": 20, "eval_interval": 0, "hard_stop": 6},
                          checkpoint={"interval": 2, "keep_last": 2}, log={"interval": 10})
    assert kiln_here("train", config).returncode == 0
    # the LR is raised far too high: the loss blows up within a few steps
    out = kiln_here("train", run, "--optim.lr=1e6", "--trainer.hard_stop=null")
    assert_one_line_error(out, "non-finite", "step6", "--optim.lr=")
    for folder in (run / "checkpoints").glob("step*"):
        assert all_finite(folder), f"{folder} holds non-finite weights"
    assert ckpt.latest_checkpoint(run).name == "step6"  # retention kept the last good one
    # the route the message names: resume from it with a lower LR
    route = re.search(r"kiln train (\S+) --optim\.lr=(\S+)", out.stderr)
    assert Path(route.group(1)) == run
    lower = float(route.group(2))
    assert lower <= 3e-4
    out = kiln_here("train", route.group(1), f"--optim.lr={route.group(2)}")
    assert out.returncode == 0, out.stderr
    final = ckpt.latest_checkpoint(run)
    assert final.name == "step20" and all_finite(final)
    lrs = {r["step"]: r["lr"] for r in records(run) if "lr" in r}
    assert max(v for s, v in lrs.items() if s > 6) <= lower  # the scaled schedule was used


def test_nan_from_the_first_steps_writes_no_checkpoint(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, run,
                          trainer={"max_duration": 20, "eval_interval": 0},
                          checkpoint={"interval": 2, "keep_last": 2}, log={"interval": 10},
                          optim={"lr": 1e6})
    out = kiln_here("train", config)
    assert_one_line_error(out, "non-finite")
    for folder in (run / "checkpoints").glob("step*"):
        assert all_finite(folder), f"{folder} holds non-finite weights"


def test_torn_last_metrics_line_is_dropped_on_resume(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, run,
                          trainer={"max_duration": 6, "hard_stop": 3})
    assert kiln_here("train", config).returncode == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "tokens": 1024, "lo')  # the disk filled mid-record
    out = kiln_here("train", run, "--trainer.hard_stop=null")
    assert out.returncode == 0, out.stderr
    assert "dropped 1 unreadable line" in out.stderr
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_deleted_checkpoints_start_over_but_keep_the_metrics_history(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, run)
    assert kiln_here("train", config).returncode == 0
    old = (run / "metrics.jsonl").read_text()
    shutil.rmtree(run / "checkpoints")
    out = kiln_here("train", config)
    assert out.returncode == 0, out.stderr
    assert "no checkpoint to resume from" in out.stderr
    assert (run / "metrics.prev-1.jsonl").read_text() == old


# -- damaged checkpoints -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_six(pydoc_tokens, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("six")
    run = root / "run"
    config = write_config(root / "c.yaml", pydoc_tokens, run,
                          trainer={"max_duration": 12, "hard_stop": 6})
    assert kiln_here("train", config).returncode == 0
    return run


@pytest.fixture
def six_steps(trained_six, tmp_path) -> tuple[None, Path]:
    """A run stopped at step 6 of 12 (checkpoints at 3 and 6), copied for one test (a copied
    run resumes itself: nothing in it is edited)."""
    run = tmp_path / "run"
    shutil.copytree(trained_six, run)
    return None, run


def test_missing_weights_in_latest_are_refused_not_replaced(six_steps):
    _, run = six_steps
    (run / "checkpoints" / "step6" / "model.safetensors").unlink()
    before = snapshot(run)
    out = kiln_here("train", run, "--trainer.hard_stop=null")
    assert_one_line_error(out, "step6", "damaged", "model.safetensors", "step3")
    assert snapshot(run) == before


def test_foreign_empty_optimizer_state_is_refused_on_resume(six_steps):
    _, run = six_steps
    optim = run / "checkpoints" / "step6" / "optim.pt"
    state = torch.load(optim, weights_only=True)
    torch.save({"state": {}, "param_groups": state["param_groups"]}, optim)
    before = snapshot(run)
    out = kiln_here("train", run, "--trainer.hard_stop=null")  # its manifest gives it away
    assert_one_line_error(out, "step6/optim.pt differs from the manifest written at save",
                          "--resume-from=step3")
    # without a manifest (a checkpoint of an earlier kiln), its contents give it away
    (run / "checkpoints" / "step6" / "manifest.json").unlink()
    before = snapshot(run)
    out = kiln_here("train", run, "--trainer.hard_stop=null")
    warning, error = out.stderr.strip().splitlines()  # it says that it cannot verify
    assert warning.startswith("kiln: warning: ") and "no manifest.json" in warning
    out.stderr = error
    assert_one_line_error(out, "step6/optim.pt", "no Adam state", "init.load_optimizer=false")
    assert snapshot(run) == before


def test_generate_refuses_a_checkpoint_missing_a_tensor(six_steps):
    _, run = six_steps
    weights = run / "checkpoints" / "step6" / "model.safetensors"
    state = load_file(str(weights))
    gone = next(k for k in sorted(state) if k.startswith("blocks.1."))
    del state[gone]
    save_file(state, str(weights))
    ckpt.write_manifest(weights.parent, 6)  # consistent with the new file: the loader decides
    out = kiln_here("generate", run, "--prompt", "The")
    assert_one_line_error(out, "model.safetensors", gone)


def test_a_kill_during_retention_leaves_nothing_behind(six_steps):
    config, run = six_steps
    # what a kill in the middle of deleting an old checkpoint leaves: a renamed, half-deleted
    # folder, never a step{N} without its weights
    half = run / "checkpoints" / ".del-step0"
    half.mkdir()
    (half / "trainer.json").write_text("{}")
    out = kiln_here("train", run, "--trainer.hard_stop=null", "--checkpoint.keep_last=1")
    assert out.returncode == 0, out.stderr
    assert steps_on_disk(run) == ["step12"]


# -- a full disk -------------------------------------------------------------------------------


def test_retention_left_undone_by_a_kill_after_the_last_save_is_applied_on_rerun(
        pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, run,
                          trainer={"max_duration": 6, "eval_interval": 0},
                          checkpoint={"interval": 2, "keep_last": 0})
    assert kiln_here("train", config).returncode == 0
    assert steps_on_disk(run) == ["step2", "step4", "step6"]
    # as if killed between the final save's rename and its retention under keep_last=2
    out = kiln_here("train", run, "--checkpoint.keep_last=2")
    assert out.returncode == 0, out.stderr
    assert steps_on_disk(run) == ["step4", "step6"]


def same_weights(a: Path, b: Path) -> bool:
    """(In a function, so that the memory-mapped files are closed when it returns: an open
    mapping keeps the tmpfs busy.)"""
    got = load_file(str(a / "model.safetensors"))
    want = load_file(str(b / "model.safetensors"))
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                         capture_output=True)
    return out.returncode == 0


@pytest.mark.slow
def test_full_disk_during_a_save(pydoc_tokens, tmp_path):
    # the free-space check would stop this run before the save: here the save itself must fail
    over = dict(trainer={"max_duration": 9, "eval_interval": 0},
                checkpoint={"interval": 3, "keep_last": 1, "check_free_space": False})
    ref = tmp_path / "ref"
    assert kiln("train", write_config(tmp_path / "ref.yaml", pydoc_tokens, ref, **over)
                ).returncode == 0
    size = sum(f.stat().st_size for f in (ref / "checkpoints" / "step9").iterdir())
    # room for two checkpoints and a half; a filler takes 0.8 of one: the second save fails
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, int(2.5 * size)):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * int(0.8 * size))
        run = disk / "run"
        config = write_config(tmp_path / "c.yaml", pydoc_tokens, run, **over)
        out = kiln("train", config)
        assert_one_line_error(out, "could not write checkpoint", "no space left", "MiB free",
                              "untouched")
        assert not list((run / "checkpoints").glob(".*tmp*"))
        assert steps_on_disk(run) == ["step3"] and all_finite(run / "checkpoints" / "step3")
        filler.unlink()  # space freed: resume to the end
        out = kiln("train", run)
        assert out.returncode == 0, out.stderr
        assert same_weights(run / "checkpoints" / "step9", ref / "checkpoints" / "step9")
    finally:  # lazily if busy: a mount left behind breaks pytest's cleanup of old tmp dirs
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_run_that_cannot_save_never_starts(pydoc_tokens, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 2**20):  # 1 MiB: less than one checkpoint of the test model
        pytest.skip("needs root to mount a small tmpfs")
    try:
        run = disk / "run"
        config = write_config(tmp_path / "c.yaml", pydoc_tokens, run)
        out = kiln_here("train", config)
        assert_one_line_error(out, "not enough disk space for a checkpoint", "MiB free",
                              "check_free_space=false")
        metrics = run / "metrics.jsonl"
        assert not (run / "checkpoints").exists()
        assert not metrics.exists() or not metrics.read_text()  # not a step was trained
        # with the check off the run starts, and its first save fails loudly instead
        out = kiln_here("train", config, "--checkpoint.check_free_space=false")
        assert_one_line_error(out, "could not write checkpoint", "no space left")
        assert not list((run / "checkpoints").glob("*step*"))
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_resume_on_changed_data_is_refused_and_names_the_ways_on(pydoc_tokens, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(pydoc_tokens.parent, data)
    tokens = data / pydoc_tokens.name
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tokens, run,
                          trainer={"max_duration": 6, "eval_interval": 0, "hard_stop": 3})
    assert kiln_here("train", config).returncode == 0
    ids = np.fromfile(tokens, dtype=np.uint16)  # the same size, other tokens: re-prepared
    ids[:32] = ids[:32][::-1].copy()
    ids.tofile(tokens)
    before = snapshot(run)
    out = kiln_here("train", run, "--trainer.hard_stop=null")
    assert_one_line_error(out, "training data changed since step3", f"{tokens} holds other",
                          "--init.load_data_position=false", "--data.allow_changed=true")
    assert snapshot(run) == before
    out = kiln_here("train", run, "--trainer.hard_stop=null", "--data.allow_changed=true")
    assert out.returncode == 0, out.stderr
    assert ckpt.latest_checkpoint(run).name == "step6"
