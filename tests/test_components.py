"""The loop's components, each doing its one job: the stability watch's history survives a
resume, one retry policy covers the sharded background save, the profiler writes a trace,
the garbage collector changes no loss, and MFU comes from the one hardware table."""

from __future__ import annotations

import json

import pytest
import torch
from test_stability import cfg, records, weights
from test_train import tiny_cfg, train

from kiln import faults, hardware
from kiln.config import config_from_dict
from kiln.trainer import Trainer


def test_a_spike_right_after_a_resume_is_judged_against_the_window_before_it(
        pydoc_tokens, tmp_path, monkeypatch):
    over = dict(trainer__on_spike="skip", trainer__spike_window=8, optim__grad_clip=0.0,
                trainer__max_duration=12)
    run = tmp_path / "run"
    train(cfg(pydoc_tokens, run, trainer__hard_stop=10, **over))  # 10 steps: the window full
    saved = json.loads((run / "checkpoints" / "step10" / "trainer.json").read_text())
    assert len(saved["stability"]["history"][0]) == 8 and saved["stability"]["filled"] == 10
    monkeypatch.setenv("KILN_FAULT_LOSS", "11:1000")  # the first step after the resume
    train(cfg(pydoc_tokens, run, **over))
    assert all(torch.equal(weights(run, 10)[k], weights(run, 11)[k])
               for k in weights(run, 10))  # skipped: judged a spike at once
    logged = {r["step"]: r for r in records(run) if "loss" in r}
    assert logged[12]["spikes"] == 1 and logged[12]["skipped_updates"] == 1


def test_on_save_error_retry_covers_the_sharded_background_save(pydoc_tokens, tmp_path,
                                                                monkeypatch):
    over = dict(trainer__max_duration=6, checkpoint__interval=3, checkpoint__sharded=True)
    train(tiny_cfg(pydoc_tokens, tmp_path / "ref", **over))
    monkeypatch.setenv("KILN_FAULT_SAVE", "2")  # the first two saves fail after their shards
    monkeypatch.setattr(faults, "saves_failed", [0])
    monkeypatch.setattr("time.sleep", lambda s: None)  # (the 2 s and 4 s waits)
    run = tmp_path / "run"
    train(tiny_cfg(pydoc_tokens, run, checkpoint__async=True,
                   checkpoint__on_save_error="retry 2", **over))
    assert faults.saves_failed == [2]
    from kiln import checkpoint as ckpt

    for step in ("step3", "step6"):
        got = ckpt.read_sharded_full(run / "checkpoints" / step)["model"]
        want = ckpt.read_sharded_full(tmp_path / "ref" / "checkpoints" / step)["model"]
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_a_profile_writes_a_trace_with_the_steps_operators(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    from test_cli import kiln_here

    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump(tiny_cfg(pydoc_tokens, run, trainer__max_duration=6)))
    r = kiln_here("train", config, "--profile", "2")
    assert r.returncode == 0, r.stderr
    trace = json.loads((run / "profile" / "trace-step3-4.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert "aten::mm" in names and any(n.startswith("ProfilerStep#") for n in names)
    assert "aten::mm" in (run / "profile" / "top-ops-step3-4.txt").read_text()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["log"]["profile"] == 0  # it belongs to that invocation


def test_the_garbage_collector_changes_no_loss_and_says_what_it_costs(pydoc_tokens, tmp_path):
    losses = {}
    for every in (0, 2):
        run = tmp_path / f"gc{every}"
        train(tiny_cfg(pydoc_tokens, run, trainer__max_duration=6, trainer__gc_interval=every))
        logged = [r for r in records(run) if "loss" in r]
        losses[every] = [r["loss"] for r in logged]
        assert any("gc_time" in r for r in logged) == bool(every)
    assert losses[0] == losses[2]
    import gc

    assert gc.isenabled()  # back on after the run


@pytest.mark.parametrize("device_name", ["NVIDIA B200", "NVIDIA H100 80GB HBM3"])
def test_mfu_is_reported_for_a_device_the_hardware_table_names(pydoc_tokens, tmp_path,
                                                              device_name):
    trainer = Trainer(config_from_dict(tiny_cfg(pydoc_tokens, tmp_path / "run",
                                                trainer__max_duration=3)))
    assert trainer.meter.peak_flops is None  # a CPU: no MFU
    peak = hardware.peak_flops(torch.device("cuda"), "bf16", device_name=device_name)
    assert peak == hardware.of_device_name(device_name).bf16 > 0
    trainer.meter.peak_flops = peak
    trainer.fit()
    for r in (r for r in records(tmp_path / "run") if "loss" in r):
        assert r["mfu"] == pytest.approx(r["model_flops_per_sec"] / peak)


def test_kiln_plan_and_the_run_read_one_gpu_table():
    from kiln.plan import gpu_spec

    assert gpu_spec("b200") == (180e9, hardware.of_device_name("NVIDIA B200").bf16)
    assert {g.match for g in hardware.GPUS} >= {"H100", "H200", "B200", "A100"}


def test_a_callback_added_from_outside_sees_every_step(pydoc_tokens, tmp_path):
    from kiln.callbacks import Callback

    seen = []

    class EveryStep(Callback):
        def on_step(self, trainer):
            seen.append(trainer.step)

    Trainer(config_from_dict(tiny_cfg(pydoc_tokens, tmp_path / "run", trainer__max_duration=4,
                                      log__interval=2)), callbacks=[EveryStep()]).fit()
    assert seen == [1, 2, 3, 4]
