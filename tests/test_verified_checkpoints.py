"""Checkpoints carry a manifest (sizes and SHA-256 of every file); `kiln checkpoint verify`
checks it; a resume never trains from a checkpoint whose files changed size, and names the
newest one that passes (`--resume-from`); a failed save stops the run or, asked to, retries."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_cli import assert_one_line_error, kiln_here, snapshot, write_config

from kiln import checkpoint as ckpt
from kiln import faults


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


@pytest.fixture(scope="module")
def runs(pydoc_tokens, tmp_path_factory) -> dict:
    """A run stopped at step 6 of 8 (checkpoints at 3 and 6) and the same run trained
    through to step 8 without a stop (the reference for every resume here)."""
    root = tmp_path_factory.mktemp("verified")
    out = {}
    for name, extra in (("six", ["--trainer.hard_stop=6"]), ("whole", [])):
        config = write_config(root / f"{name}.yaml", pydoc_tokens, root / name,
                              trainer={"max_duration": 8, "eval_interval": 0})
        r = kiln_here("train", config, *extra)
        assert r.returncode == 0, r.stderr
        out[name] = root / name
    return out


@pytest.fixture
def run(runs, tmp_path) -> Path:
    """A copy of the stopped run (a moved run resumes itself: nothing in it is edited)."""
    dst = tmp_path / "run"
    shutil.copytree(runs["six"], dst)
    return dst


def test_every_checkpoint_records_every_file_and_verify_passes(runs):
    run = runs["six"]
    for step in ("step3", "step6"):
        folder = run / "checkpoints" / step
        manifest = json.loads((folder / "manifest.json").read_text())
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert set(manifest["files"]) == files - {"manifest.json"}
        assert {"model.safetensors", "optim.pt", "rng.pt", "trainer.json"} <= files
        for name, entry in manifest["files"].items():
            data = (folder / name).read_bytes()
            assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert manifest["step"] == int(step[4:]) and manifest["kiln_version"]
    r = kiln_here("checkpoint", "verify", run)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("sizes and SHA-256 match") == 2


def test_a_flipped_byte_is_found_by_verify_which_names_the_newest_good_one(run):
    f = run / "checkpoints" / "step6" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor: the file still parses, same size
    f.write_bytes(bytes(data))
    before = snapshot(run)
    r = kiln_here("checkpoint", "verify", run)
    assert r.returncode == 1
    assert "step3: ok" in r.stdout
    assert f"step6: FAILS: {f} differs from the manifest written at save: its SHA-256" in r.stdout
    assert "--resume-from=step3" in r.stdout
    assert kiln_here("checkpoint", "verify", run / "checkpoints" / "step3").returncode == 0
    assert snapshot(run) == before


def test_a_truncated_latest_is_refused_naming_the_newest_good_one_which_resumes_exactly(
        run, runs):
    bad = run / "checkpoints" / "step6" / "optim.pt"
    bad.write_bytes(bad.read_bytes() + b"\0" * 10)  # replaced: still a readable zip
    before = snapshot(run)
    r = kiln_here("train", run)
    assert_one_line_error(r, f"{bad} differs from the manifest written at save",
                          f"kiln train {run} --resume-from=step3")
    assert snapshot(run) == before
    r = kiln_here("inspect", run)
    assert "resumable       no: optim.pt differs from the manifest" in r.stdout
    # the route it names: resume from step3; the damaged step6 is kept aside, not deleted
    r = kiln_here("train", run, "--resume-from=step3")
    assert r.returncode == 0, r.stderr
    assert "kept it as" in r.stderr
    assert (run / "checkpoints" / "step6-damaged-1" / "optim.pt").read_bytes() == \
        bad.parent.parent.joinpath("step6-damaged-1", "optim.pt").read_bytes()
    assert ckpt.latest_checkpoint(run).name == "step8"
    assert same_weights(run / "checkpoints" / "step8", runs["whole"] / "checkpoints" / "step8")
    assert kiln_here("checkpoint", "verify", run).returncode == 0


def test_resume_from_a_step_that_is_not_there_lists_those_that_are(run):
    r = kiln_here("train", run, "--resume-from=step5")
    assert_one_line_error(r, "--resume-from=step5", "step3, step6")


def test_a_failed_save_stops_the_run_and_leaves_nothing_half_written(pydoc_tokens, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("KILN_FAULT_SAVE", "1")
    monkeypatch.setattr(faults, "saves_failed", [0])
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, run,
                          trainer={"max_duration": 8, "eval_interval": 0})
    r = kiln_here("train", config)
    assert_one_line_error(r, "could not write checkpoint", "step3", "Input/output error")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == []
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == 3  # stopped at the failing save


def test_on_save_error_retry_saves_on_a_later_attempt_and_trains_on_exactly(
        pydoc_tokens, tmp_path, monkeypatch, runs):
    monkeypatch.setenv("KILN_FAULT_SAVE", "2")
    monkeypatch.setattr(faults, "saves_failed", [0])
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, run,
                          trainer={"max_duration": 8, "eval_interval": 0},
                          checkpoint={"on_save_error": "retry 2"})
    r = kiln_here("train", config)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("trying again in") == 2
    assert same_weights(run / "checkpoints" / "step8", runs["whole"] / "checkpoints" / "step8")
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert kiln_here("checkpoint", "verify", run).returncode == 0


def lie_in_header(f: Path, how: str) -> None:
    """Rewrite a safetensors header so that it lies: a tensor's shape that its bytes do not
    hold, or byte offsets past the end of the file."""
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in sorted(header) if k != "__metadata__")
    if how == "shape":
        header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
    else:
        header[name]["data_offsets"][1] += 10**9
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])


@pytest.mark.parametrize("how", ["shape", "offsets"])
def test_a_lying_safetensors_header_is_refused_in_one_line(run, how):
    weights_file = run / "checkpoints" / "step6" / "model.safetensors"
    lie_in_header(weights_file, how)
    r = kiln_here("checkpoint", "verify", run)  # the manifest catches it first
    assert r.returncode == 1 and "step6: FAILS" in r.stdout
    ckpt.write_manifest(weights_file.parent, 6)  # a forged manifest: the loaders must refuse
    before = snapshot(run)
    for args in (["generate", run, "--prompt", "The", "--max-new-tokens", "2"],
                 ["inspect", run], ["train", run]):
        assert_one_line_error(kiln_here(*args), "step6/model.safetensors")
    assert snapshot(run) == before


def test_a_checkpoint_without_manifest_resumes_with_a_warning_and_verify_exits_1(run, runs):
    (run / "checkpoints" / "step6" / "manifest.json").unlink()
    before = snapshot(run)
    r = kiln_here("checkpoint", "verify", run)
    assert r.returncode == 1
    assert "step3: ok" in r.stdout and "step6: UNVERIFIED: no manifest.json" in r.stdout
    assert r.stderr.startswith("kiln: error: 1 of 2 checkpoint(s) cannot be verified")
    assert len(r.stderr.strip().splitlines()) == 1 and snapshot(run) == before
    r = kiln_here("train", run)  # accepted, saying that it cannot be verified
    assert r.returncode == 0, r.stderr
    assert "step6 has no manifest.json" in r.stderr and "cannot be verified" in r.stderr
    assert same_weights(run / "checkpoints" / "step8", runs["whole"] / "checkpoints" / "step8")


def test_latest_naming_an_older_checkpoint_is_refused_not_silently_rewound(run, runs):
    (run / "checkpoints" / "latest").write_text("step3\n")  # written after step6 was saved
    before = snapshot(run)
    r = kiln_here("train", run)
    assert_one_line_error(r, "names step3, but newer complete checkpoints exist (step6)",
                          f"kiln train {run} --resume-from=step6", "--resume-from=step3")
    assert snapshot(run) == before
    # going back on purpose keeps the newer checkpoint aside, never overwrites it
    step6 = snapshot(run / "checkpoints" / "step6")
    r = kiln_here("train", run, "--resume-from=step3")
    assert r.returncode == 0, r.stderr
    assert snapshot(run / "checkpoints" / "step6-aside-1") == step6
    assert kiln_here("train", run).returncode == 0  # nothing newer than latest now
    assert same_weights(run / "checkpoints" / "step8", runs["whole"] / "checkpoints" / "step8")


def test_a_save_stopped_before_naming_its_checkpoint_resumes_from_that_checkpoint(run, runs):
    import os

    latest = run / "checkpoints" / "latest"
    latest.write_text("step3\n")
    hour_ago = (latest.stat().st_mtime_ns - 3600 * 10**9,) * 2
    os.utime(latest, ns=hour_ago)  # step6 was renamed into place after latest was written
    r = kiln_here("train", run)
    assert r.returncode == 0, r.stderr
    assert "resuming from step6" in r.stderr
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8
    assert same_weights(run / "checkpoints" / "step8", runs["whole"] / "checkpoints" / "step8")


def test_a_planted_temporary_link_does_not_block_a_save(run, runs, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("not kiln's")
    (run / "checkpoints" / ".tmp-step8").symlink_to(target)
    r = kiln_here("train", run)
    assert r.returncode == 0, r.stderr
    assert same_weights(run / "checkpoints" / "step8", runs["whole"] / "checkpoints" / "step8")
    assert (target / "keep.txt").read_text() == "not kiln's"  # the link was never followed


@pytest.mark.parametrize("what", ["a folder", "a dangling link", "a link to /dev/full"])
def test_a_metrics_file_that_cannot_take_records_is_refused_before_step_1(run, tmp_path, what):
    metrics = run / "metrics.jsonl"
    metrics.unlink()
    if what == "a folder":
        metrics.mkdir()
    elif what == "a dangling link":
        metrics.symlink_to(tmp_path / "gone" / "metrics.jsonl")
    else:
        metrics.symlink_to("/dev/full")
    before = snapshot(run)
    r = kiln_here("train", run)
    assert_one_line_error(r, str(metrics))
    assert snapshot(run) == before  # no step trained, nothing saved
    assert not (tmp_path / "gone").exists() and not (run / "checkpoints" / "step8").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "nested too deep", "not a tokenizer"])
def test_a_damaged_tokenizer_given_by_hand_is_refused_in_one_line(run, pydoc_tokens, tmp_path,
                                                                  damage):
    tok = tmp_path / "tokenizer.json"
    good = (run / "checkpoints" / "step6" / "tokenizer.json").read_text()
    tok.write_text({"empty": "", "truncated": good[: len(good) // 2],
                    "nested too deep": "[" * 100_000 + "]" * 100_000,
                    "not a tokenizer": '{"vocab": [1, 2]}'}[damage])
    for args in (["generate", run, "--prompt", "The", "--max-new-tokens", "2"],
                 ["eval", run, "--data", pydoc_tokens, "--limit", "1", "--no-write"]):
        assert_one_line_error(kiln_here(*args, "--tokenizer", tok), str(tok),
                              "--tokenizer PATH")
