"""Tensor and context parallelism on CPU: real torchrun, real gloo process groups. tp=2, cp=2,
FSDP x TP and FSDP x CP on 4 ranks, and HSDP x TP, HSDP x CP and CP x TP on 3-D meshes of 4
ranks give the losses and weights of one process (the default shape, and an OLMo-2 shape with
grouped-query attention); context parallelism keeps documents apart under
data.document_mask; checkpoints move between layouts both ways and go on as the
uninterrupted run; layouts that cannot split are refused in one line before any weight is
built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import assert_one_line_error, kiln_here
from test_distributed import torchrun, write
from test_train import losses, tiny_cfg, train

from kiln import checkpoint as ckpt
from kiln.config import config_from_dict
from kiln.errors import KilnError
from kiln.parallel import check_layout

pytestmark = pytest.mark.slow

OLMO2 = dict(model__qk_norm=True, model__norm_placement="reordered", model__n_kv_heads=2,
             model__tie_embeddings=False)  # an OLMo-2 shape with grouped-query attention


def cfg(tokens: Path, run: Path, **kw) -> dict:
    return tiny_cfg(tokens, run, **{"trainer__max_duration": 10, "checkpoint__interval": 5,
                                    "checkpoint__keep_last": 3, **kw})


def final(run: Path, step: int = 10) -> dict[str, torch.Tensor]:
    path = run / "checkpoints" / f"step{step}"
    if ckpt.is_sharded(path):
        state = ckpt.read_sharded_full(path)["model"]
        if torch.equal(state["embed.weight"], state.get("lm_head.weight", torch.empty(0))):
            del state["lm_head.weight"]  # a tied head, stored under both names there
        return state
    return load_file(str(path / "model.safetensors"))


def assert_same_run(got: Path, want: Path, rel: float = 1e-5, weights: float = 1e-5) -> None:
    a, b = losses(got), losses(want)
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]), (step, a[step], b[step])
    wa, wb = final(got), final(want)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=weights, atol=weights), k  # after 10 AdamW steps


@pytest.fixture(scope="module")
def singles(pydoc_tokens, tmp_path_factory) -> dict[str, Path]:
    """One-process reference runs: the default tiny model (tied head) and the OLMo-2 shape."""
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for name, kw in (("default", {}), ("olmo2", OLMO2)):
        train(cfg(pydoc_tokens, root / name, **kw))  # in this process: no start-up to pay
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def tp2(pydoc_tokens, tmp_path_factory) -> dict[str, Path]:
    """tp=2 runs of both shapes (the OLMo-2 one is also the reference of the checkpoint
    moves below)."""
    root = tmp_path_factory.mktemp("tp2")
    out = {}
    for name, kw in (("default", {}), ("olmo2", OLMO2)):
        r = torchrun(write(cfg(pydoc_tokens, root / name, parallel__tp=2, **kw),
                           root / f"{name}.yaml"))
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = root / name
    return out


@pytest.mark.parametrize("shape", ["default", "olmo2"])
def test_tp2_equals_one_process(singles, tp2, shape):
    assert_same_run(tp2[shape], singles[shape])


def test_fsdp_by_tp_on_four_ranks_equals_one_process(pydoc_tokens, singles, tmp_path):
    run = tmp_path / "run"
    config = write(cfg(pydoc_tokens, run, parallel__tp=2, parallel__dp="fsdp", **OLMO2),
                   tmp_path / "c.yaml")
    out = torchrun(config, nproc=4, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_run(run, singles["olmo2"])
    # a 2-D sharded checkpoint is read by the single-process tools
    step = run / "checkpoints" / "step10"
    assert kiln_here("checkpoint", "unshard", step, tmp_path / "unsharded").returncode == 0
    r = kiln_here("generate", step, "--prompt", "The", "--max-new-tokens", "3", "--greedy")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("shape, layout, weights", [
    ("olmo2", dict(parallel__dp="hsdp", parallel__shard_size=1, parallel__tp=2), 1e-5),
    ("default", dict(parallel__dp="hsdp", parallel__shard_size=1, parallel__cp=2), 1e-5),
    # the step-1 gradients agree within 1e-6 relative; after 10 steps 3 of the embedding's
    # 32768 weights differ by up to 3.7e-5: rows of tokens first seen late, whose gradients
    # are near AdamW's eps (1e-8), where it turns last-bit differences into whole updates
    ("olmo2", dict(parallel__cp=2, parallel__tp=2), 5e-5),
])
def test_three_dimensional_meshes_equal_one_process(pydoc_tokens, singles, tmp_path, shape,
                                                    layout, weights):
    """4 ranks on a 3-D mesh: HSDP x TP and HSDP x CP (2 replicas x shard groups of one rank x
    2, the gradients all-reduced over the replicas), and CP x TP (each window over 2 ranks,
    each layer over 2 more)."""
    run = tmp_path / "run"
    config = write(cfg(pydoc_tokens, run, **layout, **(OLMO2 if shape == "olmo2" else {})),
                   tmp_path / "c.yaml")
    out = torchrun(config, nproc=4, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_run(run, singles[shape], weights=weights)


@pytest.mark.parametrize("first, then", [
    (["--parallel.tp=2"], ["--parallel.tp=1", "--parallel.dp=fsdp"]),
    (["--parallel.tp=1", "--parallel.dp=fsdp"], ["--parallel.tp=2", "--parallel.dp=none"]),
    (["--parallel.tp=1", "--parallel.cp=2"],
     ["--parallel.cp=1", "--parallel.tp=2", "--parallel.dp=none"]),
])
def test_a_checkpoint_moves_between_layouts(pydoc_tokens, tp2, tmp_path, first, then):
    run = tmp_path / "run"
    config = write(cfg(pydoc_tokens, run, **OLMO2), tmp_path / "c.yaml")
    out = torchrun(config, *first, "--trainer.hard_stop=5")
    assert out.returncode == 0, out.stderr[-3000:]
    out = torchrun(run, *then)  # the run directory resumes, in the other layout
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_run(run, tp2["olmo2"])  # as the uninterrupted tp=2 run


@pytest.mark.parametrize("over, words", [
    (dict(model__n_heads=4, model__n_kv_heads=1), "cannot split the kv heads"),
    (dict(model__n_heads=6, model__d_model=96), "cannot split model.n_heads = 6"),
    (dict(model__mlp_hidden_size=190), "cannot split the MLP width"),
    (dict(parallel__dp="ddp"), "not ddp; set parallel.dp=fsdp"),
])
def test_a_layout_that_cannot_split_is_refused_before_any_weight(pydoc_tokens, tmp_path, over,
                                                                 words):
    config = write(cfg(pydoc_tokens, tmp_path / "run", parallel__tp=4, **over),
                   tmp_path / "c.yaml")
    for extra in (["--dry-run"], []):  # the dry run and the run (one process: refused first)
        assert_one_line_error(kiln_here("train", config, *extra), "parallel.tp=4", words)
    assert not (tmp_path / "run").exists()


def test_the_processes_must_split_into_dp_by_tp(pydoc_tokens, tmp_path):
    c = config_from_dict(cfg(pydoc_tokens, tmp_path / "run", parallel__tp=2))
    with pytest.raises(KilnError, match="does not divide the 3 processes launched"):
        check_layout(c, 3)
    c = config_from_dict(cfg(pydoc_tokens, tmp_path / "run", parallel__tp=2,
                             parallel__dp="none"))
    with pytest.raises(KilnError, match="needs exactly 2 processes, not 4"):
        check_layout(c, 4)
    check_layout(c, 2)  # tensor parallelism over every rank


# -- context parallelism -------------------------------------------------------------------


def test_cp2_equals_one_process(pydoc_tokens, singles, tmp_path):
    run = tmp_path / "run"
    out = torchrun(write(cfg(pydoc_tokens, run, parallel__cp=2, **OLMO2), tmp_path / "c.yaml"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_run(run, singles["olmo2"])


def test_fsdp_by_cp_on_four_ranks_equals_one_process(pydoc_tokens, singles, tmp_path):
    run = tmp_path / "run"
    config = write(cfg(pydoc_tokens, run, parallel__cp=2, parallel__dp="fsdp"),
                   tmp_path / "c.yaml")
    out = torchrun(config, nproc=4, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_run(run, singles["default"])


def test_cp_keeps_documents_apart_as_one_process_does(tmp_path):
    """Short documents (3-24 tokens) packed into 32-token windows: the document mask matters,
    and split over 2 ranks (4 chunks of 8 tokens) it is the one process's."""
    import numpy as np

    from kiln.data.tokens import TokenWriter

    rng = np.random.default_rng(0)
    tokens = tmp_path / "short.bin"
    with TokenWriter(tokens, vocab_size=512, eos_token_id=0, dtype="uint16") as w:
        for _ in range(3000):
            w.write(rng.integers(1, 512, int(rng.integers(3, 25)), dtype=np.int64))
    runs = {}
    for name, kw in (("plain", {}), ("masked", dict(data__document_mask=True))):
        runs[name] = tmp_path / name
        train(cfg(tokens, runs[name], **kw))
    assert losses(runs["plain"]) != losses(runs["masked"])  # the mask changes the loss
    run = tmp_path / "cp"
    out = torchrun(write(cfg(tokens, run, data__document_mask=True, parallel__cp=2),
                         tmp_path / "cp.yaml"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_run(run, runs["masked"])


@pytest.mark.parametrize("over, words", [
    (dict(data__seq_len=30), "parallel.cp=2 splits each window into 4 chunks"),
    (dict(parallel__dp="ddp"), "set parallel.dp=fsdp or hsdp (not ddp)"),
])
def test_a_context_layout_that_cannot_split_is_refused(pydoc_tokens, tmp_path, over, words):
    config = write(cfg(pydoc_tokens, tmp_path / "run", parallel__cp=2, **over),
                   tmp_path / "c.yaml")
    assert_one_line_error(kiln_here("train", config, "--dry-run"), words)
    c = config_from_dict(cfg(pydoc_tokens, tmp_path / "run", parallel__cp=2, parallel__tp=2,
                             parallel__dp="fsdp"))
    with pytest.raises(KilnError, match="does not divide the 6 processes"):
        check_layout(c, 6)
