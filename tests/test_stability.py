"""The stability watch: a non-finite or spiking step is caught on the step it happens, not at
the next logging step, and trainer.on_nonfinite / on_spike decide what happens to its update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_cfg, train

from kiln.errors import KilnError


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step{step}" / "model.safetensors"))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def cfg(tokens: Path, run: Path, **over) -> dict:
    over = {"trainer__max_duration": 8, **over}
    return tiny_cfg(tokens, run, checkpoint__interval=1, checkpoint__keep_last=0,
                    log__interval=4, trainer__global_batch_size=4, **over)


def test_skip_drops_the_bad_batch_and_the_run_ends_finite(pydoc_tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_FAULT_LOSS", "6:nan")  # between logging steps 4 and 8
    run = tmp_path / "run"
    train(cfg(pydoc_tokens, run, trainer__on_nonfinite="skip"))
    before, after = weights(run, 5), weights(run, 6)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the update was dropped
    assert not torch.equal(weights(run, 6)["embed.weight"], weights(run, 7)["embed.weight"])
    for step in range(1, 9):
        assert all(torch.isfinite(t).all() for t in weights(run, step).values()), step
    logged = {r["step"]: r for r in records(run) if "loss" in r}
    assert logged[8]["skipped_updates"] == 1 and "skipped_updates" not in logged[4]


def test_stop_keeps_no_checkpoint_of_the_bad_step_even_between_logging_steps(
        pydoc_tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_FAULT_LOSS", "6:nan")
    run = tmp_path / "run"
    with pytest.raises(KilnError, match="non-finite .* at step 6"):
        train(cfg(pydoc_tokens, run))  # on_nonfinite: stop (the default)
    saved = sorted(int(p.name[4:]) for p in (run / "checkpoints").glob("step*"))
    assert saved == [1, 2, 3, 4, 5]  # checked before every save: step 6 never written
    for step in saved:
        assert all(torch.isfinite(t).all() for t in weights(run, step).values())


def test_a_spike_is_found_and_skipped(pydoc_tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_FAULT_LOSS", "11:1000")  # gradients 1000x: a grad-norm spike
    run = tmp_path / "run"
    train(cfg(pydoc_tokens, run, trainer__on_spike="skip", trainer__spike_window=8,
              optim__grad_clip=0.0, trainer__max_duration=12))
    before, after = weights(run, 10), weights(run, 11)
    assert all(torch.equal(before[k], after[k]) for k in before)
    logged = {r["step"]: r for r in records(run) if "loss" in r}
    assert logged[12]["spikes"] == 1 and logged[12]["skipped_updates"] == 1
    assert not any("spikes" in r for s, r in logged.items() if s < 12)  # no false alarms


def test_step_costs_are_logged(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(pydoc_tokens, run, trainer__max_duration=4, checkpoint__interval=2,
                   log__interval=2))
    logged = [r for r in records(run) if "loss" in r]
    for r in logged:
        assert 0 <= r["data_wait_share"] < 1 and r["data_wait"] >= 0
        assert r["fwd_bwd_time"] > 0 and r["optim_time"] > 0 and r["peak_mem_mib"] > 100
    # a save comes after its step's log line: the step-2 save is reported at step 4
    assert "ckpt_mib" not in logged[0]
    assert logged[1]["ckpt_mib"] > 0 and logged[1]["ckpt_save_time"] > 0
