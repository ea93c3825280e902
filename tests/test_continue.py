"""Continued training: resume, preemption, start-from with carry-over, extend, batch change."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_cli import assert_one_line_error, kiln_here, snapshot
from test_train import final_weights, losses, tiny_cfg

from kiln import checkpoint as ckpt
from kiln.callbacks import Callback
from kiln.config import config_from_dict
from kiln.trainer import Trainer


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory) -> tuple[Path, Path]:
    """Two different real corpora with one tokenizer: halves of Python's documentation."""
    from conftest import pydoc_documents

    from kiln.data.prepare import prepare

    docs = pydoc_documents()
    root = tmp_path_factory.mktemp("two")
    paths = []
    for name, part in (("one", docs[::2]), ("two", docs[1::2])):
        src = root / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
        paths.append(src)
    prepare([str(paths[0])], root / "c1", vocab_size=512, progress=False)
    prepare([str(paths[1])], root / "c2", tokenizer=str(root / "c1" / "tokenizer.json"),
            progress=False)
    return root / "c1" / "tokens.bin", root / "c2" / "tokens.bin"


class SignalAt(Callback):
    """Sends a real signal to this process after a given step (a scheduler's SIGTERM)."""

    def __init__(self, step: int, sig=signal.SIGTERM):
        self.step, self.sig = step, sig

    def on_log(self, trainer, metrics):
        if metrics["step"] == self.step:
            os.kill(os.getpid(), self.sig)


def record_lr(trainer: Trainer) -> dict[int, float]:
    """{step: learning rate} of every step `trainer.fit()` logs, filled as it runs."""
    lrs: dict[int, float] = {}

    class RecordLR(Callback):
        def on_log(self, t, metrics):
            lrs[metrics["step"]] = metrics["lr"]

    trainer.callbacks.append(RecordLR())
    return lrs


def run(cfg: dict, **kw):
    trainer = Trainer(config_from_dict(cfg), **{k: v for k, v in kw.items() if k != "cb"},
                      callbacks=kw.get("cb"))
    return trainer, trainer.fit()


# -- resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [None, signal.SIGTERM, signal.SIGUSR1])
def test_resume_after_25_of_60_steps_is_exact(pydoc_tokens, tmp_path, sig):
    full, split = tmp_path / "full", tmp_path / "split"
    common = {"trainer__max_duration": 60, "checkpoint__interval": 0}
    run(tiny_cfg(pydoc_tokens, full, **common))
    if sig is None:
        run(tiny_cfg(pydoc_tokens, split, trainer__hard_stop=25, **common))
    else:  # forced by a signal: the step finishes, a checkpoint is written, fit() returns
        _, result = run(tiny_cfg(pydoc_tokens, split, **common), cb=[SignalAt(25, sig)])
        assert result["preempted"] == signal.Signals(sig).name
    assert ckpt.latest_checkpoint(split).name == "step25"
    run(tiny_cfg(pydoc_tokens, split, **common))
    assert losses(split) == losses(full)
    a, b = final_weights(full), final_weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_the_cli_checkpoints_exits_0_and_says_how_to_resume(pydoc_tokens, tmp_path):
    from test_cli import write_config

    config = write_config(tmp_path / "c.yaml", pydoc_tokens, tmp_path / "run",
                          trainer={"max_duration": 2000, "eval_interval": 0},
                          checkpoint={"interval": 0})
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "train", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM" in err and "resume with: kiln train" in out
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    step = ckpt.load(latest).step
    assert 0 < step < 2000 and latest.name == f"step{step}"


def test_second_signal_aborts_without_touching_checkpoints(pydoc_tokens, tmp_path):
    from test_cli import write_config

    config = write_config(tmp_path / "c.yaml", pydoc_tokens, tmp_path / "run",
                          trainer={"max_duration": 4000, "eval_interval": 0},
                          checkpoint={"interval": 5, "keep_last": 100})
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "train", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (root / "step10").is_dir():
        time.sleep(0.01)
    # two different signals: a repeated one could merge with the first while still pending
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "aborting now" in err
    for path in ckpt.list_checkpoints(tmp_path / "run"):
        assert ckpt.load(path).step == int(path.name[4:])  # every complete one still loads


# -- start from a checkpoint with new data -----------------------------------------------------


def test_new_data_with_optimizer_kept_and_counters_reset_carries_warmup(two_corpora, tmp_path):
    c1, c2 = two_corpora
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    a, _ = run(tiny_cfg(c1, a_dir, schedule__warmup=50, trainer__max_duration=200,
                        trainer__hard_stop=40))
    assert a.step == 40
    a_sched, a_opt = a.schedule, a.optimizer.state_dict()

    cfg_b = tiny_cfg(c2, b_dir, schedule__warmup=50, trainer__max_duration=100,
                     init__from=str(a_dir), init__load_optimizer=True,
                     init__load_schedule_position=False)
    b = Trainer(config_from_dict(cfg_b))
    # B's first step uses the LR A's next step would have used (step 41 of A's warmup)
    assert b.schedule.lr(1) == pytest.approx(a_sched.lr(41))
    assert b.schedule.lr(1) < cfg_b["optim"]["lr"]
    # the remaining 10 warmup steps carried over: warmup ends at B's step 10
    assert b.schedule.warmup_end == 10
    assert b.schedule.lr(10) == pytest.approx(cfg_b["optim"]["lr"])
    assert b.schedule.lr(9) < b.schedule.lr(10)
    assert b.step == 0 and b.tokens_seen == 0
    assert b.loader.state.tokens_in_epoch == 0  # new data from its beginning
    # Adam moments in B's first step are A's last, tensor by tensor
    b_opt = b.optimizer.state_dict()
    assert a_opt["state"].keys() == b_opt["state"].keys()
    for idx, state in a_opt["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], b_opt["state"][idx][key]), (idx, key)
    logged = record_lr(b)
    b.fit()
    lrs = list(logged.values())
    assert lrs[0] == pytest.approx(a_sched.lr(41))
    assert max(lrs) == pytest.approx(cfg_b["optim"]["lr"]) and lrs.index(max(lrs)) == 9
    assert lrs[-1] == pytest.approx(cfg_b["optim"]["lr"] * 0.1)


def test_start_from_keeping_counters_and_restart_schedule(two_corpora, tmp_path):
    c1, c2 = two_corpora
    run(tiny_cfg(c1, tmp_path / "A", trainer__max_duration=30))
    b = Trainer(config_from_dict(tiny_cfg(
        c2, tmp_path / "B", trainer__max_duration=80, schedule__warmup=5,
        schedule__restart=True, init__from=str(tmp_path / "A"), init__load_optimizer=False)))
    assert b.step == 30 and b.tokens_seen == 30 * 8 * 32
    assert b.schedule.lr(31) == pytest.approx(3e-3 / 5)  # a fresh warmup from step 30
    assert b.schedule.warmup_end == 35 and b.schedule.lr(80) == pytest.approx(3e-4)
    assert not b.optimizer.state  # fresh moments
    b.fit()
    assert ckpt.latest_checkpoint(tmp_path / "B").name == "step80"


def test_dry_run_states_each_carry_over_choice(two_corpora, tmp_path):
    from test_cli import write_config

    c1, c2 = two_corpora
    run(tiny_cfg(c1, tmp_path / "A", trainer__max_duration=20, model__tie_embeddings=False))
    config = write_config(tmp_path / "b.yaml", c2, tmp_path / "B")
    out = kiln_here("train", config, "--dry-run", f"--init.from={tmp_path / 'A'}",
               "--trainer.max_duration=60")
    assert out.returncode == 0, out.stderr
    for needle in ("weights: loaded", "Adam moments and step counts loaded",
                   "counters: step and tokens continue from 20",
                   "data: starts at the beginning of data.paths", "steps this run        40"):
        assert needle in out.stdout, needle
    assert not (tmp_path / "B").exists()


# -- extend ------------------------------------------------------------------------------------


def test_extend_a_constant_run_to_1000_steps_with_cosine(pydoc_tokens, tmp_path):
    run_dir = tmp_path / "run"
    base = tiny_cfg(pydoc_tokens, run_dir, schedule__name="constant", schedule__warmup=10,
                    trainer__max_duration=100, checkpoint__interval=0)
    run(base)
    from kiln.config import Duration

    t = Trainer(config_from_dict({**base, "trainer": {**base["trainer"], "hard_stop": 110}}),
                extend_to=Duration(1000))
    s, peak, final = t.schedule, 3e-3, 3e-4
    assert s.lr(100) == pytest.approx(peak)
    assert abs(s.lr(101) - s.lr(100)) < 1e-4 * peak  # continuous at the join
    assert s.lr(1000) == pytest.approx(final)
    assert s.lr(550) == pytest.approx((peak + final) / 2)  # cosine midpoint
    tail = [s.lr(i) for i in range(100, 1001)]
    assert all(x >= y for x, y in zip(tail, tail[1:]))  # monotone after the join
    t.fit()
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").open())
           if "lr" in r}
    assert lrs[100] == pytest.approx(peak) and lrs[101] == pytest.approx(s.lr(101))
    saved = yaml.safe_load((ckpt.latest_checkpoint(run_dir) / "config.yaml").read_text())
    assert saved["trainer"]["max_duration"]["value"] == 1000


def test_extend_via_cli_and_resume_needs_the_flag_to_change_duration(pydoc_tokens, tmp_path):
    from test_cli import write_config

    config = write_config(tmp_path / "c.yaml", pydoc_tokens, tmp_path / "run",
                          schedule={"name": "constant"})
    assert kiln_here("train", config).returncode == 0
    run_dir = tmp_path / "run"
    before = snapshot(run_dir / "checkpoints")
    out = kiln_here("train", config, "--trainer.max_duration=12")
    assert_one_line_error(out, "max_duration", "--extend-to")
    assert snapshot(run_dir / "checkpoints") == before
    assert_one_line_error(kiln_here("train", run_dir, "--extend-to=3"),
                          "not after the current step")
    out = kiln_here("train", run_dir, "--extend-to=12", "--trainer.hard_stop=8")
    assert out.returncode == 0, out.stderr
    assert "extended from step 6 to 12" in out.stdout
    sched = kiln_here("schedule", run_dir, "--out", tmp_path / "lr.png")
    assert sched.returncode == 0 and (tmp_path / "lr.png").stat().st_size > 1000
    assert "<- now" in sched.stdout


# -- changed shapes ----------------------------------------------------------------------------


def test_batch_size_change_on_resume_keeps_the_token_position(pydoc_tokens, tmp_path):
    run_dir = tmp_path / "run"
    seen: list[list[int]] = []

    def record(trainer):
        original = trainer.loader.next_batch

        def next_batch():
            batch = original()
            seen.extend(batch.tolist())
            return batch

        trainer.loader.next_batch = next_batch
        return trainer

    cfg = tiny_cfg(pydoc_tokens, run_dir, trainer__hard_stop=10, trainer__max_duration=30)
    record(Trainer(config_from_dict(cfg))).fit()
    bigger = tiny_cfg(pydoc_tokens, run_dir, trainer__global_batch_size=16,
                      trainer__max_duration=30, trainer__hard_stop=15)
    t = record(Trainer(config_from_dict(bigger)))
    assert any("global batch changed 8 -> 16" in n for n in t.plan.notes)
    t.fit()
    assert len(seen) == 10 * 8 + 5 * 16
    ds = t.train_data
    expected = [ds.window(int(i)).tolist() for i in t.loader.permutation(0)[: len(seen)]]
    assert seen == expected  # nothing repeated, nothing skipped


def test_refusals_are_one_line_and_change_no_checkpoint(two_corpora, tmp_path):
    from test_cli import write_config

    c1, c2 = two_corpora
    a_cfg = write_config(tmp_path / "a.yaml", c1, tmp_path / "A")
    assert kiln_here("train", a_cfg).returncode == 0
    before = snapshot(tmp_path / "A")
    b_cfg = write_config(tmp_path / "b.yaml", c2, tmp_path / "B",
                         trainer={"max_duration": 20})
    cases = [
        (["--init.load_data_position=true"], ["data.paths differ", "load_data_position=false"]),
        (["--model.n_layers=3"], ["different model shape", "blocks.2"]),
        (["--init.from=" + str(tmp_path / "nope")], ["does not exist"]),
        (["--model.tie_embeddings=true"], ["separate output head", "tie_embeddings=false"]),
        (["--trainer.max_duration=4"], ["not after the starting step 6"]),
    ]
    commands = {}
    for i, (extra, _) in enumerate(cases):
        args = list(extra)
        if not any(a.startswith("--init.from") for a in args):
            args = ["--init.from=" + str(tmp_path / "A"), *args]
        commands[i] = ["train", b_cfg, *args]
    # a resumed run whose data changed is told how to switch data properly
    commands["data"] = ["train", a_cfg, f"--data.paths=[{c2}]"]
    results = {k: kiln_here(*args) for k, args in commands.items()}
    for i, (_, needles) in enumerate(cases):
        assert_one_line_error(results[i], *needles)
    assert not (tmp_path / "B").exists()
    assert_one_line_error(results["data"], "data.paths differ", "init.from")
    assert snapshot(tmp_path / "A") == before
    np.testing.assert_equal(len(ckpt.list_checkpoints(tmp_path / "A")), 2)


def test_dry_run_of_a_resume_says_a_changed_schedule_is_not_applied(pydoc_tokens, tmp_path):
    from test_cli import write_config

    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, run,
                          trainer={"max_duration": 12, "hard_stop": 3})
    assert kiln_here("train", config).returncode == 0
    out = kiln_here("train", run, "--schedule.warmup=5", "--optim.lr=1e-3", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert ("schedule: changed since the checkpoint (schedule.warmup), but a resume keeps the "
            "saved schedule") in out.stdout
    assert "optim.lr changed 0.003 -> 0.001: every LR after step 3" in out.stdout
