"""Training throughput and peak memory: kiln vs Hugging Face Llama vs a bare PyTorch loop.

All three train the same shape (vocab 50304, d_model 256, 4 layers, 4 heads, SwiGLU 1024,
seq 256, batch 8, fp32 by default, AdamW) on the same random tokens. Each runs in its own
subprocess so peak memory is measured per implementation (CPU: peak RSS growth; CUDA:
torch.cuda.max_memory_allocated).

    python bench/train_throughput.py [--steps 20] [--warmup 3] [--device cpu|cuda] [--bf16]

transformers is optional (`pip install -e .[hf]`); without it the HF row is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, D, LAYERS, HEADS, HIDDEN, SEQ, BATCH = 50304, 256, 4, 4, 1024, 256, 8


# --------------------------------------------------------------------------------------------
# The bare PyTorch baseline: the smallest Llama-shaped model one would write by hand.


class BareBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(D, eps=1e-5), nn.RMSNorm(D, eps=1e-5)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.o = nn.Linear(D, D, bias=False)
        self.gate_up = nn.Linear(D, 2 * HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, D, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, HEADS, D // HEADS).transpose(1, 3).unbind(2)

        def rope(u):
            u1, u2 = u.chunk(2, dim=-1)
            return u * cos + torch.cat((-u2, u1), dim=-1) * sin

        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, D))
        g, u = self.gate_up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class BareModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(BareBlock() for _ in range(LAYERS))
        self.norm = nn.RMSNorm(D, eps=1e-5)
        self.head = nn.Linear(D, VOCAB, bias=False)
        hd = D // HEADS
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(SEQ).float(), inv)
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, idx):
        x = self.emb(idx)
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin)
        return self.head(self.norm(x))


# --------------------------------------------------------------------------------------------


def make_tokens(device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 50000, (BATCH, SEQ + 1), generator=g).to(device)


def time_loop(step, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def adamw_loop(model: nn.Module, forward, device, dtype_ctx, steps, warmup) -> float:
    """The plain training step both baselines share: forward, CE, backward, clip, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = make_tokens(device)

    def step():
        with dtype_ctx():
            logits = forward(batch[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, VOCAB), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_loop(step, steps, warmup, device)


def run_bare(device, dtype_ctx, steps, warmup):
    model = BareModel().to(device)
    return adamw_loop(model, model, device, dtype_ctx, steps, warmup)


def run_hf(device, dtype_ctx, steps, warmup):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=HIDDEN,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, max_position_embeddings=SEQ,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device)
    return adamw_loop(model, lambda x: model(input_ids=x).logits, device, dtype_ctx, steps,
                      warmup)


def run_kiln(device, dtype_ctx, steps, warmup, bf16: bool):
    from kiln.config import config_from_dict
    from kiln.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tokens.npy"
        np.save(data, np.random.default_rng(0).integers(0, 50000, 200_000, dtype=np.uint32))
        cfg = config_from_dict({
            "model": {"d_model": D, "n_layers": LAYERS, "n_heads": HEADS,
                      "mlp_hidden_size": HIDDEN, "vocab_size": VOCAB, "max_seq_len": SEQ,
                      "tie_embeddings": False},
            "data": {"paths": [str(data)], "seq_len": SEQ},
            "optim": {"lr": 1e-4},
            "trainer": {"run_dir": str(Path(tmp) / "run"), "global_batch_size": BATCH,
                        "micro_batch_size": BATCH, "device": device.type,
                        "precision": "bf16" if bf16 else "fp32", "max_duration": 10**6},
            "log": {"console": False},
        })
        trainer = Trainer(cfg)
        batch = make_tokens(device)
        elapsed = time_loop(lambda: trainer.train_step(batch), steps, warmup, device)
        trainer.loader.close()
        return elapsed


def child(name: str, args) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)

    def dtype_ctx():
        if args.bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return torch.autocast(device.type, enabled=False)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if name == "kiln":
        elapsed = run_kiln(device, dtype_ctx, args.steps, args.warmup, args.bf16)
    elif name == "hf":
        elapsed = run_hf(device, dtype_ctx, args.steps, args.warmup)
    else:
        elapsed = run_bare(device, dtype_ctx, args.steps, args.warmup)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    tokens = args.steps * BATCH * SEQ
    print(json.dumps({"name": name, "tokens_per_sec": tokens / elapsed, "peak_mib": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for all three")
    p.add_argument("--only", choices=["kiln", "hf", "bare"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        child(args.only, args)
        return

    try:
        import transformers  # noqa: F401

        names = ["kiln", "hf", "bare"]
    except ImportError:
        print("transformers not installed: skipping the HF row (pip install -e '.[hf]')")
        names = ["kiln", "bare"]
    results = {}
    forwarded = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--device={args.device}"]
    forwarded += ["--bf16"] if args.bf16 else []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    for name in names:
        out = subprocess.run([sys.executable, __file__, f"--only={name}", *forwarded],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])

    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {args.steps} timed steps of {BATCH}x{SEQ} tokens")
    print(f"{'impl':<6} {'tokens/s':>10} {'peak MiB':>10} {'kiln / impl':>12}")
    base = results.get("kiln", {}).get("tokens_per_sec")
    for name, r in results.items():
        ratio = f"{base / r['tokens_per_sec']:.2f}x" if base else "-"
        print(f"{name:<6} {r['tokens_per_sec']:>10,.0f} {r['peak_mib']:>10,.0f} {ratio:>12}")


if __name__ == "__main__":
    main()
