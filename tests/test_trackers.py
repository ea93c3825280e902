"""Trackers: TensorBoard event files and W&B offline runs, read back with each tool's own
reader; a missing package is a one-line error naming the extra."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
from test_train import tiny_cfg

from kiln.config import config_from_dict
from kiln.errors import KilnError
from kiln.trackers import TensorBoardCallback, WandbCallback, build_trackers
from kiln.trainer import Trainer


def fit(cfg: dict, *callbacks) -> dict:
    return Trainer(config_from_dict(cfg), callbacks=list(callbacks)).fit()


def small(tokens: Path, run: Path, **over) -> dict:
    """4 steps of one micro-batch, evaluated and checkpointed every 2."""
    return tiny_cfg(tokens, run, trainer__max_duration=4, trainer__global_batch_size=4,
                    trainer__eval_interval=2, trainer__eval_batches=2, checkpoint__interval=2,
                    **over)


def tb_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def metrics_file(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_scalars_at_their_steps_and_resume_replaces_later_points(pydoc_tokens,
                                                                             tmp_path):
    run = tmp_path / "run"
    fit(small(pydoc_tokens, run, trainer__hard_stop=2), TensorBoardCallback(run))
    assert sorted(tb_scalars(run / "tb")["loss"]) == [1, 2]
    # an attempt that went on past its last checkpoint (step 2): its step 3 is stale
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run / "tb")) as w:
        w.add_scalar("loss", 99.0, global_step=3)
    fit(small(pydoc_tokens, run), TensorBoardCallback(run))

    scalars = tb_scalars(run / "tb")
    records = metrics_file(run)
    train = {r["step"]: r for r in records if "loss" in r}
    evals = {r["step"]: r for r in records if "val_loss" in r}
    assert sorted(scalars["loss"]) == [1, 2, 3, 4] == sorted(train)
    for step, r in train.items():
        for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_sec"):
            assert scalars[key][step] == pytest.approx(r[key], rel=1e-6), (key, step)
    assert scalars["loss"][3] != 99.0
    assert sorted(scalars["val_loss"]) == sorted(evals) == [2, 4]
    for step, r in evals.items():
        assert scalars["val_loss"][step] == pytest.approx(r["val_loss"], rel=1e-6)
    assert "step" not in scalars

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert "config" in " ".join(acc.Tags()["tensors"])  # the config as text, once per start


# -- W&B, offline ------------------------------------------------------------------------------


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, its files and caches under tmp_path (nothing in $HOME), quiet; its
    service process is stopped afterwards."""
    home = tmp_path / "wandb-home"
    for var, sub in [("WANDB_DIR", "dir"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_ARTIFACT_DIR", "artifacts")]:
        (home / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(home / sub))
    for var, value in [("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                       ("WANDB_DISABLE_CODE", "true"), ("WANDB_DISABLE_GIT", "true"),
                       ("WANDB_CONSOLE", "off")]:
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    yield
    import wandb

    wandb.teardown()


def wandb_records(path: Path):
    """The records of a .wandb file (W&B's transaction log: a LevelDB-style log of
    protobuf Records in 32 KiB blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_history(path: Path) -> tuple[str, list[dict]]:
    run_id, history = "", []
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in r.history.item})
    return run_id, history


def fit_wandb(cfg: dict) -> None:
    import wandb

    fit(cfg)  # log.wandb=true: the trainer builds the W&B callback itself
    # W&B's service writes the run's file after finish() returns; a process's exit waits
    # for it (an atexit hook), here teardown does
    wandb.teardown()


def test_wandb_offline_run_and_resume_keeps_the_id(pydoc_tokens, tmp_path, wandb_offline):
    run = tmp_path / "run"
    over = dict(log__wandb=True, log__wandb_project="kiln-test")
    fit_wandb(small(pydoc_tokens, run, trainer__hard_stop=2, **over))

    run_id = (run / "wandb_id").read_text().strip()
    [first] = sorted((run / "wandb").glob("offline-run-*"))
    assert first.name.endswith(f"-{run_id}") and (first / f"run-{run_id}.wandb").is_file()
    saved_id, history = wandb_history(first / f"run-{run_id}.wandb")
    assert saved_id == run_id
    assert [h["trainer/step"] for h in history if "loss" in h] == [1, 2]
    assert [h["trainer/step"] for h in history if "val_loss" in h] == [2]
    train = {r["step"]: r for r in metrics_file(run) if "loss" in r}
    for h in history:
        if "loss" in h:
            assert h["loss"] == pytest.approx(train[h["trainer/step"]]["loss"])
            assert h["tokens"] == train[h["trainer/step"]]["tokens"]
            assert "step" not in h

    # W&B names offline folders by the second they start in: resume in a later one
    stamp = first.name.split("-")[2]
    while time.strftime("%Y%m%d_%H%M%S") <= stamp:
        time.sleep(0.05)
    fit_wandb(small(pydoc_tokens, run, **over))

    assert (run / "wandb_id").read_text().strip() == run_id
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and folders[0] == first
    assert folders[1].name.endswith(f"-{run_id}")
    saved_id, history = wandb_history(folders[1] / f"run-{run_id}.wandb")
    assert saved_id == run_id
    assert [h["trainer/step"] for h in history if "loss" in h] == [3, 4]
    assert [h["trainer/step"] for h in history if "val_loss" in h] == [4]


# -- building them -----------------------------------------------------------------------------


def test_build_trackers_returns_the_enabled_ones(pydoc_tokens, tmp_path):
    def built(**over):
        cfg = config_from_dict(tiny_cfg(pydoc_tokens, tmp_path / "run", **over))
        return [type(t) for t in build_trackers(cfg, tmp_path / "run")]

    assert built() == []
    assert built(log__tensorboard=True) == [TensorBoardCallback]
    assert built(log__tensorboard=True, log__wandb=True) == [TensorBoardCallback, WandbCallback]
    assert not (tmp_path / "run").exists()  # nothing is written before the run starts


@pytest.mark.parametrize("option, package", [("wandb", "wandb"),
                                             ("tensorboard", "tensorboard")])
def test_a_missing_package_is_a_one_line_error_naming_the_extra(pydoc_tokens, tmp_path,
                                                                monkeypatch, option, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    cfg = config_from_dict(tiny_cfg(pydoc_tokens, tmp_path / "run", **{f"log__{option}": True}))
    with pytest.raises(KilnError) as e:
        build_trackers(cfg, tmp_path / "run")
    message = str(e.value)
    assert "\n" not in message
    assert message == (f"log.{option} needs the {package} package: pip install -e '.[track]'")


def test_the_config_turns_tensorboard_on(pydoc_tokens, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_train import train

    run = tmp_path / "run"
    train(tiny_cfg(pydoc_tokens, run, trainer__max_duration=2, log__tensorboard=True))
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert "data_wait_share" in acc.Tags()["scalars"]
