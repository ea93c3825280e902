"""checkpoint.async: checkpoints written in a background thread are the synchronous ones byte
for byte; a background save that fails stops the run and leaves the previous checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from test_cli import assert_one_line_error, kiln_here, write_config

from kiln import checkpoint as ckpt

PARTS = ("model.safetensors", "optim.pt", "rng.pt", "trainer.json")


def config(tmp_path: Path, tokens: Path, name: str, **checkpoint) -> tuple[Path, Path]:
    run = tmp_path / name
    path = write_config(tmp_path / f"{name}.yaml", tokens, run,
                        model={"tie_embeddings": True},
                        trainer={"max_duration": 8, "eval_interval": 4},
                        checkpoint={"interval": 3, "keep_last": 0, **checkpoint},
                        log={"interval": 1, "console": True})
    return path, run


def test_background_saves_equal_synchronous_ones_byte_for_byte(pydoc_tokens, tmp_path):
    runs = {}
    for mode in (False, True):
        path, run = config(tmp_path, pydoc_tokens, f"async-{mode}", **{"async": mode})
        r = kiln_here("train", path)
        assert r.returncode == 0, r.stderr
        runs[mode] = run
        if mode:
            assert r.stdout.count("written in the background") == 3  # steps 3, 6 and 8
    for step in ("step3", "step6", "step8"):
        for part in PARTS:
            sync = (runs[False] / "checkpoints" / step / part).read_bytes()
            assert (runs[True] / "checkpoints" / step / part).read_bytes() == sync, (step, part)
    assert kiln_here("checkpoint", "verify", runs[True]).returncode == 0
    assert ckpt.latest_checkpoint(runs[True]).name == "step8"


def test_a_failed_background_save_stops_the_run_and_keeps_the_previous_one(
        pydoc_tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_FAULT_SAVE", "step6")
    path, run = config(tmp_path, pydoc_tokens, "run", **{"async": True})
    r = kiln_here("train", path)
    assert_one_line_error(r, "background save failed", "step6", "Input/output error")
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["latest", "step3"]
    assert ckpt.load(run, with_rng=True).step == 3
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text()
              .splitlines()]
    assert max(logged) in (7, 8)  # stopped at the step after the failure was known
    # and the run resumes from step3 to the end
    monkeypatch.delenv("KILN_FAULT_SAVE")
    r = kiln_here("train", run)
    assert r.returncode == 0, r.stderr
    assert ckpt.latest_checkpoint(run).name == "step8"


def same_state(a, b) -> bool:
    import torch

    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_background_sharded_saves_equal_synchronous_ones(pydoc_tokens, tmp_path):
    from kiln.safeload import dcp_load_full

    runs = {}
    for mode in (False, True):
        path, run = config(tmp_path, pydoc_tokens, f"sharded-{mode}", sharded=True,
                           **{"async": mode})
        r = kiln_here("train", path)
        assert r.returncode == 0, r.stderr
        runs[mode] = run
    for step in ("step3", "step6", "step8"):
        a, b = (dcp_load_full(runs[m] / "checkpoints" / step / "dcp") for m in (False, True))
        assert same_state(a, b), step
        for part in ("rng.pt", "trainer.json"):
            assert ((runs[True] / "checkpoints" / step / part).read_bytes()
                    == (runs[False] / "checkpoints" / step / part).read_bytes())
    assert kiln_here("checkpoint", "verify", runs[True]).returncode == 0
