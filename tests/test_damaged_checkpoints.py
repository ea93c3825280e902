"""Every command against every damaged checkpoint part: each cell either works and gives the
output an intact checkpoint gives, or exits 2 with one line naming the damaged file, and never
changes the run directory.

What each command needs is declared in NEEDS; a command refuses exactly when a part it needs is
damaged. Damage is dealt as a user's disk or copy deals it: files deleted, truncated, one byte
flipped in the middle (same size: only the manifest's SHA-256 tells), or swapped for the same
file of another run of the same shape; a damaged part whose contents a command reads is refused
as differing "from the manifest written at save", naming the newest checkpoint that passes.

The commands run in this process through kiln's real CLI entry point (`kiln.cli.main`)
on real checkpoint files, so that the whole table costs seconds instead of ~100 interpreter
starts; tests/test_untrusted_checkpoints.py covers the same commands as subprocesses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import kiln_here, snapshot, write_config

STEP = "step6"  # the latest checkpoint of the base runs (checkpoints at steps 3 and 6)


@pytest.fixture(scope="module")
def base(pydoc_tokens, tmp_path_factory) -> dict:
    """Two runs stopped at step 6 of 8 (unsharded and sharded), another run of the same shape
    (another seed: the source of swapped files), and what the intact runs give."""
    root = tmp_path_factory.mktemp("damaged")
    runs = {}
    for kind in ("unsharded", "sharded", "other"):
        seed = 7 if kind == "other" else 0  # another init and data order: other files
        config = write_config(root / f"{kind}.yaml", pydoc_tokens, root / kind,
                              trainer={"max_duration": 8, "seed": seed}, data={"seed": seed},
                              checkpoint={"interval": 3, "sharded": kind == "sharded"})
        r = kiln_here("train", config, "--trainer.hard_stop=6")
        assert r.returncode == 0, r.stderr
        runs[kind] = root / kind
    return {"root": root, "runs": runs, "config": root / "unsharded.yaml", "refs": {},
            "tokens": pydoc_tokens}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)  # a copied run resumes itself: nothing in it is edited
    return dst


# -- damage -----------------------------------------------------------------------------------


def truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def drop_tensor(f: Path) -> None:
    state = load_file(str(f))
    del state[next(k for k in sorted(state) if k.startswith("blocks.1."))]
    save_file(state, str(f))


def other_model(f: Path) -> None:
    from kiln.config import ModelConfig
    from kiln.model import Transformer

    m = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=4, mlp_hidden_size=96,
                                vocab_size=512, max_seq_len=64))
    state = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(f))


def shard_file(step: Path) -> Path:
    return next((step / "dcp").glob("*.distcp"))


def flip(f: Path) -> None:
    """One bit flipped in the middle of the file: the same size, still readable."""
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


OTHER: list[Path] = []  # the other run's step6, set by the base fixture's user below


def swapped(name: str):
    """The file replaced by the same file of another run of the same shape (step 6 too)."""
    return lambda f: shutil.copyfile(OTHER[0] / name, f)


def other_tokenizer(f: Path) -> None:
    """Another vocabulary: a tokenizer trained on other text (another size and hash)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["some other text entirely"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tok.save(str(f))


# part name -> (the file it damages, relative to the checkpoint; how)
DAMAGE = {
    "optim.pt missing": ("optim.pt", lambda f: f.unlink()),
    "optim.pt truncated": ("optim.pt", truncate),
    "rng.pt missing": ("rng.pt", lambda f: f.unlink()),
    "rng.pt truncated": ("rng.pt", truncate),
    "model.safetensors truncated": ("model.safetensors", truncate),
    "a tensor missing": ("model.safetensors", drop_tensor),
    "weights of another model": ("model.safetensors", other_model),
    "trainer.json is {}": ("trainer.json", lambda f: f.write_text("{}")),
    "trainer.json truncated": ("trainer.json", truncate),
    "config.yaml corrupt": ("config.yaml", lambda f: f.write_text("model: [d_model: 64\n  x")),
    "tokenizer.json missing": ("tokenizer.json", lambda f: f.unlink()),
    "trainer.json missing": ("trainer.json", lambda f: f.unlink()),
    "latest names a missing folder": (None, None),
    "latest holds garbled bytes": ("latest", lambda f: f.write_bytes(b"\xff\xfestep\x00\x9c")),
    # the same size, or another run's file: only the manifest's hashes tell
    "a byte flipped in model.safetensors": ("model.safetensors", flip),
    "a byte flipped in optim.pt": ("optim.pt", flip),
    "a byte flipped in rng.pt": ("rng.pt", flip),
    "another run's rng.pt": ("rng.pt", swapped("rng.pt")),
    "another run's trainer.json": ("trainer.json", swapped("trainer.json")),
    "another run's config.yaml": ("config.yaml", swapped("config.yaml")),
    "another run's tokenizer.json": ("tokenizer.json", other_tokenizer),
    "tokenizer.json truncated": ("tokenizer.json", truncate),
    "tokenizer.json empty": ("tokenizer.json", lambda f: f.write_bytes(b"")),
}
SHARDED_DAMAGE = {
    "dcp/.metadata truncated": ("dcp", lambda step: truncate(step / "dcp" / ".metadata")),
    "a shard file truncated": ("dcp", lambda step: truncate(shard_file(step))),
    "a shard file missing": ("dcp", lambda step: shard_file(step).unlink()),
    "a byte flipped in a shard file": ("dcp", lambda step: flip(shard_file(step))),
    "rng.pt missing": ("rng.pt", lambda step: (step / "rng.pt").unlink()),
    "another run's rng.pt": ("rng.pt", lambda step: swapped("rng.pt")(step / "rng.pt")),
    "trainer.json is {}": ("trainer.json", lambda step: (step / "trainer.json").write_text("{}")),
    "another run's trainer.json": ("trainer.json",
                                   lambda step: swapped("trainer.json")(step / "trainer.json")),
}
# Damage to the weights' contents (not their size or header): a command that reads only the
# header (schedule previews the plan, which checks shapes) is not stopped by it.
CONTENT_ONLY = {"a byte flipped in model.safetensors", "a byte flipped in a shard file"}

# What each command reads of a checkpoint ("dcp" stands for a sharded checkpoint's weights and
# optimizer state). Weights-only commands must work without the optimizer, RNG or trainer state;
# `schedule RUN_DIR` previews the plan of `train RUN_DIR`, which checks the weights' shapes.
NEEDS = {
    "resume": {"model.safetensors", "optim.pt", "rng.pt", "trainer.json", "config.yaml", "dcp"},
    "init.from": {"model.safetensors", "optim.pt", "trainer.json", "config.yaml", "dcp"},
    "generate": {"model.safetensors", "config.yaml", "tokenizer.json", "dcp"},
    "export hf": {"model.safetensors", "config.yaml", "dcp"},  # a bad tokenizer is left out
    "eval": {"model.safetensors", "config.yaml", "tokenizer.json", "dcp"},
    "inspect": {"model.safetensors", "trainer.json", "config.yaml", "dcp"},
    # writes a whole checkpoint: whatever it carries over must pass
    "checkpoint unshard": {"trainer.json", "config.yaml", "rng.pt", "dcp"},
    "schedule": {"trainer.json", "config.yaml", "model.safetensors", "dcp"},  # checks the plan
}


def command(name: str, run: Path, base: dict, out: Path) -> list:
    return {
        "resume": ["train", run],
        "init.from": ["train", base["config"], f"--init.from={run}",
                      f"--trainer.run_dir={out / 'new'}", "--trainer.max_duration=8",
                      "--trainer.eval_interval=0"],
        "generate": ["generate", run, "--prompt", "The", "--max-new-tokens", "4", "--greedy"],
        "export hf": ["export", "hf", run, out / "hf"],
        "eval": ["eval", run, "--data", base["tokens"], "--limit", "2", "--no-write"],
        "inspect": ["inspect", run],
        "checkpoint unshard": ["checkpoint", "unshard", run, out / "unsharded"],
        "schedule": ["schedule", run, "--out", out / "lr.png"],
    }[name]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def reference(base: dict, kind: str, name: str, step: str, tmp: Path) -> object:
    """What `name` gives on an intact copy of the run whose latest checkpoint is `step`."""
    key = (kind, name, step)
    if key not in base["refs"]:
        run = copy_run(base["runs"][kind], tmp / f"ref-{kind}-{name}-{step}".replace(" ", "_"))
        if step != STEP:
            shutil.rmtree(run / "checkpoints" / STEP)
            (run / "checkpoints" / "latest").write_text(step + "\n")
        out = tmp / f"refout-{kind}-{name}-{step}".replace(" ", "_")
        r = kiln_here(*command(name, run, base, out))
        assert r.returncode == 0, (name, r.stderr)
        r.stdout = same_paths(r.stdout, run, out)
        base["refs"][key] = {"resume": run / "checkpoints" / "step8", "export hf": out / "hf",
                             "checkpoint unshard": out / "unsharded"}.get(name, r)
    return base["refs"][key]


def same_paths(text: str, run: Path, out: Path) -> str:
    return text.replace(str(out), "OUT").replace(str(run), "RUN")


def check_cell(base: dict, kind: str, part: str, damaged: str | None, name: str, tmp: Path):
    OTHER[:] = [base["runs"]["other"] / "checkpoints" / STEP]
    run = copy_run(base["runs"][kind], tmp / "run")
    step_dir = run / "checkpoints" / STEP
    if damaged is None:  # the latest checkpoint's folder is gone; `latest` still names it
        shutil.rmtree(step_dir)
    elif damaged == "latest":  # no command needs it: the newest complete one is found
        DAMAGE[part][1](run / "checkpoints" / "latest")
    elif kind == "unsharded":
        DAMAGE[part][1](step_dir / damaged)
    else:
        SHARDED_DAMAGE[part][1](step_dir)
    before = snapshot(run)
    out = tmp / "out"
    r = kiln_here(*command(name, run, base, out))
    cell = f"{kind} / {part} / {name}: rc {r.returncode}, stderr {r.stderr!r}"
    assert r.returncode in (0, 2), cell
    needed = damaged in NEEDS[name] and not (part in CONTENT_ONLY and name == "schedule")
    if needed:  # refused: one line naming the file, nothing changed
        assert r.returncode == 2, cell
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kiln: error: "), cell
        assert f"{STEP}/{damaged}" in lines[0], cell
        if "flipped" in part or "another run" in part:  # only the manifest tells
            assert "differs from the manifest written at save" in lines[0], cell
            assert "--resume-from=step3" in lines[0], cell  # the newest that passes
        assert snapshot(run) == before, cell
        assert not out.exists() or not any(out.rglob("*.safetensors")), cell
        return
    assert r.returncode == 0, cell  # works, with what an intact checkpoint gives
    step = "step3" if damaged is None else STEP
    ref = reference(base, kind, name, step, tmp.parent)
    if name == "resume":  # bit-identical to resuming the intact run
        got, want = weights(run / "checkpoints" / "step8"), weights(ref)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), cell
    elif name in ("export hf", "checkpoint unshard"):
        got, want = weights(out / ("hf" if name == "export hf" else "unsharded")), weights(ref)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), cell
        if name == "export hf" and damaged == "tokenizer.json":  # left out, with a warning
            assert not (out / "hf" / "tokenizer.json").exists(), cell
            assert "kiln: warning: exporting the weights without the tokenizer" in r.stderr or \
                part == "tokenizer.json missing", cell
    elif name == "init.from":
        assert (out / "new" / "checkpoints" / "step8").is_dir(), cell
    elif name == "inspect":
        assert f"step            {step[4:]}" in r.stdout, cell
        if damaged in ("optim.pt", "rng.pt"):
            assert f"resumable       no: {damaged}" in r.stdout, cell
        else:
            assert "resumable       yes" in r.stdout, cell
    else:  # generate, eval, schedule: the same text
        assert same_paths(r.stdout, run, out) == ref.stdout, cell
    if name != "resume":
        assert snapshot(run) == before, cell


@pytest.mark.parametrize("part", list(DAMAGE))
def test_unsharded_checkpoint_damage_table(base, tmp_path, part):
    for name in NEEDS:
        if name == "checkpoint unshard":
            continue  # a tool for sharded checkpoints only
        cell = tmp_path / name.replace(" ", "_")
        cell.mkdir()
        check_cell(base, "unsharded", part, DAMAGE[part][0], name, cell)


@pytest.mark.parametrize("part", list(SHARDED_DAMAGE))
def test_sharded_checkpoint_damage_table(base, tmp_path, part):
    for name in NEEDS:
        cell = tmp_path / name.replace(" ", "_")
        cell.mkdir()
        check_cell(base, "sharded", part, SHARDED_DAMAGE[part][0], name, cell)
