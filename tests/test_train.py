"""End to end on CPU: training learns, resume is exact, checkpoints are safe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln import checkpoint as ckpt
from kiln.config import config_from_dict
from kiln.trainer import Trainer


def tiny_cfg(tokens: Path, run_dir: Path, **over) -> dict:
    cfg = {
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "mlp_hidden_size": 192,
                  "vocab_size": 512, "max_seq_len": 64, "tie_embeddings": True},
        "data": {"paths": [str(tokens)], "seq_len": 32, "val_fraction": 0.05, "prefetch": 2},
        "optim": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup": 5},
        "trainer": {"run_dir": str(run_dir), "global_batch_size": 8, "micro_batch_size": 4,
                    "max_duration": 40, "eval_interval": 0, "eval_batches": 4},
        "checkpoint": {"interval": 10, "keep_last": 2},
        "log": {"interval": 1, "console": False},
    }
    for dotted, value in over.items():
        node = cfg
        *path, last = dotted.split("__")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return cfg


def train(cfg: dict) -> dict:
    return Trainer(config_from_dict(cfg)).fit()


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run_dir) / "model.safetensors"))


def test_loss_goes_down_and_metrics_have_the_documented_fields(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(pydoc_tokens, run))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_sec"):
        assert key in steps[0]
    assert steps[-1]["tokens"] == 40 * 8 * 32
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.4
    evals = [r for r in records if "val_loss" in r]
    assert evals and evals[-1]["val_ppl"] > 1
    assert (run / "config.yaml").is_file()


def test_resumed_run_is_bit_identical_to_uninterrupted(pydoc_tokens, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train(tiny_cfg(pydoc_tokens, full))
    # first half: the same run stopped at step 20 (the schedule still planned for 40)
    train(tiny_cfg(pydoc_tokens, split, trainer__hard_stop=20))
    assert ckpt.latest_checkpoint(split).name == "step20"
    train(tiny_cfg(pydoc_tokens, split))  # resumes from step20
    assert losses(split) == losses(full)  # exact float equality at every step
    a, b = final_weights(full), final_weights(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_retention_keeps_last_n_and_latest_pointer(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(pydoc_tokens, run, checkpoint__keep_last=2))
    names = sorted(p.name for p in ckpt.list_checkpoints(run))
    assert names == ["step30", "step40"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step40"
    assert not list((run / "checkpoints").glob(".tmp*"))
    files = {p.name for p in (run / "checkpoints" / "step40").iterdir()}
    assert {"model.safetensors", "optim.pt", "rng.pt", "trainer.json", "config.yaml",
            "tokenizer.json"} <= files


def test_checkpoint_loads_without_unpickling_objects(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(pydoc_tokens, run, trainer__max_duration=10))
    path = ckpt.latest_checkpoint(run)
    # weights_only=True refuses arbitrary pickled objects: this must just work
    state = torch.load(path / "optim.pt", weights_only=True)
    assert "state" in state and "param_groups" in state
    trainer_state = json.loads((path / "trainer.json").read_text())
    assert trainer_state["step"] == 10 and trainer_state["tokens_seen"] == 10 * 8 * 32
    assert trainer_state["data"]["tokens_in_epoch"] == 10 * 8 * 32


def test_a_crash_mid_save_leaves_previous_checkpoint_usable(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(pydoc_tokens, run, trainer__max_duration=10))
    # a save that died half way leaves a hidden temp folder behind
    junk = run / "checkpoints" / ".tmp-step20-999"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"garbage")
    assert ckpt.latest_checkpoint(run).name == "step10"
    c = ckpt.load(run)
    assert c.step == 10


def test_completed_run_is_not_retrained_or_rewritten(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(pydoc_tokens, run, trainer__max_duration=10)
    train(cfg)
    path = ckpt.latest_checkpoint(run)
    before = (path / "model.safetensors").stat().st_mtime_ns
    train(cfg)
    assert (path / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("schedule", ["constant", "linear", "wsd"])
def test_every_schedule_trains(pydoc_tokens, tmp_path, schedule):
    run = tmp_path / schedule
    last = train(tiny_cfg(pydoc_tokens, run, schedule__name=schedule, trainer__max_duration=6,
                          checkpoint__interval=0))
    assert last["step"] == 6 and last["loss"] > 0


def test_activation_checkpointing_changes_memory_not_results(pydoc_tokens, tmp_path):
    plain = train(tiny_cfg(pydoc_tokens, tmp_path / "a", trainer__max_duration=5))
    for mode in ("full", "every_n", "selective"):
        ac = train(tiny_cfg(pydoc_tokens, tmp_path / mode, trainer__max_duration=5,
                            parallel__activation_checkpointing=mode))
        assert losses(tmp_path / mode) == losses(tmp_path / "a"), mode
        assert ac["grad_norm"] == plain["grad_norm"]
    # the checkpoint keeps the plain parameter names whatever wrapping was applied
    names = set(final_weights(tmp_path / "full"))
    assert names == set(final_weights(tmp_path / "a"))


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_resume_exactly_and_never_recompile(
        pydoc_tokens, tmp_path, capsys):
    over = dict(trainer__max_duration=5, trainer__eval_interval=2, log__console=True)
    train(tiny_cfg(pydoc_tokens, tmp_path / "eager", **over))
    assert "torch.compile" not in capsys.readouterr().out  # auto: not on CPU
    trainer = Trainer(config_from_dict(tiny_cfg(pydoc_tokens, tmp_path / "compiled",
                                                parallel__compile=True, **over)))
    trainer.fit()
    out = capsys.readouterr()
    assert "torch.compile: the first step took" in out.out
    assert "new graph" not in out.err  # evaluations in between compile once, outside steps
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5)
    assert set(final_weights(tmp_path / "compiled")) == set(final_weights(tmp_path / "eager"))
    # the guard itself: a step whose shape changes compiles again, and says so
    batch = trainer.loader.next_batch()[:, :17]
    with trainer.compile_watch.around(trainer.step):
        trainer.train_step(batch)
    assert "new graph(s) in step 6" in capsys.readouterr().err
    # exact resume holds with compiled blocks (and the fused loss, the default)
    split = tmp_path / "split"
    train(tiny_cfg(pydoc_tokens, split, parallel__compile=True, trainer__hard_stop=3, **over))
    train(tiny_cfg(pydoc_tokens, split, parallel__compile=True, **over))
    a, b = final_weights(split), final_weights(tmp_path / "compiled")
    assert all(torch.equal(a[k], b[k]) for k in b)


def saved_for_backward(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps from one forward pass for the backward."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens).float().sum().backward()
    return sum(seen.values())


@pytest.mark.slow
def test_a_memory_budget_makes_compiled_blocks_keep_less_and_train_the_same(pydoc_tokens,
                                                                           tmp_path):
    from kiln.config import ModelConfig
    from kiln.model import Transformer
    from kiln.parallel import apply_compile

    tokens = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    kept, grads = {}, {}
    for budget in (1.0, 0.2, 0.0):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=512,
                                        max_seq_len=64))
        apply_compile(model, budget)
        kept[budget] = saved_for_backward(model, tokens)
        grads[budget] = model.blocks[0].mlp.up_proj.weight.grad
    assert kept[1.0] > kept[0.2] >= kept[0.0], kept  # less kept, what is kept is recomputed
    assert torch.allclose(grads[0.0], grads[1.0], rtol=1e-5, atol=1e-7)
    # a run with it: the losses of eager, uncheckpointed training
    over = dict(trainer__max_duration=4, checkpoint__interval=0)
    train(tiny_cfg(pydoc_tokens, tmp_path / "eager", **over))
    train(tiny_cfg(pydoc_tokens, tmp_path / "budget", parallel__compile=True,
                   parallel__activation_checkpointing="budget", parallel__ac_budget=0.3, **over))
    eager, budget = losses(tmp_path / "eager"), losses(tmp_path / "budget")
    assert budget.keys() == eager.keys()
    assert all(budget[s] == pytest.approx(eager[s], rel=1e-5) for s in eager)
    apply_compile(Transformer(ModelConfig(d_model=64, n_layers=1, n_heads=4, vocab_size=512)))
    import torch._functorch.config as functorch_config

    assert functorch_config.activation_memory_budget == 1.0  # the next compile is unbounded


def test_z_loss_regularises_without_changing_the_logged_cross_entropy(pydoc_tokens, tmp_path):
    train(tiny_cfg(pydoc_tokens, tmp_path / "plain", trainer__max_duration=3))
    train(tiny_cfg(pydoc_tokens, tmp_path / "z", trainer__max_duration=3, optim__z_loss=0.1))
    plain, z = losses(tmp_path / "plain"), losses(tmp_path / "z")
    assert z[1] == plain[1]  # step 1 logs the same cross entropy of the same weights
    assert z[3] != plain[3]  # but the z-loss gradient moved the weights differently
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "z")
    assert not torch.equal(a["lm_head.weight" if "lm_head.weight" in a else "embed.weight"],
                           b["lm_head.weight" if "lm_head.weight" in b else "embed.weight"])
