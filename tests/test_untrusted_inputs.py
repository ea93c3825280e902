"""Input files are not trusted: token ids are checked against the model batch by batch (a
sidecar can lie), signed .npy files must prove they hold no negative id, and config files
may not set a key twice or a learning rate of zero."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_one_line_error, kiln, kiln_here, snapshot, write_config

from kiln import checkpoint as ckpt
from kiln.config import load_config
from kiln.data.build import build_datasets
from kiln.data.loader import BatchLoader


def lying_copy(tokens: Path, dst: Path, repeat: int = 1) -> Path:
    """A copy of a kiln token file (and its sidecar) that the test can change under the
    sidecar's feet; with `repeat`, its documents `repeat` times over (a longer file)."""
    dst.mkdir()
    (dst / tokens.name).write_bytes(tokens.read_bytes() * repeat)
    meta = json.loads(tokens.with_suffix(".json").read_text())
    meta.update(tokens=meta["tokens"] * repeat, documents=meta["documents"] * repeat)
    dst.joinpath(tokens.with_suffix(".json").name).write_text(json.dumps(meta))
    return dst / tokens.name


def test_out_of_vocabulary_ids_stop_the_run_at_their_batch(pydoc_tokens, tmp_path):
    # long enough (~2.6 MB) that the start's scan of each file's first and last MiB misses
    # an id planted in the middle: the per-batch check must catch it
    data = lying_copy(pydoc_tokens, tmp_path / "data", repeat=6)
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "run",
                          trainer={"max_duration": 10, "eval_interval": 0},
                          checkpoint={"interval": 2})
    cfg = load_config(config)
    # the window that step 5 trains on (found with kiln's own loader, before the damage)
    train, _, _ = build_datasets(cfg)
    gbs = cfg.trainer.global_batch_size
    order = BatchLoader(train, gbs, cfg.data.seed, prefetch=0).permutation(0)
    middle = [int(w) for w in order[4 * gbs:5 * gbs]
              if 2**19 < w * cfg.data.seq_len < len(order) * cfg.data.seq_len - 2**19]
    window = middle[0]  # a window of step 5 outside the first and last MiB
    position = window * cfg.data.seq_len + 7
    ids = np.memmap(data, dtype=np.uint16, mode="r+")
    ids[position] = 9999  # vocab is 512; the sidecar still says the largest id is 511
    ids.flush()
    del ids
    assert json.loads(data.with_suffix(".json").read_text())["max_token_id"] < 512
    data_hash = snapshot(data.parent)

    out = kiln("train", config)
    assert_one_line_error(out, str(data), "id 9999", f"position {position:,}",
                          "model.vocab_size=512", "sidecar claims the largest id is 511")
    run = tmp_path / "run"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4, "no optimizer step may run on the bad batch"
    assert ckpt.latest_checkpoint(run).name == "step4"
    assert ckpt.load(run).step == 4  # the checkpoint written before is intact
    assert snapshot(data.parent) == data_hash  # the data file is not touched
    # kiln inspect reports the range the file really holds, and that the sidecar is wrong
    out = kiln_here("inspect", data)
    assert out.returncode == 0
    assert "id range        0 .. 9,999 (scanned)" in out.stdout
    assert "sidecar says the largest id is 511, the file holds 9999" in out.stdout


def test_signed_and_float_npy_files_are_refused_unless_provably_in_range(tmp_path):
    ids = np.arange(1, 301, dtype=np.int32) % 500
    np.save(tmp_path / "fine.npy", ids)
    bad = ids.copy()
    bad[123] = -1
    np.save(tmp_path / "negative.npy", bad)
    np.save(tmp_path / "floats.npy", ids.astype(np.float32))
    out = kiln_here("inspect", tmp_path / "fine.npy")
    assert out.returncode == 0 and "id range        1 .. 300 (scanned)" in out.stdout
    out = kiln_here("inspect", tmp_path / "negative.npy")
    assert_one_line_error(out, "negative.npy", "signed int32", "negative id -1", "position 123")
    out = kiln_here("inspect", tmp_path / "floats.npy")
    assert_one_line_error(out, "floats.npy", "float32", "astype('uint32')")


def test_duplicate_config_keys_are_refused_with_both_lines(pydoc_tokens, tmp_path):
    base = write_config(tmp_path / "base.yaml", pydoc_tokens, tmp_path / "run").read_text()
    top = tmp_path / "top.yaml"
    top.write_text(base + "optim:\n  lr: 0.1\n")  # a whole second `optim:` section
    inside = tmp_path / "inside.yaml"
    inside.write_text(base.replace("  lr: 0.003\n", "  lr: 0.003\n  weight_decay: 0.0\n"
                                   "  lr: 0.1\n"))
    lines = {name: [i + 1 for i, line in enumerate(p.read_text().splitlines())
                    if line.startswith(key)]
             for name, p, key in (("top", top, "optim:"), ("inside", inside, "  lr:"))}
    for name, path in (("top", top), ("inside", inside)):
        out = kiln_here("train", path, "--dry-run")
        first, second = lines[name]
        assert_one_line_error(out, str(path), "twice", f"lines {first} and {second}")
    assert not (tmp_path / "run").exists()
    # the same rule for a YAML value given on the command line
    out = kiln_here("train", top, "--trainer.max_duration={value: 4, value: 8}")
    assert_one_line_error(out, "--trainer.max_duration", "twice")


@pytest.mark.parametrize("lr", ["0", "-0.001", ".nan"])
def test_a_learning_rate_that_cannot_learn_is_refused(pydoc_tokens, tmp_path, lr):
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, tmp_path / "run")
    out = kiln_here("train", config, f"--optim.lr={lr}", "--dry-run")
    assert_one_line_error(out, "optim.lr=", "cannot learn")
    assert not (tmp_path / "run").exists()


def test_a_corrupt_run_config_is_one_line(pydoc_tokens, tmp_path):
    config = write_config(tmp_path / "c.yaml", pydoc_tokens, tmp_path / "run")
    (tmp_path / "c.yaml").write_text(config.read_text() + "data: [\n")
    for extra in ([], ["--dry-run"]):
        assert_one_line_error(kiln_here("train", config, *extra), "c.yaml",
                              "not valid YAML at line")
