"""Crafted checkpoints must not run code: every command that reads a checkpoint, with a
malicious pickle in every file kiln reads (real files, real `kiln` processes).

Each payload, if ever unpickled, creates a marker file; the marker must never appear, and each
refusal is one line naming the file.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, kiln, kiln_all, snapshot, write_config

REAL_OLMO = Path(__file__).parent / "data" / "olmo" / "olmo2"


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _train(root: Path, tokens: Path, name: str, **checkpoint) -> Path:
    config = write_config(root / f"{name}.yaml", tokens, root / name,
                          checkpoint={"interval": 3, **checkpoint})
    out = kiln("train", config)
    assert out.returncode == 0, out.stderr
    return root / name


@pytest.fixture(scope="module")
def runs(pydoc_tokens, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("untrusted")
    return {"unsharded": _train(root, pydoc_tokens, "plain"),
            "sharded": _train(root, pydoc_tokens, "sharded", sharded=True),
            "config": root / "plain.yaml"}


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run (a copied run resumes itself: nothing in it is edited)."""
    shutil.copytree(src, dst)
    return dst


def forge_manifest(step: Path) -> None:
    """What an attacker who plants a file would also do: record it in the manifest, so that
    the size check passes and the loaders themselves must refuse the file."""
    from kiln import checkpoint as ckpt

    ckpt.write_manifest(step, ckpt.step_of(step))


def commands(run: Path, config: Path, out: Path) -> dict[str, list]:
    """Every command that reads a checkpoint, pointed at `run`."""
    return {
        "inspect": ["inspect", run],
        "generate": ["generate", run, "--prompt", "The", "--max-new-tokens", "3"],
        "export hf": ["export", "hf", run, out / "hf"],
        "checkpoint unshard": ["checkpoint", "unshard", run, out / "unsharded"],
        "train --init.from": ["train", config, f"--init.from={run}",
                              f"--trainer.run_dir={out / 'new'}", "--trainer.max_duration=8"],
        "resume": ["train", run],
        "schedule": ["schedule", run],
    }


def assert_safe(out, marker: Path, needle: str, may_succeed: bool = False) -> None:
    assert not marker.exists(), "the pickled payload ran"
    if out.returncode == 0 and may_succeed:
        return
    assert_one_line_error(out, needle)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sharded", "added to unsharded"])
def test_malicious_dcp_metadata_is_never_unpickled(runs, tmp_path, variant):
    src = runs["sharded" if variant == "sharded" else "unsharded"]
    run = copy_run(src, tmp_path / "run")
    marker = tmp_path / "PWNED"
    step = run / "checkpoints" / "step6"
    (step / "dcp").mkdir(exist_ok=True)
    (step / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    forge_manifest(step)
    before = snapshot(run)
    for name, out in kiln_all(commands(run, runs["config"], tmp_path / "out")).items():
        # schedule reads metadata only; it may show the saved schedule without the weights
        assert_safe(out, marker, "dcp/.metadata", may_succeed=name in ("schedule",))
        if out.returncode != 0:
            assert "posix.system" in out.stderr or "system" in out.stderr, (name, out.stderr)
    assert {k: v for k, v in snapshot(run).items() if not k.startswith("plots/")} == before
    assert not (tmp_path / "out" / "hf").exists()
    assert not (tmp_path / "out" / "unsharded").exists()


@pytest.mark.slow
def test_malicious_item_inside_a_sharded_checkpoint_is_never_unpickled(runs, tmp_path):
    """A well-formed DCP checkpoint whose optimizer hyperparameter is a crafted object:
    torch itself would read it with weights_only=False."""
    import torch.distributed.checkpoint as dcp

    from kiln.safeload import dcp_load_full

    run = copy_run(runs["sharded"], tmp_path / "run")
    marker = tmp_path / "PWNED"
    folder = run / "checkpoints" / "step6" / "dcp"
    state = dcp_load_full(folder)
    state["optim"]["param_groups"][0]["lr"] = Payload(marker)
    shutil.rmtree(folder)
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    forge_manifest(folder.parent)
    every = commands(run, runs["config"], tmp_path / "out")
    chosen = ("export hf", "checkpoint unshard", "resume", "train --init.from")
    for name, out in kiln_all({name: every[name] for name in chosen}).items():
        assert_safe(out, marker, "optim.param_groups.0.lr", may_succeed=name == "export hf")
        if out.returncode != 0:
            assert str(folder) in out.stderr


@pytest.mark.parametrize("part", ["optim.pt", "rng.pt"])
def test_malicious_optimizer_or_rng_file_is_refused(runs, tmp_path, part):
    run = copy_run(runs["unsharded"], tmp_path / "run")
    marker = tmp_path / "PWNED"
    torch.save(Payload(marker), run / "checkpoints" / "step6" / part)
    forge_manifest(run / "checkpoints" / "step6")
    before = snapshot(run)
    every = commands(run, runs["config"], tmp_path / "out")
    for name, out in kiln_all({n: every[n] for n in ("resume", "train --init.from")}).items():
        needle = f"step6/{part}"
        if name == "train --init.from" and part == "rng.pt":  # a new run needs no RNG state
            assert_safe(out, marker, needle, may_succeed=True)
        else:
            assert_safe(out, marker, needle)
            assert "does not unpickle" in out.stderr
    # commands that need only the weights never open these files
    out = kiln("generate", run, "--prompt", "The", "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr
    assert not marker.exists()
    assert snapshot(run) == before


@pytest.mark.parametrize("part", ["model.pt", "optim.pt", "train.pt"])
def test_malicious_olmo_checkpoint_file_is_refused(tmp_path, part):
    src = tmp_path / "olmo"
    shutil.copytree(next(REAL_OLMO.glob("step*-unsharded")), src)
    marker = tmp_path / "PWNED"
    torch.save(Payload(marker), src / part)
    out = kiln("import", "olmo", src, tmp_path / "imported")
    assert_safe(out, marker, part)
    assert not (tmp_path / "imported").exists()


def test_plain_pickle_instead_of_a_torch_file_is_refused(runs, tmp_path):
    """An old-style (not zip) pickle in optim.pt goes through the same restricted loader."""
    run = copy_run(runs["unsharded"], tmp_path / "run")
    marker = tmp_path / "PWNED"
    (run / "checkpoints" / "step6" / "optim.pt").write_bytes(pickle.dumps(Payload(marker)))
    forge_manifest(run / "checkpoints" / "step6")
    out = kiln("train", run)
    assert_safe(out, marker, "optim.pt")


