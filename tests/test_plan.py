"""`kiln plan` and the numbers behind it: memory per rank against what the trainer really
holds, hours against their formula, checkpoint sizes against a real checkpoint, and plans
made before the data exist (`kiln plan`, `kiln train --dry-run`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import assert_one_line_error, kiln_here
from test_train import tiny_cfg

from kiln import checkpoint as ckpt
from kiln.callbacks import Callback
from kiln.config import ModelConfig, config_from_dict
from kiln.model import Transformer, flops_per_token
from kiln.plan import (
    CPU_IMPORT_BYTES,
    checkpoint_bytes_estimate,
    checkpoint_plan,
    gpu_spec,
    largest_micro_batch,
    layer_bytes_per_token,
    memory_estimate,
)
from kiln.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

# -- memory: one block's saved tensors, counted exactly ------------------------------------


def saved_bytes(cfg: ModelConfig, batch: int, seq: int, bf16: bool) -> int:
    """Bytes autograd saves for the backward pass of one block (distinct storages, the
    block's own parameters left out), counted with saved-tensor hooks."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = model.embed(torch.randint(0, cfg.vocab_size, (batch, seq))).detach().requires_grad_()
    cos, sin = model._rope(seq, x.device)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model.blocks[0](x, cos[:seq], sin[:seq])
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("shape", [
    {},
    {"n_kv_heads": 2},
    {"norm": "nonparametric_layernorm"},
    {"qk_norm": True},
    {"norm_placement": "reordered", "qk_norm": True},
])
def test_block_activation_formula_matches_what_autograd_saves(shape):
    cfg = ModelConfig(d_model=128, n_layers=1, n_heads=4, mlp_hidden_size=320, vocab_size=256,
                      max_seq_len=128, **shape)
    matmul_params = 4 * 128 * 128 + 3 * 128 * 320 - (0 if "n_kv_heads" not in shape else
                                                     2 * 128 * 64)
    for bf16 in (False, True):
        # per token: the difference of two batch sizes leaves out what does not grow
        per_token = (saved_bytes(cfg, 4, 64, bf16) - saved_bytes(cfg, 2, 64, bf16)) / 128
        assert per_token == layer_bytes_per_token(cfg, "bf16" if bf16 else "fp32"), (shape, bf16)
        if bf16:  # autocast's bf16 copies of the block's weights are kept for backward too
            fixed = saved_bytes(cfg, 2, 64, True) - 128 * per_token
            rope = 2 * 128 * cfg.head_dim * 4  # the cached tables the block reads
            assert fixed - rope == 2 * matmul_params


# -- memory: the whole estimate against the trainer's real peak -----------------------------

CHILD = """
import json, sys
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
import torch
from kiln.config import config_from_dict
from kiln.trainer import Trainer
cfg = config_from_dict(json.loads(sys.argv[1]))
base = status("VmRSS")
Trainer(cfg).fit()
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""

SHAPES = {
    # one micro-batch per step: the peak is the start of backward, before any gradient
    "untied-16k-vocab": dict(d_model=128, n_layers=4, n_heads=2, mlp=512, vocab=16384,
                             seq=256, micro=8, batch=8, tied=False, ac="none"),
    # gradient accumulation: the gradients are resident through the second micro-batch
    "accumulating": dict(d_model=192, n_layers=3, n_heads=3, mlp=512, vocab=4096, seq=256,
                         micro=8, batch=16, tied=True, ac="none"),
    # activation checkpointing: only the blocks' inputs are kept
    "checkpointed": dict(d_model=128, n_layers=4, n_heads=2, mlp=512, vocab=8192, seq=256,
                         micro=16, batch=16, tied=True, ac="full"),
    # selective: every block keeps its matmuls' outputs, recomputes the pointwise ops
    "selective": dict(d_model=128, n_layers=4, n_heads=2, mlp=512, vocab=8192, seq=256,
                      micro=16, batch=16, tied=True, ac="selective"),
}


def shape_config(s: dict, tokens: Path, run_dir: Path) -> dict:
    return {
        "model": {"d_model": s["d_model"], "n_layers": s["n_layers"], "n_heads": s["n_heads"],
                  "mlp_hidden_size": s["mlp"], "vocab_size": s["vocab"],
                  "max_seq_len": s["seq"], "tie_embeddings": s["tied"]},
        "data": {"paths": [str(tokens)], "seq_len": s["seq"], "prefetch": 1},
        "trainer": {"run_dir": str(run_dir), "global_batch_size": s["batch"],
                    "micro_batch_size": s["micro"], "max_duration": 2, "device": "cpu",
                    "precision": "fp32", "eval_interval": 0},
        "parallel": {"activation_checkpointing": s["ac"]},
        "checkpoint": {"interval": 0, "save_final": False, "check_free_space": False},
        "log": {"console": False},
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("name", list(SHAPES))
def test_memory_estimate_within_15_percent_of_the_measured_peak(name, pydoc_tokens, tmp_path):
    """Two real training steps (the second one holds Adam's moments) in a fresh process: its
    peak RSS growth over the RSS right after the imports against the estimate less the
    imports' share (CPU_IMPORT_BYTES). glibc's mmap threshold is fixed so that RSS follows
    the live tensors (by default freed blocks under 32 MiB stay in the heap; see
    docs/planning.md)."""
    raw = shape_config(SHAPES[name], pydoc_tokens, tmp_path / "run")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(raw)], capture_output=True,
                         text=True, timeout=240, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    measured = got["peak"] - got["base"]
    est = memory_estimate(config_from_dict(raw))
    estimated = est["total"] - CPU_IMPORT_BYTES
    print(f"{name}: measured {measured / 2**20:.0f} MiB, estimated {estimated / 2**20:.0f} MiB")
    assert abs(estimated - measured) <= 0.15 * measured, (name, measured, estimated, est)
    assert 0.5 * CPU_IMPORT_BYTES < got["base"] < 1.5 * CPU_IMPORT_BYTES  # the constant holds


def test_estimate_follows_the_modes():
    raw = {"model": {"preset": "olmo-1b"}, "data": {"seq_len": 4096},
           "trainer": {"global_batch_size": 512, "micro_batch_size": 8}}
    cfg = config_from_dict(raw)
    P = cfg.model.num_params()
    ddp = memory_estimate(cfg, 8, "ddp")
    fsdp = memory_estimate(cfg, 8, "fsdp")
    hsdp = memory_estimate(cfg, 16, "hsdp")  # shard groups of 8
    full = memory_estimate(cfg, 8, "fsdp", activation_checkpointing="full")
    assert ddp["precision"] == "bf16" and ddp["adam"] == 8 * P
    assert ddp["grads"] == 8 * P  # the gradients and DDP's buckets
    assert fsdp["adam"] == 8 * P // 8 and hsdp["adam"] == fsdp["adam"]
    assert full["activations"] < fsdp["activations"] / 5
    for e in (ddp, fsdp, full):
        assert sum(e[k] for k in ("params", "grads", "adam", "activations", "loss",
                                  "overhead")) == e["total"]
    mem, _ = gpu_spec("h100")
    best = largest_micro_batch(cfg, mem, 8, "fsdp")
    assert best >= 1
    assert memory_estimate(cfg, 8, "fsdp", micro_batch_size=best)["total"] <= mem
    assert memory_estimate(cfg, 8, "fsdp", micro_batch_size=best + 1)["total"] > mem


def test_a_memory_budget_falls_between_full_checkpointing_and_none():
    raw = {"model": {"preset": "olmo-1b"}, "data": {"seq_len": 4096},
           "trainer": {"global_batch_size": 512, "micro_batch_size": 8}}
    acts = {}
    for budget in (0.0, 0.25, 0.5, 1.0):
        cfg = config_from_dict({**raw, "parallel": {"ac_budget": budget}})
        e = memory_estimate(cfg, 8, "fsdp", activation_checkpointing="budget")
        acts[budget] = e["activations"]
        assert any("activation_checkpointing=budget" in n for n in e["notes"])
    cfg = config_from_dict(raw)
    full = memory_estimate(cfg, 8, "fsdp", activation_checkpointing="full")["activations"]
    none = memory_estimate(cfg, 8, "fsdp", activation_checkpointing="none")["activations"]
    assert acts[0.0] == pytest.approx(full, rel=0.01)
    assert acts[0.0] < acts[0.25] < acts[0.5] < acts[1.0] == none


# -- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_size_and_count_match_a_real_run(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    raw = tiny_cfg(pydoc_tokens, run, trainer__max_duration=12, checkpoint__interval=4,
                   checkpoint__keep_last=2, data__val_fraction=0.0)
    cfg = config_from_dict(raw)
    saved = []

    class Saves(Callback):
        def on_checkpoint(self, trainer, path: Path) -> None:
            saved.append(path.name)

    trainer = Trainer(cfg, callbacks=[Saves()])
    trainer.fit()
    tok = trainer.tokenizer_path.stat().st_size
    plan = checkpoint_plan(cfg, stop_step=12, tokenizer_bytes=tok)
    assert plan["saves"] == len(saved) == 3  # steps 4, 8 and the final 12
    left = ckpt.list_checkpoints(run)
    assert [p.name for p in left] == ["step8", "step12"] and plan["kept"] == 2
    for path in left:
        real = ckpt.checkpoint_bytes(path)
        estimate = checkpoint_bytes_estimate(cfg, tok)
        assert abs(estimate - real) <= 0.10 * real, (real, estimate)
    assert plan["peak"] == 3 * plan["size"]  # keep_last + 1: written before the prune


# -- kiln plan -----------------------------------------------------------------------------


def olmo_config(tmp_path: Path) -> Path:
    path = tmp_path / "olmo-1b.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"preset": "olmo-1b"},
        "data": {"paths": [str(tmp_path / "olmo-data" / "*.npy")], "seq_len": 4096},
        "schedule": {"warmup": {"value": 2000, "unit": "steps"}},
        "trainer": {"run_dir": str(tmp_path / "runs" / "olmo-1b"), "global_batch_size": 512,
                    "micro_batch_size": 8, "max_duration": {"value": 2e12, "unit": "tokens"}},
        "parallel": {"dp": "fsdp"},
        "checkpoint": {"interval": 1000, "keep_last": 3},
    }))
    return path


def hours_of(cell: str) -> float:
    value, unit = re.match(r"([\d,.]+) (h|min)", cell.strip()).groups()
    return float(value.replace(",", "")) / (60 if unit == "min" else 1)


def test_plan_olmo_1b_on_8_h100s(tmp_path):
    r = kiln_here("plan", olmo_config(tmp_path), "--gpus", 8, "--gpu", "h100")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "parameters            1,176,764,416" in out  # OLMo-1B: ~1.18B
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    for row in ("params", "grads", "Adam", "activations", "loss", "overhead", "total"):
        assert re.search(r"(MiB|GiB)", rows[row]), row
    fits = rows["max"].split()[2]  # "max micro 9 68 6 49 ..."
    assert int(fits) >= 1
    assert re.search(r"largest micro-batch +\d+ fits one h100", out)
    run = next(line for line in out.splitlines() if "(this run)" in line)
    one, eight = (hours_of(c) for c in re.findall(r"[\d,.]+ (?:h|min)", run))
    cfg = config_from_dict(yaml.safe_load(olmo_config(tmp_path).read_text()))
    tokens = 953_675 * 512 * 4096  # whole steps: 2e12 rounded up to a step
    F = flops_per_token(cfg.model, 4096)
    expect = tokens * F / (8 * 0.4 * 989e12) / 3600
    assert eight == pytest.approx(expect, rel=0.01)
    assert one == pytest.approx(8 * expect, rel=0.01)
    # The 6 N rule of thumb leaves out the attention scores (12 L d T FLOPs per token,
    # +23% at seq 4096) that kiln's FLOPs/token (the PaLM formula, as in MFU) counts.
    six_n = 6 * cfg.model.num_params() * tokens / (8 * 0.4 * 989e12) / 3600
    assert 1.0 < eight / six_n < 1.3
    assert 7 * 24 < eight < 26 * 7 * 24  # weeks, on 8 GPUs
    assert "checkpoints           954 (every 1,000 steps + the final one; keep_last 3)" in out
    assert re.search(r"disk at most +[\d.,]+ GiB: 4 checkpoints", out)
    assert "WARNING: data.paths" in out and "matches no files yet" in out


def test_plan_warns_when_the_checkpoints_will_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "free_bytes", lambda run_dir: (2**30, tmp_path))
    r = kiln_here("plan", olmo_config(tmp_path), "--gpus", 8)
    assert r.returncode == 0, r.stderr
    assert re.search(r"WARNING: the checkpoints need about [\d.,]+ GiB at most and .* has "
                     r"1.00 GiB free", r.stdout)


def test_plan_takes_a_measured_throughput(tmp_path):
    r = kiln_here("plan", olmo_config(tmp_path), "--tokens-per-sec", 10000, "--gpus", 4)
    assert r.returncode == 0, r.stderr
    run = next(line for line in r.stdout.splitlines() if "(this run)" in line)
    one, four = (hours_of(c) for c in re.findall(r"[\d,.]+ (?:h|min)", run))
    assert one == pytest.approx(953_675 * 512 * 4096 / 10000 / 3600, rel=0.001)
    assert four == pytest.approx(one / 4, rel=0.001)


@pytest.mark.parametrize("args, words", [
    (["--gpu", "h10"], "did you mean 'h100'"),
    (["--gpu", "tpu"], "known: h100"),
    (["--gpus", "0"], "--gpus must be at least 1"),
    (["--mfu", "1.5"], "--mfu must be in (0, 1]"),
])
def test_plan_refuses_bad_input_in_one_line(tmp_path, args, words):
    r = kiln_here("plan", olmo_config(tmp_path), *args)
    assert r.returncode == 2
    assert_one_line_error(r, words)


# -- before the data exist -----------------------------------------------------------------


def test_dry_run_and_plan_before_the_data_exist(tmp_path):
    missing = tmp_path / "data" / "shakespeare" / "tokens.bin"
    common = [ROOT / "configs" / "tiny-shakespeare.yaml", f"--data.paths={missing}",
              f"--trainer.run_dir={tmp_path / 'run'}"]
    r = kiln_here("train", common[0], "--dry-run", *common[1:])
    assert r.returncode == 0, r.stderr
    assert (f"WARNING: data.paths '{missing}' matches no files yet (run kiln prepare first); "
            "data-dependent numbers are unknown") in r.stdout
    assert "epochs for the run    unknown (no data yet)" in r.stdout
    for line in ("# derived numbers", "steps for duration    150", "warmup ends           step 30",
                 "training FLOPs/token", "dry run: nothing was trained or written"):
        assert line in r.stdout
    r = kiln_here("plan", *common)
    assert r.returncode == 0, r.stderr
    assert f"data.paths '{missing}' matches no files yet" in r.stdout
    assert "total" in r.stdout and "checkpoints           3 (every 50 steps" in r.stdout
    assert not (tmp_path / "run").exists()


def test_dry_run_still_refuses_a_bad_data_file(tmp_path):
    bad = tmp_path / "tokens.bin"
    bad.write_bytes(b"")
    r = kiln_here("train", ROOT / "configs" / "tiny-shakespeare.yaml", "--dry-run",
                  f"--data.paths={bad}", f"--trainer.run_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "is empty" in r.stderr


def test_plan_of_a_run_directory_uses_its_logged_mfu(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    raw = yaml.safe_load(olmo_config(tmp_path).read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "tokens_per_sec": 1e5, "mfu": m}) + "\n"
        for s, m in ((1, 0.05), (2, 0.5), (3, 0.5), (4, 0.6))))  # step 1 (warm-up) is left out
    r = kiln_here("plan", run, "--gpus", 8)
    assert r.returncode == 0, r.stderr
    assert f"MFU 0.50 measured (median in {run}/metrics.jsonl)" in r.stdout
    line = next(line for line in r.stdout.splitlines() if "(this run)" in line)
    eight = hours_of(re.findall(r"[\d,.]+ (?:h|min)", line)[1])
    cfg = config_from_dict(raw)
    expect = 953_675 * 512 * 4096 * flops_per_token(cfg.model, 4096) / (8 * 0.5 * 989e12) / 3600
    assert eight == pytest.approx(expect, rel=0.01)


def test_plan_says_the_mfu_a_claimed_throughput_implies_and_warns_above_plausible(tmp_path):
    # seed 001: olmo-1b at 49,500 tokens/s on one A100 is more than the A100's bf16 peak
    r = kiln_here("plan", olmo_config(tmp_path), "--gpu", "a100", "--tokens-per-sec", 49500)
    assert r.returncode == 0, r.stderr
    mfu = float(re.search(r"MFU ([\d.]+) on a a100", r.stdout).group(1))
    assert mfu > 1.0
    assert re.search(r"WARNING: 49,500 tokens/s per GPU means MFU [\d.]+ on a a100 .* more "
                     r"than the GPU's peak", r.stdout)
    # a plausible one: its MFU is said, without a warning
    r = kiln_here("plan", olmo_config(tmp_path), "--gpu", "h100", "--tokens-per-sec", 20000)
    assert re.search(r"MFU 0\.[0-6]\d on a h100", r.stdout) and "WARNING: 20,000" not in r.stdout


def test_tensor_parallelism_divides_the_weights_their_state_and_the_activations():
    raw = {"model": {"preset": "olmo-1b"}, "data": {"seq_len": 4096},
           "trainer": {"global_batch_size": 512, "micro_batch_size": 4},
           "parallel": {"dp": "fsdp"}}
    cfg = config_from_dict(raw)
    one = memory_estimate(cfg, 8, "fsdp")  # 8-way sharding
    two = memory_estimate(cfg, 16, "fsdp", tp=2)  # 8-way sharding x tp 2 over 16 ranks
    assert two["tp"] == 2 and two["adam"] == one["adam"] // 2
    assert two["micro_batches_per_step"] == one["micro_batches_per_step"]  # same dp ranks
    assert two["activations"] < 0.6 * one["activations"]
    # a model that does not fit one small GPU at all: kiln plan names a tp that makes it fit
    from kiln.plan import suggest_layout

    seven = config_from_dict({**raw, "model": {"preset": "olmo-7b"},
                              "trainer": {"global_batch_size": 64, "micro_batch_size": 1}})
    line = suggest_layout(seven, 8, "a10g", 24e9)
    assert line.startswith("layout:") and "--parallel.tp=" in line, line


def test_context_parallelism_divides_the_activations_per_rank():
    raw = {"model": {"preset": "olmo-1b", "max_seq_len": 32768},
           "data": {"seq_len": 32768},
           "trainer": {"global_batch_size": 64, "micro_batch_size": 1},
           "parallel": {"dp": "fsdp", "activation_checkpointing": "full"}}
    one = memory_estimate(config_from_dict(raw), 8)
    four = memory_estimate(config_from_dict({**raw, "parallel": {**raw["parallel"], "cp": 4}}),
                           32)
    assert four["activations"] < 0.3 * one["activations"]
    assert four["micro_batches_per_step"] == one["micro_batches_per_step"]  # 8 dp ranks each
