"""Distributed training on CPU: real torchrun, real gloo process groups, 2 processes.

DDP and FSDP2 with the same global batch reproduce a single-process run; checkpoints move
between world sizes in both directions; unsharding is exact; a failing rank fails the job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_cli import kiln_here
from test_train import losses, tiny_cfg, train

from kiln import checkpoint as ckpt

pytestmark = pytest.mark.slow


def write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(config: Path, *overrides: str, nproc: int = 2, env: dict | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "kiln", "train", str(config), *overrides]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def single(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln", "train", str(config), *overrides],
                          capture_output=True, text=True, timeout=300)


def cfg_for(tokens: Path, run_dir: Path, **kw) -> dict:
    kw = {"trainer__max_duration": 20, "checkpoint__interval": 10, "checkpoint__keep_last": 5,
          **kw}
    cfg = tiny_cfg(tokens, run_dir, **kw)
    cfg["log"]["console"] = True
    return cfg


def assert_close(a: dict[int, float], b: dict[int, float], rel: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]), (step, a[step], b[step])


@pytest.fixture(scope="module")
def reference(pydoc_tokens, tmp_path_factory) -> Path:
    """The uninterrupted single-process run everything is compared with."""
    root = tmp_path_factory.mktemp("ref")
    train(cfg_for(pydoc_tokens, root / "run"))  # in this process: no start-up to pay
    return root / "run"


@pytest.mark.parametrize("dp", ["ddp", "fsdp", "hsdp"])
def test_two_ranks_match_one_process(pydoc_tokens, reference, tmp_path, dp):
    config = write(cfg_for(pydoc_tokens, tmp_path / "run", parallel__dp=dp), tmp_path / "c.yaml")
    # hsdp on 2 ranks: 2 replicas of 1 shard each (a 2-D replicate x shard mesh)
    # fsdp also scores a downstream task at the end, every rank its share of the batches
    out = torchrun(config, *(["--parallel.shard_size=1"] if dp == "hsdp" else []),
                   *(["--checkpoint.async=true"] if dp == "ddp" else []),  # rank 0 writes
                   *(["--eval.tasks=[copa]", "--eval.limit=24"] if dp == "fsdp" else []))
    assert out.returncode == 0, out.stderr[-3000:]
    if dp == "fsdp":  # the same numbers as one process scoring the final checkpoint
        in_loop = json.loads((tmp_path / "run" / "eval" / "step20.json").read_text())
        assert kiln_here("eval", tmp_path / "run", "--tasks", "copa", "--limit", "24"
                         ).returncode == 0
        alone = json.loads((tmp_path / "run" / "eval" / "step20.json").read_text())
        assert in_loop["in_loop"] and in_loop["tasks"]["copa"]["instances"] == 24
        for m, v in alone["tasks"]["copa"]["metrics"].items():
            assert in_loop["tasks"]["copa"]["metrics"][m]["value"] == pytest.approx(
                v["value"], rel=1e-6, abs=0), m
    assert_close(losses(tmp_path / "run"), losses(reference))
    # rank hygiene: one console, one metrics file with one line per step
    assert out.stdout.count("step     20/20") == 1
    assert len(losses(tmp_path / "run")) == 20
    expected = "model.safetensors" if dp == "ddp" else "dcp"
    assert (tmp_path / "run" / "checkpoints" / "step20" / expected).exists()


def test_sharded_save_on_two_ranks_resumes_on_one(pydoc_tokens, reference, tmp_path):
    run = tmp_path / "run"
    config = write(cfg_for(pydoc_tokens, run, parallel__dp="fsdp"), tmp_path / "c.yaml")
    # written in the background (async_save on a group of its own) while training goes on
    out = torchrun(config, "--trainer.hard_stop=10", "--checkpoint.async=true")
    assert out.returncode == 0, out.stderr[-3000:]
    assert ckpt.is_sharded(ckpt.latest_checkpoint(run))
    assert "written in the background" in out.stdout
    out = single(config, "--parallel.dp=none")  # world size 1, same run, resumes at step 10
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stdout
    assert_close(losses(run), losses(reference))


def test_save_on_one_rank_resumes_sharded_on_two(pydoc_tokens, reference, tmp_path):
    run = tmp_path / "run"
    config = write(cfg_for(pydoc_tokens, run, checkpoint__sharded=True), tmp_path / "c.yaml")
    out = single(config, "--trainer.hard_stop=10")
    assert out.returncode == 0, out.stderr
    assert ckpt.is_sharded(ckpt.latest_checkpoint(run))
    out = torchrun(config, "--parallel.dp=fsdp")
    assert out.returncode == 0, out.stderr[-3000:]
    assert_close(losses(run), losses(reference))


def test_unsharded_checkpoint_loads_into_fsdp_without_a_separate_step(pydoc_tokens, reference,
                                                                       tmp_path):
    run = tmp_path / "run"
    config = write(cfg_for(pydoc_tokens, run), tmp_path / "c.yaml")
    assert single(config, "--trainer.hard_stop=10").returncode == 0
    out = torchrun(config, "--parallel.dp=fsdp", "--checkpoint.sharded=false")
    assert out.returncode == 0, out.stderr[-3000:]
    assert_close(losses(run), losses(reference))


def test_unshard_round_trip_is_exact(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    config = write(cfg_for(pydoc_tokens, run, parallel__dp="fsdp", trainer__max_duration=10),
                   tmp_path / "c.yaml")
    assert torchrun(config).returncode == 0
    sharded = ckpt.latest_checkpoint(run)
    out = kiln_here("checkpoint", "unshard", sharded, tmp_path / "flat")
    assert out.returncode == 0, out.stderr
    flat = load_file(str(tmp_path / "flat" / "model.safetensors"))
    # the sharded weights, read back through torch.distributed.checkpoint
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(sharded / "dcp"), str(tmp_path / "ref.pt"))
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)["model"]
    for name, t in flat.items():
        assert torch.equal(t, ref[name]), name
    assert ckpt.is_complete(tmp_path / "flat") and not ckpt.is_sharded(tmp_path / "flat")
    # and the unsharded copy resumes like any kiln checkpoint
    moved = tmp_path / "moved" / "checkpoints"
    moved.mkdir(parents=True)
    (tmp_path / "flat").rename(moved / sharded.name)
    c = ckpt.load(tmp_path / "moved")
    assert c.step == 10 and c.optim is not None
    # generate and inspect read the sharded checkpoint directly, and agree with the copy
    gen = [kiln_here("generate", where, "--prompt", "The", "--greedy", "--max-new-tokens", "8")
           for where in (run, tmp_path / "moved")]
    assert gen[0].returncode == 0, gen[0].stderr
    assert gen[0].stdout == gen[1].stdout
    info = kiln_here("inspect", run)
    assert info.returncode == 0 and "sharded" in info.stdout


def test_a_failing_rank_fails_the_whole_job(pydoc_tokens, tmp_path):
    config = write(cfg_for(pydoc_tokens, tmp_path / "run", parallel__dp="ddp",
                           parallel__timeout_minutes=1.0, trainer__max_duration=200),
                   tmp_path / "c.yaml")
    start = time.time()
    out = torchrun(config, env={"KILN_FAULT_INJECT": "1:5"}, timeout=240)
    assert out.returncode != 0
    assert time.time() - start < 120
    assert "injected fault on rank 1 at step 5" in out.stderr
    # the rank that lost its peer says so in one kiln line, not a traceback of its own
    lost = [line for line in out.stderr.splitlines() if "lost a peer" in line]
    assert lost and "kiln: error: rank 0 lost a peer at step" in lost[0], out.stderr[-3000:]
    assert "[rank0]: Traceback" not in out.stderr, out.stderr[-3000:]
