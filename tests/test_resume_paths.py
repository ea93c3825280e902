"""`kiln train RUN_DIR` means that directory, from anywhere, also for a copied or moved run;
a hard stop belongs to one invocation (real `kiln` processes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_cli import assert_one_line_error, kiln, kiln_here, snapshot, write_config

OVER = dict(trainer={"max_duration": 12, "eval_interval": 0}, checkpoint={"interval": 3})


def weights(run: Path, step: int = 12) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step{step}" / "model.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(pydoc_tokens, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 12-step run, and a run stopped at step 6 whose config names its
    run_dir relative to the directory it was started from."""
    root = tmp_path_factory.mktemp("paths")
    config = write_config(root / "c.yaml", pydoc_tokens, root / "ref", **OVER)
    assert kiln("train", config).returncode == 0
    (root / "work").mkdir()
    out = kiln("train", config, "--trainer.run_dir=runs/half", "--trainer.hard_stop=6",
               cwd=root / "work")
    assert out.returncode == 0, out.stderr
    return {"ref": root / "ref", "half": root / "work" / "runs" / "half", "config": config}


def test_resume_by_absolute_path_from_another_directory(runs, tmp_path):
    run = tmp_path / "half"
    shutil.copytree(runs["half"], run)  # its config.yaml still says run_dir: runs/half
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = kiln("train", run.resolve(), cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert not (elsewhere / "runs").exists()
    assert_same(weights(run), weights(runs["ref"]))


def test_a_copied_run_advances_and_the_original_is_untouched(runs, tmp_path):
    original = tmp_path / "runs" / "half"
    shutil.copytree(runs["half"], original)
    copy = tmp_path / "runs" / "half-copy"
    shutil.copytree(original, copy)
    before = snapshot(original)
    dry = kiln("train", copy, "--dry-run", cwd=tmp_path)
    assert f"start: resume {copy}" in dry.stdout or "start: resume runs/half-copy" in dry.stdout
    out = kiln("train", "runs/half-copy", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert snapshot(original) == before
    assert_same(weights(copy), weights(runs["ref"]))
    # the copy's config.yaml, named as a file, would still point at the original: refused
    out = kiln_here("train", copy / "config.yaml", "--dry-run")
    assert_one_line_error(out, "belongs to the run in", f"kiln train {copy}")


def test_a_moved_run_resumes_itself(runs, tmp_path):
    moved = tmp_path / "somewhere" / "else"
    moved.parent.mkdir()
    shutil.copytree(runs["half"], moved)
    out = kiln("train", moved)
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stdout
    assert_same(weights(moved), weights(runs["ref"]))


def test_a_hard_stop_is_not_carried_into_the_next_invocation(runs, tmp_path):
    run = tmp_path / "half"
    shutil.copytree(runs["half"], run)
    late = kiln_here("train", run, "--trainer.hard_stop=3", "--dry-run")
    assert_one_line_error(late, "trainer.hard_stop", "before the current step 6",
                          "--trainer.hard_stop=null")
    out = kiln("train", run)  # plain resume: trains on to the end
    assert out.returncode == 0, out.stderr
    assert "steps 6 -> 12 of 12" in out.stdout
    assert_same(weights(run), weights(runs["ref"]))


def test_init_from_at_twice_the_batch_carries_the_warmup_over_in_tokens(pydoc_tokens, tmp_path):
    from kiln.config import load_run_config
    from kiln.start import plan_start

    src = tmp_path / "src"
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, src, schedule={"warmup": 20},
                          trainer={"max_duration": 40, "hard_stop": 10, "eval_interval": 0,
                                   "global_batch_size": 8})
    assert kiln("train", config).returncode == 0  # stopped at step 10 of a 20-step warmup
    args = [f"--init.from={src}", f"--trainer.run_dir={tmp_path / 'new'}",
            "--trainer.global_batch_size=16", "--trainer.hard_stop=null"]
    dry = kiln_here("train", config, *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "the source took 8 x 32 = 256 tokens per step, this run takes 16 x 32 = 512" in \
        dry.stdout
    plan = plan_start(load_run_config(str(config), args))
    # 10 steps x 256 tokens of warmup were left: 2,560 tokens, 5 steps of 512
    peak, start_lr = 3e-3, 3e-3 * 10 / 20
    for k in range(1, 6):
        want = start_lr + (peak - start_lr) * (k * 512) / 2560
        assert plan.schedule.lr(10 + k) == pytest.approx(want, rel=1e-12), k
    assert plan.schedule.warmup_end == 15


# -- smaller ones found on the same path -------------------------------------------------------


def test_null_restores_the_presets_value_and_nulls_an_optional_field():
    from kiln.config import config_from_dict, parse_overrides, preset_model

    raw = {"model": {"preset": "tiny", "vocab_size": 512, "mlp_hidden_size": 96}}
    cfg = config_from_dict(raw, parse_overrides(["--model.vocab_size=null",
                                                 "--model.mlp_hidden_size=null"]))
    assert cfg.model.vocab_size == preset_model("tiny").vocab_size
    assert cfg.model.mlp_hidden_size is None


def test_dry_run_counts_epochs_from_tokens_seen_and_warns_of_many(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, run,
                          trainer={"max_duration": 12, "hard_stop": 6, "eval_interval": 6})
    first = kiln("train", config)
    assert first.returncode == 0
    loss_line = next(line for line in first.stdout.splitlines() if "final val_loss" in line)
    val, entropy = (float(x) for x in
                    __import__("re").findall(r"(\d+\.\d+) nats", loss_line)[:2])
    assert ("above it" if val > entropy else "below it") in loss_line and "-" not in loss_line
    dry = kiln_here("train", run, "--trainer.global_batch_size=16", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    windows = int(__import__("re").search(r"([\d,]+) windows of 33", dry.stdout)
                  .group(1).replace(",", ""))
    want = (6 * 8 * 32 + 6 * 16 * 32) / (windows * 32)  # 6 steps at 8, then 6 at 16
    assert f"epochs for the run    {want:.2f}" in dry.stdout
    assert "WARNING: this run goes over" not in dry.stdout
    many = kiln("train", config, f"--trainer.run_dir={tmp_path / 'long'}",
                "--trainer.max_duration=1e6", "--trainer.hard_stop=null", "--dry-run")
    assert "WARNING: this run goes over its training data" in many.stdout


def test_prepare_says_how_many_empty_records_it_skipped(tmp_path):
    corpus = tmp_path / "six.jsonl"
    corpus.write_text('{"text": "hello world"}\n{"text": ""}\n{"text": "  "}\n'
                      '{"text": "more words here"}\n{"text": "\\n"}\n{"text": "x y"}\n')
    out = kiln("prepare", corpus, "--out", tmp_path / "tok", "--vocab-size", "300",
               "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "Prepared 3 documents (3 empty records skipped)" in out.stdout


def test_a_run_started_with_relative_data_paths_resumes_from_anywhere(runs, tmp_path,
                                                                      monkeypatch):
    tokens = Path(yaml.safe_load(runs["config"].read_text())["data"]["paths"][0])
    monkeypatch.chdir(tokens.parent)  # data.paths as a user types them there: tokens.bin
    config = write_config(tmp_path / "rel.yaml", Path(tokens.name), tmp_path / "run", **OVER)
    r = kiln_here("train", config, "--trainer.hard_stop=6")
    assert r.returncode == 0, r.stderr
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["paths"] == [str(tokens)]  # stored resolved
    monkeypatch.chdir("/")
    r = kiln_here("train", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert_same(weights(tmp_path / "run"), weights(runs["ref"]))
