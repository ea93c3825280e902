"""Data mixtures (data.sources): each source's share holds in every stretch of a run, the run
resumes exactly, and a resume at another global batch size neither repeats nor skips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_cli import assert_one_line_error, kiln_here

from kiln.data.loader import BatchLoader, WindowDataset
from kiln.data.mixture import MixtureDataset, shares
from kiln.data.tokens import TokenFile, TokenWriter


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """Two real token files (vocab 512, EOS 0) of different sizes and contents."""
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for name, docs, seed in (("web", 120, 1), ("code", 40, 2)):
        rng = np.random.default_rng(seed)
        path = root / name / "tokens.bin"
        path.parent.mkdir()
        with TokenWriter(path, eos_token_id=0, vocab_size=512) as w:
            for _ in range(docs):
                w.write(rng.integers(1, 512, int(rng.integers(50, 400))))
        out[name] = path
    return out


def mixture(corpora, weights=(0.7, 0.3), seq_len=32) -> MixtureDataset:
    parts = [WindowDataset([TokenFile.open(corpora[n])], seq_len) for n in ("web", "code")]
    return MixtureDataset(parts, list(weights), ["web", "code"], seed=0)


def test_shares_add_up_and_every_stretch_holds_each_weight(corpora):
    assert shares([0.7, 0.3], 10).tolist() == [7, 3]
    assert shares([1, 1, 1], 10).sum() == 10
    mix = mixture(corpora)
    loader = BatchLoader(mix, 8, seed=0, prefetch=0)
    taken = []
    for _ in range(300):  # several mixture epochs: the small source repeats
        taken += mix.sources_of(loader._advance(loader.state)[0], loader.state.epoch)
        loader.next_batch()
    taken = np.array(taken)
    for n in (80, 400, len(taken)):
        share = (taken[:n] == 1).mean()
        assert abs(share - 0.3) <= 0.01 + 2 / n, (n, share)
    assert abs((taken == 1).mean() - 0.3) <= 0.01


def test_resume_at_another_batch_size_neither_repeats_nor_skips(corpora):
    mix = mixture(corpora)
    whole = BatchLoader(mix, 8, seed=0, prefetch=0)
    want = torch.cat([whole.next_batch() for _ in range(6)])
    first = BatchLoader(mix, 8, seed=0, prefetch=0)
    got = [first.next_batch() for _ in range(3)]
    second = BatchLoader(mix, 4, seed=0, prefetch=0)
    second.load_state_dict(first.state_dict())
    got += [second.next_batch() for _ in range(6)]
    assert torch.equal(torch.cat(got), want)


def write_mix_config(path: Path, corpora, run: Path, weights=(0.7, 0.3), **trainer) -> Path:
    cfg = {
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "mlp_hidden_size": 192,
                  "vocab_size": 512, "max_seq_len": 64},
        "data": {"seq_len": 32, "val_fraction": 0.05,
                 "sources": [{"name": "web", "paths": [str(corpora["web"])],
                              "weight": weights[0]},
                             {"name": "code", "paths": [str(corpora["code"])],
                              "weight": weights[1]}]},
        "optim": {"lr": 3e-3},
        "trainer": {"run_dir": str(run), "global_batch_size": 8, "micro_batch_size": 4,
                    "max_duration": 8, "eval_interval": 0, **trainer},
        "checkpoint": {"interval": 4},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_mixture_run_plans_its_budget_and_resumes_exactly(corpora, tmp_path):
    config = write_mix_config(tmp_path / "c.yaml", corpora, tmp_path / "whole")
    dry = kiln_here("train", config, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "source web" in dry.stdout and "weight 0.700" in dry.stdout
    assert "source code" in dry.stdout and "weight 0.300" in dry.stdout
    assert kiln_here("train", config).returncode == 0
    split = tmp_path / "split"
    assert kiln_here("train", config, f"--trainer.run_dir={split}",
                     "--trainer.hard_stop=4").returncode == 0
    r = kiln_here("train", split)
    assert r.returncode == 0, r.stderr
    a = load_file(str(split / "checkpoints" / "step8" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "checkpoints" / "step8" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    # each source's own training loss is logged; the step's loss lies between them
    for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            low, high = sorted((rec["loss_web"], rec["loss_code"]))
            assert low - 1e-5 <= rec["loss"] <= high + 1e-5, rec
    trainer = json.loads((split / "checkpoints" / "step8" / "trainer.json").read_text())
    assert set(trainer["data"]["mixture"]) == {"web", "code"}
    # another mixture on resume is refused: its positions count other windows
    r = kiln_here("train", split, "--extend-to=12", "--data.sources=" + json.dumps(
        [{"name": "web", "paths": [str(corpora["web"])], "weight": 0.5},
         {"name": "code", "paths": [str(corpora["code"])], "weight": 0.5}]))
    assert_one_line_error(r, "another data mixture", "init.load_data_position=false")


def test_a_source_of_bad_weight_or_both_paths_and_sources_are_refused(corpora, tmp_path):
    config = write_mix_config(tmp_path / "c.yaml", corpora, tmp_path / "run", weights=(1, -1))
    assert_one_line_error(kiln_here("train", config, "--dry-run"), "data.sources[1].weight=-1")
    config = write_mix_config(tmp_path / "c.yaml", corpora, tmp_path / "run")
    r = kiln_here("train", config, "--dry-run", f"--data.paths={corpora['web']}")
    assert_one_line_error(r, "data.paths and data.sources are both set")
