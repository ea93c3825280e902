"""Inputs a new user tried that left the one-line rule: a user's own folder as trainer.run_dir,
bad generate flags, YAML built to blow up, a full disk under prepare and under the metrics
file, a vocabulary no trainer can build. Each is refused in one line (exit 2), and nothing
the user had is changed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, kiln_here, snapshot, write_config
from test_survival import _mount_tmpfs


@pytest.fixture(scope="module")
def trained(pydoc_tokens, tmp_path_factory) -> Path:
    """A run stopped at step 4 of 8."""
    root = tmp_path_factory.mktemp("refusals")
    config = write_config(root / "c.yaml", pydoc_tokens, root / "run",
                          trainer={"max_duration": 8, "eval_interval": 0},
                          checkpoint={"interval": 4})
    r = kiln_here("train", config, "--trainer.hard_stop=4")
    assert r.returncode == 0, r.stderr
    return root / "run"


@pytest.fixture
def unmount():
    mounts: list[Path] = []
    yield mounts
    for m in mounts:  # lazily if busy: a mount left behind breaks pytest's cleanup
        if subprocess.run(["umount", str(m)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_a_users_own_folder_is_not_taken_for_a_run(pydoc_tokens, tmp_path):
    mine = tmp_path / "my-experiment"
    mine.mkdir()
    (mine / "config.yaml").write_text("model:\n  preset: tiny  # my notes, not kiln's\n")
    (mine / "metrics.jsonl").write_text('{"step": 1, "loss": 9.9}\n')
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, tmp_path / "elsewhere")
    before = snapshot(mine)
    for extra in ([], ["--dry-run"]):
        r = kiln_here("train", config, f"--trainer.run_dir={mine}", *extra)
        assert_one_line_error(r, "holds files kiln did not write (config.yaml, metrics.jsonl)",
                              "choose an empty or new folder")
        assert snapshot(mine) == before  # byte-identical
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_a_run_dir_that_is_a_file_is_refused_by_the_dry_run_too(pydoc_tokens, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, f)
    for extra in ([], ["--dry-run"]):
        assert_one_line_error(kiln_here("train", config, *extra), f"{f}' is a file")
    assert f.read_text() == "mine"


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "nan"], "temperature=nan must be a number >= 0"),
    (["--temperature", "inf"], "temperature=inf must be a number >= 0"),
    (["--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
    (["--num-samples", "0"], "num_samples=0 must be >= 1"),
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--device", "cuda"], "--device cuda but no CUDA device is visible"),
])
def test_generate_refuses_bad_flags_in_one_line(trained, flags, needle):
    import torch

    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = kiln_here("generate", trained, "--prompt", "The", "--max-new-tokens", "2", *flags)
    assert_one_line_error(r, needle)
    assert r.stdout == ""


def test_eval_refuses_a_device_that_is_not_there(trained, pydoc_tokens):
    r = kiln_here("eval", trained, "--data", pydoc_tokens, "--no-write", "--device", "cuda:7")
    assert_one_line_error(r, "--device cuda:7")


def test_an_alias_bomb_or_a_config_nested_too_deep_is_refused(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb.write_text("\n".join(lines) + "\nmodel: {preset: tiny}\n")  # 9^10 values expanded
    assert_one_line_error(kiln_here("train", bomb, "--dry-run"),
                          "expands to more than 1,000,000 values through its aliases")
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    assert_one_line_error(kiln_here("train", deep, "--dry-run"), "nested too deeply")
    # a config with a few aliases is still a config
    ok = tmp_path / "ok.yaml"
    ok.write_text("model: &m {preset: tiny}\ntrainer: {run_dir: " + str(tmp_path / "r") +
                  "}\ndata: {paths: [" + str(tmp_path / "none.bin") + "], seq_len: 64}\n")
    assert kiln_here("train", ok, "--dry-run").returncode == 0


def test_prepare_refuses_a_vocabulary_no_trainer_builds(pydoc_corpus, tmp_path):
    r = kiln_here("prepare", pydoc_corpus, "--out", tmp_path / "out",
                  "--vocab-size", "1000000000")
    assert_one_line_error(r, "--vocab-size 1,000,000,000 is above 16,777,216")
    assert not (tmp_path / "out").exists()


def test_prepare_on_a_full_disk_keeps_the_old_set_and_says_so(pydoc_corpus, tmp_path,
                                                               unmount):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 300 * 1024):  # the tokenizer fits, the tokens do not
        pytest.skip("needs root to mount a small tmpfs")
    unmount.append(disk)
    out = disk / "data"
    r = kiln_here("prepare", pydoc_corpus, "--out", out, "--vocab-size", "300", "--no-progress")
    assert_one_line_error(r, f"could not write the token files in {out}",
                          "no space left on device", "are unchanged")
    assert not out.exists() or not any(out.iterdir())
    # an old set, and a new one that does not fit beside it: the old one stays whole
    out.mkdir(exist_ok=True)
    (out / "tokens.bin").write_bytes(b"\x01\x00" * 100)
    (out / "tokens.json").write_text("{}")
    before = snapshot(out)
    r = kiln_here("prepare", pydoc_corpus, "--out", out, "--vocab-size", "300", "--overwrite",
                  "--no-progress")
    assert_one_line_error(r, "no space left on device", "are unchanged")
    assert snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_metrics_write_on_a_full_disk_leaves_no_torn_line(trained, tmp_path, unmount):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 64 * 1024):
        pytest.skip("needs root to mount a small tmpfs")
    unmount.append(disk)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    history = (run / "metrics.jsonl").read_bytes()
    history += b"\n" * (4096 - 100 - len(history) % 4096)  # blank lines: 100 bytes of its page
    (disk / "metrics.jsonl").write_bytes(history)
    with open(disk / "filler", "wb", buffering=0) as f:  # the rest of the disk
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(disk / "metrics.jsonl")
    r = kiln_here("train", run)
    assert_one_line_error(r, "could not append to", "No space left", "at step 5")
    assert (disk / "metrics.jsonl").read_bytes() == history  # the torn record cut off again
    os.remove(disk / "filler")


def test_more_threads_than_cores_is_warned_and_an_absurd_count_refused(pydoc_tokens, tmp_path):
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, tmp_path / "run")
    cores = os.cpu_count() or 1
    r = kiln_here("train", config, "--dry-run", f"--trainer.threads={cores + 1}")
    assert r.returncode == 0 and f"is more than the {cores} cores" in r.stdout
    assert_one_line_error(kiln_here("train", config, "--dry-run", "--trainer.threads=1e30"),
                          "trainer.threads=", "must be <= 4096")


def test_a_memory_budget_without_torch_compile_is_refused_before_the_run(pydoc_tokens,
                                                                         tmp_path):
    """activation_checkpointing=budget is torch.compile's partitioner: on CPU, where
    parallel.compile=auto does not compile, the dry run and the run refuse it in one line."""
    from kiln.config import load_config
    from kiln.errors import KilnError
    from kiln.trainer import Trainer

    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, run)
    budget = "--parallel.activation_checkpointing=budget"
    assert_one_line_error(kiln_here("train", config, "--dry-run", budget),
                          "activation_checkpointing=budget works through torch.compile",
                          "auto compiles on CUDA only: set parallel.compile=true")
    with pytest.raises(KilnError, match="and it is off: set parallel.compile=true"):
        Trainer(load_config(config, [budget, "--parallel.compile=false"]))
    assert not run.exists()
