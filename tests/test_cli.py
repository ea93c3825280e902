"""The `kiln` command as a user runs it: real files, real processes for training and the
entry point itself, and the CLI's own entry point in this process (kiln_here: the same code,
without an interpreter start each time) for the many refusals and quick commands.

Every bad input must give a one-line error, a non-zero exit, no traceback, and leave the
run directory and data files exactly as they were.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml


def kiln(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


class Ran:
    """What an in-process `kiln` call gave: like a CompletedProcess (returncode, stdout,
    stderr)."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def kiln_here(*args) -> Ran:
    """`kiln ARGS` through the CLI's own entry point in this process: the same code path as
    the command (errors, exit codes, output) without an interpreter start, for tables of many
    cases."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from kiln.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in args])
    return Ran(rc, out.getvalue(), err.getvalue())


def kiln_all(named: dict) -> dict:
    """Run independent `kiln` commands ({name: args}) two at a time (each is mostly torch's
    import); {name: CompletedProcess}."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(kiln, *args) for name, args in named.items()}
    return {name: f.result() for name, f in futures.items()}


def snapshot(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_config(path: Path, tokens: Path, run_dir: Path, **sections) -> Path:
    cfg = {
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "mlp_hidden_size": 192,
                  "vocab_size": 512, "max_seq_len": 64},
        "data": {"paths": [str(tokens)], "seq_len": 32, "val_fraction": 0.05},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup": 2},
        "trainer": {"run_dir": str(run_dir), "global_batch_size": 8, "micro_batch_size": 4,
                    "max_duration": 6, "eval_interval": 3, "eval_batches": 2},
        "checkpoint": {"interval": 3},
        "log": {"interval": 1},
    }
    for name, values in sections.items():
        cfg[name].update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("kiln: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained_run(pydoc_tokens, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    config = write_config(root / "c.yaml", pydoc_tokens, root / "run")
    out = kiln("train", config)
    assert out.returncode == 0, out.stderr
    return config, root / "run"


def test_train_prints_progress_and_writes_the_run_directory(trained_run):
    config, run = trained_run
    assert (run / "checkpoints" / "step6" / "model.safetensors").is_file()
    assert (run / "metrics.jsonl").is_file() and (run / "config.yaml").is_file()


def test_generate_prints_prompt_and_continuation(trained_run):
    _, run = trained_run
    out = kiln_here("generate", run, "--prompt", "The function", "--max-new-tokens", "10",
               "--greedy")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The function") and len(out.stdout) > len("The function")
    cached = out.stdout
    uncached = kiln_here("generate", run, "--prompt", "The function", "--max-new-tokens", "10",
                    "--greedy", "--no-cache").stdout
    assert cached == uncached


def test_inspect_describes_checkpoint_and_token_file(trained_run, pydoc_tokens):
    _, run = trained_run
    out = kiln_here("inspect", run)
    assert out.returncode == 0 and "step            6" in out.stdout
    out = kiln_here("inspect", pydoc_tokens)
    assert out.returncode == 0 and "uint16" in out.stdout and "documents" in out.stdout


def test_dry_run_prints_derived_numbers_and_writes_nothing(pydoc_tokens, tmp_path):
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, tmp_path / "run")
    out = kiln("train", config, "--dry-run", "--trainer.max_duration={value: 4096, unit: tokens}")
    assert out.returncode == 0, out.stderr
    for needle in ("parameters", "tokens per step       256", "micro-batches/step    2",
                   "steps for duration    16", "warmup ends           step 2", "windows"):
        assert needle in out.stdout, needle
    assert not (tmp_path / "run").exists()


def test_dry_run_warns_loudly_about_overlapping_windows(pydoc_tokens, tmp_path):
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, tmp_path / "run")
    out = kiln_here("train", config, "--dry-run", "--data.stride=1", "--data.val_fraction=0")
    assert out.returncode == 0, out.stderr
    assert "WARNING" in out.stdout and "OVERLAP" in out.stdout


def test_presets_lists_olmo_1b_with_its_published_size():
    out = kiln_here("presets")
    assert out.returncode == 0
    line = next(x for x in out.stdout.splitlines() if x.startswith("olmo-1b "))
    assert "1,176,764,416" in line
    for name in ("tiny", "olmo2-1b", "llama-150m", "olmo-7b"):
        assert name in out.stdout


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, needles", [
    (["--data.paths=[/nonexistent/tokens.bin]"], ["matches no files"]),
    (["--model.vocab_size=256"], ["vocab_size", "256"]),
    (["--data.seq_len=128"], ["data.seq_len=128", "max_seq_len=64"]),
    (["--trainer.global_batch_size=10"], ["not divisible"]),
    (["--model.preset=olmo1b"], ["unknown preset", "olmo-1b"]),
    (["--optim.learning_rate=1e-3"], ["unknown config key", "optim.learning_rate"]),
    (["--optim.lr=fast"], ["optim.lr", "number"]),
    (["--trainer.max_duration=soon"], ["trainer.max_duration", "duration"]),
])
def test_bad_config_is_one_line_error_and_touches_nothing(trained_run, pydoc_tokens, overrides,
                                                          needles):
    config, run = trained_run
    before, data_before = snapshot(run), snapshot(pydoc_tokens.parent)
    out = kiln_here("train", config, *overrides)
    assert_one_line_error(out, *needles)
    assert snapshot(run) == before
    assert snapshot(pydoc_tokens.parent) == data_before


def test_checkpoint_of_another_model_shape_is_refused_by_name(trained_run):
    config, run = trained_run
    before = snapshot(run)
    out = kiln_here("train", config, "--model.d_model=128", "--trainer.max_duration=9")
    assert_one_line_error(out, "different model shape", "embed.weight")
    assert snapshot(run) == before


def test_empty_data_file_is_refused(tmp_path):
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    config = write_config(tmp_path / "c.yaml", empty, tmp_path / "run")
    assert_one_line_error(kiln_here("train", config), "empty")
    assert not (tmp_path / "run").exists()


def test_uint16_file_for_a_large_vocabulary_is_refused(tmp_path):
    raw = tmp_path / "olmo-style.npy"  # headerless, as OLMo writes them
    np.arange(5000, dtype=np.uint16).tofile(raw)
    config = write_config(tmp_path / "c.yaml", raw, tmp_path / "run",
                          model={"vocab_size": 100278}, data={"dtype": "uint16"})
    assert_one_line_error(kiln_here("train", config), "uint16", "100278")


def test_raw_file_without_dtype_asks_for_one(tmp_path):
    raw = tmp_path / "part-000.npy"
    np.arange(5000, dtype=np.uint16).tofile(raw)
    config = write_config(tmp_path / "c.yaml", raw, tmp_path / "run")
    assert_one_line_error(kiln_here("train", config), "data.dtype")


def test_no_resume_refuses_a_used_run_directory(trained_run):
    config, run = trained_run
    before = snapshot(run)
    assert_one_line_error(kiln_here("train", config, "--no-resume"), "--no-resume")
    assert snapshot(run) == before


def test_debug_shows_the_traceback(trained_run):
    config, _ = trained_run
    out = kiln("--debug", "train", config, "--optim.lr=fast")
    assert out.returncode != 0 and "Traceback" in out.stderr
